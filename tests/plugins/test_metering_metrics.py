"""`GET /metrics` counts requests, tokens, dollars and savings, and times the upstream and the gateway."""

from __future__ import annotations

import asyncio

import aiohttp
import msgspec
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from metering_support import DESIGN_KEY, ReplayCache, gateway_config, usage_db  # noqa: F401

PROMPT = "a red fox in the snow"
STORED_USAGE = {"input_tokens": 6, "input_tokens_details": {"text_tokens": 6, "image_tokens": 0}, "output_tokens": 272}


async def scrape(url: str) -> dict[tuple[str, tuple], float]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/metrics") as response:
            text = await response.text()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples, metric: str, **labels: str) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


async def test_requests_tokens_and_cost_are_counted_by_tenant_and_model(usage_db, gateway_kit):
    gateway = await gateway_kit.start(gateway_config(usage_db))
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as client:
        for _ in range(2):
            await client.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024")
    samples = await scrape(gateway.url)
    who = {"tenant": "design", "model": "gpt-image-1.5"}
    assert value(samples, "gatekeeper_requests_total", **who, status="200", cache="none") == 2
    assert value(samples, "gatekeeper_tokens_total", **who, direction="output", kind="image") == 544
    assert value(samples, "gatekeeper_tokens_total", **who, direction="input", kind="text") == 12
    assert value(samples, "gatekeeper_cost_usd_micros_total", **who) == 2 * 8734
    assert value(samples, "gatekeeper_upstream_latency_seconds_count", model="gpt-image-1.5") == 2
    assert value(samples, "gatekeeper_overhead_seconds_count", route="images/generations") == 2


async def test_a_hit_counts_its_saving_and_no_upstream_tokens(usage_db, gateway_kit):
    body = msgspec.json.encode({"created": 1, "data": [{"b64_json": "iVBORw0KGgo="}]})
    gateway = await gateway_kit.start(gateway_config(usage_db), plugins=[ReplayCache(body, STORED_USAGE)])
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as client:
        await client.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024")
    samples = await scrape(gateway.url)
    who = {"tenant": "design", "model": "gpt-image-1.5"}
    assert value(samples, "gatekeeper_requests_total", **who, status="200", cache="hit") == 1
    assert value(samples, "gatekeeper_saved_usd_micros_total", **who) == 8734
    assert value(samples, "gatekeeper_tokens_total", **who, direction="output", kind="image") == 0
    assert value(samples, "gatekeeper_upstream_latency_seconds_count", model="gpt-image-1.5") == 0


async def test_made_up_model_names_share_one_series(usage_db, gateway_kit):
    gateway = await gateway_kit.start(gateway_config(usage_db))
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as client:
        for name in ("made-up-1", "made-up-2"):
            await client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
    samples = await scrape(gateway.url)
    assert value(samples, "gatekeeper_requests_total", tenant="design", model="other", status="200", cache="none") == 2
    assert value(samples, "gatekeeper_unpriced_requests_total", model="other") == 2


async def test_the_in_flight_gauge_counts_requests_being_served(usage_db, gateway_kit, fake_upstream):
    fake_upstream.inject(path="/v1/images/generations", status=200, delay_s=0.5)
    gateway = await gateway_kit.start(gateway_config(usage_db))
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as client:
        slow = asyncio.create_task(
            client.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024"))
        await asyncio.sleep(0.2)
        during = value(await scrape(gateway.url), "gatekeeper_in_flight_requests")
        await slow
    assert during == 1
    assert value(await scrape(gateway.url), "gatekeeper_in_flight_requests") == 0


async def test_a_budget_refusal_is_counted(usage_db, gateway_kit):
    gateway = await gateway_kit.start(gateway_config(usage_db, budgets={"design": {"monthly_usd": 0.001}}))
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as client:
        with pytest.raises(openai.RateLimitError):
            await client.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024")
    samples = await scrape(gateway.url)
    assert value(samples, "gatekeeper_budget_refusals_total", scope="tenant", name="design") == 1
    assert value(samples, "gatekeeper_requests_total", tenant="design", model="gpt-image-1.5", status="429",
                 cache="none") == 1
