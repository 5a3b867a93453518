"""`gatekeeper usage` and `GET /admin/usage` report the same exact sums in every format."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import openai
import pytest

from gatekeeper.server import RunningGateway
from gatekeeper.testing.kit import ADMIN_KEY
from metering_support import DESIGN_KEY, MARKETING_KEY, flush, gateway_config, seed_usage, usage_db  # noqa: F401

PROMPT = "a red fox in the snow"
MONEY = ("cost_usd", "saved_usd")


def usage_cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gatekeeper", "usage", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60)


def report_config(tmp_path: Path, storage: dict) -> Path:
    path = tmp_path / "report.toml"
    path.write_text(f'[metering]\ndatabase = "{storage["database"]}"\ntable = "{storage["table"]}"\n')
    return path


def typed(record: dict) -> dict:
    """A CSV or table cell as JSON has it: counts as ints, money as its exact string."""
    out = {}
    for name, value in record.items():
        if name in MONEY or not re.fullmatch(r"-?\d+", value or ""):
            out[name] = None if value in ("", "-") else value
        else:
            out[name] = int(value)
    return out


def parse_table(text: str) -> list[dict]:
    lines = text.splitlines()
    header = lines[0].split()
    rows = []
    for line in lines[1:]:
        if line.startswith("-") or line.startswith("TOTAL"):
            break
        rows.append(typed(dict(zip(header, line.split()))))
    return rows


@dataclass
class Recorded:
    gateway: RunningGateway
    config: Path  # for `gatekeeper usage --config`

    @property
    def url(self) -> str:
        return self.gateway.url


@pytest.fixture
async def recorded(usage_db, gateway_kit, tmp_path):
    """Usage of two tenants, written through a real gateway, and a config file for the CLI."""
    gateway = await gateway_kit.start(gateway_config(usage_db))
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as design, \
            openai.AsyncOpenAI(base_url=gateway.base_url, api_key=MARKETING_KEY, max_retries=0) as marketing:
        for _ in range(2):
            await design.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024")
        await design.chat.completions.create(model="gpt-4o-mini",
                                             messages=[{"role": "user", "content": "hi there you"}])
        await marketing.images.generate(model="dall-e-3", prompt=PROMPT, quality="standard", size="1024x1024")
        await marketing.chat.completions.create(model="gpt-99-experimental",
                                                messages=[{"role": "user", "content": "hi"}])
    return Recorded(gateway, report_config(tmp_path, usage_db))


EXPECTED = [
    {"tenant": "design", "model": "gpt-4o-mini", "requests": 1, "cache_hits": 0, "input_tokens": 3,
     "output_tokens": 4, "cost_usd": "0.000003", "saved_usd": "0.000000", "unpriced_requests": 0,
     "unmetered_requests": 0},
    {"tenant": "design", "model": "gpt-image-1.5", "requests": 2, "cache_hits": 0, "input_tokens": 12,
     "output_tokens": 544, "cost_usd": "0.017468", "saved_usd": "0.000000", "unpriced_requests": 0,
     "unmetered_requests": 0},
    {"tenant": "marketing", "model": "dall-e-3", "requests": 1, "cache_hits": 0, "input_tokens": 0,
     "output_tokens": 0, "cost_usd": "0.040000", "saved_usd": "0.000000", "unpriced_requests": 0,
     "unmetered_requests": 0},
    {"tenant": "marketing", "model": "gpt-99-experimental", "requests": 1, "cache_hits": 0, "input_tokens": 1,
     "output_tokens": 2, "cost_usd": "0.000000", "saved_usd": "0.000000", "unpriced_requests": 1,
     "unmetered_requests": 0},
]


async def test_the_admin_route_answers_the_exact_sums_per_tenant_and_model(recorded):
    async with aiohttp.ClientSession() as session:
        async with session.get(recorded.url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
            assert r.status == 200
            assert await r.json() == EXPECTED
            assert r.headers["x-request-id"].startswith("req_gk_")  # like every answer the gateway makes


async def test_the_cli_prints_the_same_json_as_the_admin_route(recorded):
    async with aiohttp.ClientSession() as session:
        async with session.get(recorded.url + "/admin/usage?group_by=tenant,model",
                               headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as response:
            from_route = await response.json()
    printed = usage_cli(recorded.config, "--format", "json")
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == from_route == EXPECTED


async def test_the_table_json_and_csv_forms_agree(recorded):
    await flush(recorded.gateway)
    config = recorded.config
    as_json = json.loads(usage_cli(config, "--format", "json").stdout)
    as_csv = [typed(row) for row in csv.DictReader(io.StringIO(usage_cli(config, "--format", "csv").stdout))]
    table = usage_cli(config, "--format", "table").stdout
    assert as_json == as_csv == parse_table(table) == EXPECTED
    total = table.splitlines()[-1].split()
    assert total[0] == "TOTAL" and "0.057471" in total  # 0.000003 + 0.017468 + 0.040000


async def test_the_admin_route_refuses_a_client_key(recorded):
    async with aiohttp.ClientSession() as session:
        async with session.get(recorded.url + "/admin/usage", headers={"Authorization": f"Bearer {DESIGN_KEY}"}) as r:
            assert r.status in (401, 403)


async def test_usage_groups_by_day_and_key_within_whole_utc_days(usage_db, tmp_path):
    def at(day: str, hour: int) -> float:
        return datetime.strptime(day, "%Y-%m-%d").replace(hour=hour, tzinfo=UTC).timestamp()

    for day, hour, key, micros in (("2026-10-31", 23, "a", 1), ("2026-11-01", 0, "a", 10), ("2026-11-01", 23, "b", 100),
                                   ("2026-11-02", 12, "a", 1000), ("2026-11-03", 0, "a", 10000)):
        await seed_usage(usage_db, tenant="design", key_id=key, cost_micros=micros, when=at(day, hour))
    printed = usage_cli(report_config(tmp_path, usage_db), "--since", "2026-11-01", "--until", "2026-11-02",
                        "--group-by", "day,key", "--format", "json")
    assert printed.returncode == 0, printed.stderr
    assert [(row["day"], row["key"], row["tenant"], row["cost_usd"]) for row in json.loads(printed.stdout)] == [
        ("2026-11-01", "a", "*", "0.000010"), ("2026-11-01", "b", "*", "0.000100"),
        ("2026-11-02", "a", "*", "0.001000")]


async def test_usage_groups_by_a_label_such_as_department(usage_db, tmp_path):
    await seed_usage(usage_db, tenant="design", key_id="a", cost_micros=5, labels={"department": "studio"})
    await seed_usage(usage_db, tenant="print", key_id="b", cost_micros=7, labels={"department": "studio"})
    await seed_usage(usage_db, tenant="web", key_id="c", cost_micros=11, labels={"department": "growth"})
    printed = usage_cli(report_config(tmp_path, usage_db), "--group-by", "label.department", "--format", "json")
    assert [(row["label.department"], row["requests"], row["cost_usd"]) for row in json.loads(printed.stdout)] == [
        ("growth", 1, "0.000011"), ("studio", 2, "0.000012")]


async def test_usage_groups_by_route_to_split_image_chat_and_embedding_spend(usage_db, tmp_path):
    await seed_usage(usage_db, tenant="design", key_id="a", cost_micros=40_000, route="images/generations")
    await seed_usage(usage_db, tenant="design", key_id="a", cost_micros=2_000, route="images/edits")
    await seed_usage(usage_db, tenant="design", key_id="a", cost_micros=300, model="gpt-4o", route="chat/completions")
    await seed_usage(usage_db, tenant="web", key_id="b", cost_micros=50_000, route="images/generations")
    printed = usage_cli(report_config(tmp_path, usage_db), "--group-by", "route", "--format", "json")
    assert printed.returncode == 0, printed.stderr
    assert [(row["route"], row["tenant"], row["model"], row["requests"], row["cost_usd"])
            for row in json.loads(printed.stdout)] == [
        ("chat/completions", "*", "*", 1, "0.000300"), ("images/edits", "*", "*", 1, "0.002000"),
        ("images/generations", "*", "*", 2, "0.090000")]


def test_an_unknown_group_is_refused_with_exit_code_2(tmp_path):
    config = report_config(tmp_path, {"database": f"sqlite:///{tmp_path}/none.db", "table": "usage"})
    printed = usage_cli(config, "--group-by", "tenant,colour")
    assert printed.returncode == 2
    assert "cannot group by 'colour'" in printed.stderr


def test_a_report_on_an_empty_database_says_so_and_creates_nothing(tmp_path):
    config = report_config(tmp_path, {"database": f"sqlite:///{tmp_path}/none.db", "table": "usage"})
    printed = usage_cli(config)
    assert printed.returncode == 0, printed.stderr
    assert "(no usage in this period)" in printed.stdout
    assert not (tmp_path / "none.db").exists()
