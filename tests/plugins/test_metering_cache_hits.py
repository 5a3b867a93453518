"""A cache hit is recorded as a hit that cost nothing (or a fraction) and saved the full price.

`ReplayCache` (metering_support) is a test plugin that answers `cache_lookup` the way the cache
plugin does: it restores the stored entry's `usage` and `annotations` onto the flow and marks it
a HIT. Here its body deliberately carries a different usage than the stored one, so a test fails if metering
re-reads the body instead of trusting what the cache restored. The last test uses the real
cache plugin when it is a built-in.
"""

from __future__ import annotations

import msgspec
import openai
import pytest

from gatekeeper import hookimpl
from gatekeeper.config import BUILTIN_PLUGINS
from metering_support import (  # noqa: F401
    DESIGN_KEY,
    ReplayCache,
    flush,
    gateway_config,
    only,
    usage_db,
    usage_rows,
)

PROMPT = "a red fox in the snow"
STORED_USAGE = {  # gpt-image-1.5, low, 1024x1024: 6 x $5 + 272 x $32 = 8734 µ$
    "input_tokens": 6, "input_tokens_details": {"text_tokens": 6, "image_tokens": 0},
    "output_tokens": 272, "output_tokens_details": {"image_tokens": 272, "text_tokens": 0}, "total_tokens": 278,
}
DECOY_BODY = msgspec.json.encode({
    "created": 1, "data": [{"b64_json": "iVBORw0KGgo="}], "size": "1024x1024", "quality": "low",
    "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2},
})


async def start(usage_db, gateway_kit, replay: ReplayCache, **metering):
    return await gateway_kit.start(gateway_config(usage_db, **metering), plugins=[replay])


async def test_a_replayed_hit_costs_nothing_and_saves_the_stored_usage_price(usage_db, gateway_kit, fake_upstream):
    gateway = await start(usage_db, gateway_kit, ReplayCache(DECOY_BODY, STORED_USAGE))
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as sdk:
        await sdk.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024")
    await flush(gateway)
    row = only(await usage_rows(usage_db))
    assert (row["cache_hit"], row["outcome"], row["cost_micros"], row["saved_micros"]) == (True, "cache_hit", 0, 8734)
    assert (row["input_tokens"], row["output_image_tokens"]) == (6, 272)  # the stored usage, not the body's
    assert fake_upstream.count() == 0


async def test_a_hit_is_charged_the_configured_fraction_rounded_once(usage_db, gateway_kit):
    gateway = await start(usage_db, gateway_kit, ReplayCache(DECOY_BODY, STORED_USAGE), cache_hit_cost_fraction=0.25)
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as sdk:
        await sdk.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024")
    await flush(gateway)
    row = only(await usage_rows(usage_db))
    # 8734 x 0.25 = 2183.5 -> 2184; the saving is still what the upstream call would have cost.
    assert (row["cost_micros"], row["saved_micros"]) == (2184, 8734)


async def test_a_dall_e_hit_saves_its_per_image_price_from_the_stored_image_count(usage_db, gateway_kit):
    replay = ReplayCache(msgspec.json.encode({"created": 1, "data": [{"url": "https://x.invalid/1.png"}] * 5}), None,
                         {"metering": {"model": "dall-e-3", "images": 1}})
    gateway = await start(usage_db, gateway_kit, replay)
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as sdk:
        await sdk.images.generate(model="dall-e-3", prompt=PROMPT, quality="hd", size="1024x1024")
    await flush(gateway)
    row = only(await usage_rows(usage_db))
    assert (row["cache_hit"], row["images"], row["cost_micros"], row["saved_micros"]) == (True, 1, 0, 80_000)


async def test_the_flow_of_a_hit_carries_a_zero_cost_and_the_saving(usage_db, gateway_kit):
    from decimal import Decimal

    seen = {}

    class Observer:
        name = "test-observer"

        @hookimpl
        def exchange_complete(self, flow):
            seen.update(cost=flow.cost_usd, saved=flow.saved_usd)

    gateway = await gateway_kit.start(gateway_config(usage_db),
                                      plugins=[ReplayCache(DECOY_BODY, STORED_USAGE), Observer()])
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as sdk:
        await sdk.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024")
    assert seen == {"cost": Decimal("0.000000"), "saved": Decimal("0.008734")}
    assert str(seen["cost"]) == "0.000000"


@pytest.mark.skipif("cache" not in BUILTIN_PLUGINS, reason="the cache plugin is not a built-in yet")
async def test_a_repeated_request_through_the_real_cache_records_a_miss_then_a_saving(usage_db, gateway_kit,
                                                                                       fake_upstream):
    gateway = await gateway_kit.start(gateway_config(usage_db, cache=True))
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as sdk:
        for _ in range(2):
            await sdk.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024")
    await flush(gateway)
    rows = await usage_rows(usage_db)
    assert [(row["cache_hit"], row["cost_micros"], row["saved_micros"]) for row in rows] == [
        (False, 8734, 0), (True, 0, 8734)]
    assert fake_upstream.count("/v1/images/generations") == 1


@pytest.mark.skipif("cache" not in BUILTIN_PLUGINS, reason="the cache plugin is not a built-in yet")
async def test_a_call_the_cache_finishes_after_its_client_left_is_still_metered(usage_db, gateway_kit, fake_upstream):
    import asyncio

    import aiohttp

    gateway = await gateway_kit.start(gateway_config(usage_db, cache=True))
    fake_upstream.inject(path="/v1/images/generations", status=200, delay_s=0.6)
    body = {"model": "gpt-image-1.5", "prompt": PROMPT, "quality": "low", "size": "1024x1024"}
    headers = {"Authorization": f"Bearer {DESIGN_KEY}"}

    async def post() -> bytes:
        async with aiohttp.ClientSession() as session:
            async with session.post(gateway.base_url + "/images/generations", json=body, headers=headers) as response:
                return await response.read()

    leader = asyncio.create_task(post())
    await asyncio.sleep(0.1)
    follower = asyncio.create_task(post())
    await asyncio.sleep(0.1)
    leader.cancel()  # the leader's client leaves while the image is being made; the follower waits on
    follower_body = await follower
    assert b'"usage"' in follower_body and fake_upstream.count("/v1/images/generations") == 1
    await asyncio.sleep(0.1)
    await flush(gateway)
    rows = await usage_rows(usage_db)
    charged = [row for row in rows if row["outcome"] == "client_abort"]
    assert len(charged) == 1 and charged[0]["cost_micros"] == 8734  # what the upstream billed the leader's call
    assert [row["cache_hit"] for row in rows if row["outcome"] != "client_abort"] == [True]
