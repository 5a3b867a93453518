"""Monthly budgets refuse a request before it is forwarded, counting requests in flight.

A gpt-image-1.5 low 1024x1024 request for PROMPT (21 bytes, 6 words) is estimated at
272 x $32 + 21 x $5 = 8809 µ$ and actually costs 272 x $32 + 6 x $5 = 8734 µ$.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import msgspec
import openai
import pytest

from metering_support import (  # noqa: F401
    ADMIN_KEY,
    DESIGN_KEY,
    INTERN_KEY,
    ReplayCache,
    flush,
    gateway_config,
    only,
    seed_usage,
    usage_db,
    usage_rows,
)

PROMPT = "a red fox in the snow"
ESTIMATE, COST = 8809, 8734
IMAGES = "/v1/images/generations"


def sdk(gateway, key: str = DESIGN_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)


async def generate(client: openai.AsyncOpenAI) -> None:
    await client.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024")


async def total_cost(usage_db) -> int:
    return sum(row["cost_micros"] or 0 for row in await usage_rows(usage_db))


async def test_a_request_over_budget_gets_insufficient_quota_before_any_upstream_call(usage_db, gateway_kit,
                                                                                      fake_upstream):
    gateway = await gateway_kit.start(gateway_config(usage_db, budgets={"design": {"monthly_usd": 0.005}}))
    async with sdk(gateway) as client:
        with pytest.raises(openai.RateLimitError) as refused:
            await generate(client)
    assert fake_upstream.count() == 0
    assert refused.value.status_code == 429
    assert (refused.value.code, refused.value.type) == ("insufficient_quota", "insufficient_quota")
    assert refused.value.response.headers["x-should-retry"] == "false"  # the SDK must not retry it
    await flush(gateway)
    row = only(await usage_rows(usage_db))
    assert (row["status"], row["outcome"], row["cost_micros"]) == (429, "rejected", 0)


async def test_fifty_concurrent_requests_on_a_nearly_spent_budget_overspend_by_at_most_one(usage_db, gateway_kit,
                                                                                          fake_upstream):
    budget = 1_000_000
    await seed_usage(usage_db, tenant="design", key_id="key-design", cost_micros=budget - 22_000)  # 2.5 estimates left
    fake_upstream.inject(path=IMAGES, status=200, delay_s=0.3, times=50)  # all 50 are in flight together
    gateway = await gateway_kit.start(gateway_config(usage_db, budgets={"design": {"monthly_usd": 1}}))
    async with sdk(gateway) as client:
        results = await asyncio.gather(*(generate(client) for _ in range(50)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, openai.RateLimitError) and r.code == "insufficient_quota"]
    assert (len(results) - len(refused), len(refused)) == (2, 48)
    assert fake_upstream.count(IMAGES) == 2
    await flush(gateway)
    spent = await total_cost(usage_db)
    assert spent == budget - 22_000 + 2 * COST
    assert spent <= budget + COST


async def test_a_key_budget_refuses_that_key_while_the_rest_of_its_tenant_goes_on(usage_db, gateway_kit):
    gateway = await gateway_kit.start(gateway_config(usage_db, key_budgets={"key-intern": {"monthly_usd": 0.005}}))
    async with sdk(gateway, INTERN_KEY) as intern, sdk(gateway) as colleague:
        with pytest.raises(openai.RateLimitError, match="key 'key-intern'"):
            await generate(intern)
        await generate(colleague)


async def test_a_failed_request_gives_its_reservation_back(usage_db, gateway_kit, fake_upstream):
    await seed_usage(usage_db, tenant="design", key_id="key-design", cost_micros=1_000_000 - 9_000)  # one estimate
    fake_upstream.inject(path=IMAGES, status=500)
    gateway = await gateway_kit.start(gateway_config(usage_db, budgets={"design": {"monthly_usd": 1}}))
    async with sdk(gateway) as client:
        with pytest.raises(openai.InternalServerError):
            await generate(client)
        await generate(client)  # the failed request cost nothing and holds nothing
        with pytest.raises(openai.RateLimitError):
            await generate(client)  # 8734 spent + 8809 estimated > 9000 left


async def test_spend_written_by_another_replica_counts_from_the_next_refresh(usage_db, gateway_kit):
    gateway = await gateway_kit.start(
        gateway_config(usage_db, budgets={"design": {"monthly_usd": 1}}, budget_refresh_s=0.1))
    async with sdk(gateway) as client:
        await generate(client)
        await seed_usage(usage_db, tenant="design", key_id="key-other-replica", cost_micros=990_000)
        await asyncio.sleep(0.5)
        with pytest.raises(openai.RateLimitError):
            await generate(client)


async def test_spend_of_earlier_months_does_not_count(usage_db, gateway_kit):
    last_month = (datetime.now(UTC).replace(day=1) - timedelta(days=1)).timestamp()
    await seed_usage(usage_db, tenant="design", key_id="key-design", cost_micros=50_000_000, when=last_month)
    gateway = await gateway_kit.start(gateway_config(usage_db, budgets={"design": {"monthly_usd": 1}}))
    async with sdk(gateway) as client:
        await generate(client)


async def test_a_cache_hit_is_served_on_a_spent_budget(usage_db, gateway_kit, fake_upstream):
    await seed_usage(usage_db, tenant="design", key_id="key-design", cost_micros=1_000_000)
    body = msgspec.json.encode({"created": int(time.time()), "data": [{"b64_json": "iVBORw0KGgo="}]})
    replay = ReplayCache(body, {"input_tokens": 6, "output_tokens": 272,
                                "input_tokens_details": {"text_tokens": 6, "image_tokens": 0}})
    gateway = await gateway_kit.start(gateway_config(usage_db, budgets={"design": {"monthly_usd": 1}}),
                                      plugins=[replay])
    async with sdk(gateway) as client:
        response = await client.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024")
    assert response.data[0].b64_json == "iVBORw0KGgo="
    assert fake_upstream.count() == 0


async def test_admin_budgets_shows_each_budget_with_every_replicas_spend_as_exact_strings(usage_db, gateway_kit):
    await seed_usage(usage_db, tenant="design", key_id="key-other-replica", cost_micros=250_000)
    gateway = await gateway_kit.start(gateway_config(
        usage_db, budgets={"design": {"monthly_usd": 1}}, key_budgets={"key-intern": {"monthly_usd": 0.5}}))
    async with sdk(gateway) as client:
        await generate(client)
    await seed_usage(usage_db, tenant="design", key_id="key-other-replica", cost_micros=100_000)  # after start
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/admin/budgets", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
            assert r.status == 200
            statuses = await r.json()
        async with session.get(gateway.url + "/admin/budgets", headers={"Authorization": f"Bearer {DESIGN_KEY}"}) as r:
            assert r.status == 403  # a client key, not an admin key
    month = datetime.now(UTC).strftime("%Y-%m")
    spent = 250_000 + COST + 100_000
    assert statuses == [
        {"scope": "key", "name": "key-intern", "month": month, "budget_usd": "0.500000", "spent_usd": "0.000000",
         "reserved_usd": "0.000000", "remaining_usd": "0.500000"},
        {"scope": "tenant", "name": "design", "month": month, "budget_usd": "1.000000",
         "spent_usd": f"0.{spent:06d}", "reserved_usd": "0.000000", "remaining_usd": f"0.{1_000_000 - spent:06d}"},
    ]


def budgets_cli(tmp_path: Path, storage: dict, *args: str) -> subprocess.CompletedProcess:
    config = tmp_path / "budgets.toml"
    config.write_text(f'[metering]\ndatabase = "{storage["database"]}"\ntable = "{storage["table"]}"\n'
                      '[metering.budgets]\ndesign = { monthly_usd = 1 }\nprint = { monthly_usd = 25.5 }\n')
    return subprocess.run([sys.executable, "-m", "gatekeeper", "budgets", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60)


async def test_the_budgets_command_prints_what_the_admin_route_answers_in_every_format(usage_db, tmp_path):
    last_month = (datetime.now(UTC).replace(day=1) - timedelta(days=1)).timestamp()
    await seed_usage(usage_db, tenant="design", key_id="key-a", cost_micros=400_000)
    await seed_usage(usage_db, tenant="design", key_id="key-b", cost_micros=8_734)
    await seed_usage(usage_db, tenant="design", key_id="key-a", cost_micros=900_000, when=last_month)
    await seed_usage(usage_db, tenant="other", key_id="key-c", cost_micros=123)
    as_json = await asyncio.to_thread(budgets_cli, tmp_path, usage_db, "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    month = datetime.now(UTC).strftime("%Y-%m")
    expected = [
        {"scope": "tenant", "name": "design", "month": month, "budget_usd": "1.000000", "spent_usd": "0.408734",
         "reserved_usd": "0.000000", "remaining_usd": "0.591266"},
        {"scope": "tenant", "name": "print", "month": month, "budget_usd": "25.500000", "spent_usd": "0.000000",
         "reserved_usd": "0.000000", "remaining_usd": "25.500000"},
    ]
    assert json.loads(as_json.stdout) == expected
    as_csv = await asyncio.to_thread(budgets_cli, tmp_path, usage_db, "--format", "csv")
    assert list(csv.DictReader(io.StringIO(as_csv.stdout))) == expected
    table = (await asyncio.to_thread(budgets_cli, tmp_path, usage_db)).stdout.splitlines()
    assert table[0].split() == ["scope", "name", "month", "budget_usd", "spent_usd", "reserved_usd", "remaining_usd"]
    assert table[1].split() == ["tenant", "design", month, "1.000000", "0.408734", "0.000000", "0.591266"]


async def test_metrics_export_each_budget_and_its_spend_for_alerts(usage_db, gateway_kit):
    gateway = await gateway_kit.start(gateway_config(usage_db, budgets={"design": {"monthly_usd": 2.5}}))
    async with sdk(gateway) as client:
        await generate(client)
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/metrics") as r:
            exposition = await r.text()
    assert 'gatekeeper_budget_usd{name="design",scope="tenant"} 2.5' in exposition
    assert f'gatekeeper_budget_spent_usd{{name="design",scope="tenant"}} {COST / 1e6}' in exposition
    assert 'gatekeeper_budget_reserved_usd{name="design",scope="tenant"} 0.0' in exposition


def test_a_new_month_starts_from_zero_spend():
    from decimal import Decimal

    from gatekeeper.flow import Principal
    from gatekeeper_plugins.metering_budgets import Budget, BudgetLedger, OverBudget

    principal = Principal(key_id="key-design", tenant="design")
    ledger = BudgetLedger({"design": Budget(monthly_usd=Decimal("0.00002"))}, {})  # 20 µ$
    ledger.record("design", "key-design", 15)
    next_month = (datetime.now(UTC).replace(day=28) + timedelta(days=4)).replace(day=1, hour=0, minute=0)
    with pytest.raises(OverBudget):
        ledger.reserve(principal, 10, now=next_month - timedelta(minutes=1))
    assert ledger.reserve(principal, 10, now=next_month) is not None
