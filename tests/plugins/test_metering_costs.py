"""Every metered response is recorded with its exact cost, through the official SDK.

Expected costs are worked out by hand, in micro-dollars, from the contract's price table
(section 13) and the fake upstream's deterministic usage: a prompt's text tokens are its word
count, an image's output tokens come from the 13.2 table, each partial image adds 100.
Every test runs once on SQLite and once on the real PostgreSQL.
"""

from __future__ import annotations

import io

import openai
import pytest

from gatekeeper.testing.fake_upstream import png_bytes
from metering_support import (  # noqa: F401
    DESIGN_KEY,
    flush,
    gateway_config,
    metering_plugin,
    only,
    usage_db,
    usage_rows,
)

PROMPT = "a red fox in the snow"  # 6 text tokens at the fake upstream
SIZES = ("1024x1024", "1024x1536", "1536x1024")

# Hand-computed: 6 prompt tokens at the text input price + the 13.2 table's output tokens at the
# image output price. gpt-image-1.5: 6 x $5 + tokens x $32; gpt-image-1: 6 x $5 + tokens x $40;
# gpt-image-1-mini: 6 x $2 + tokens x $8 (all per 1M tokens, i.e. micro-dollars per token).
EXPECTED_IMAGE_MICROS = {
    "gpt-image-1.5": {"low": (8734, 13086, 12830), "medium": (33822, 50718, 50206),
                      "high": (133150, 199710, 198686)},
    "chatgpt-image-latest": {"low": (8734, 13086, 12830), "medium": (33822, 50718, 50206),
                             "high": (133150, 199710, 198686)},
    "gpt-image-1": {"low": (10910, 16350, 16030), "medium": (42270, 63390, 62750),
                    "high": (166430, 249630, 248350)},
    "gpt-image-1-mini": {"low": (2188, 3276, 3212), "medium": (8460, 12684, 12556),
                         "high": (33292, 49932, 49676)},
}
OUTPUT_TOKENS = {"low": (272, 408, 400), "medium": (1056, 1584, 1568), "high": (4160, 6240, 6208)}


@pytest.fixture
async def client(usage_db, gateway_kit):
    gateway = await gateway_kit.start(gateway_config(usage_db))
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as sdk:
        sdk.gateway = gateway  # type: ignore[attr-defined]
        yield sdk


async def recorded(client, usage_db):
    await flush(client.gateway)
    return await usage_rows(usage_db)


@pytest.mark.parametrize("model", list(EXPECTED_IMAGE_MICROS))
async def test_each_gpt_image_quality_and_size_costs_exactly_the_table_price(client, usage_db, model):
    for quality, expected in EXPECTED_IMAGE_MICROS[model].items():
        for size in SIZES:
            await client.images.generate(model=model, prompt=PROMPT, quality=quality, size=size)
    rows = await recorded(client, usage_db)
    costs = [row["cost_micros"] for row in rows]
    assert costs == [micros for expected in EXPECTED_IMAGE_MICROS[model].values() for micros in expected]
    assert [row["output_image_tokens"] for row in rows] == [t for tokens in OUTPUT_TOKENS.values() for t in tokens]
    assert all(row["input_text_tokens"] == 6 and row["output_text_tokens"] == 0 for row in rows)
    assert {(row["tenant"], row["key_id"], row["model"], row["outcome"]) for row in rows} == {
        ("design", "key-design", model, "ok")}


async def test_a_stream_with_partial_images_costs_its_completed_usage_once(client, usage_db):
    stream = await client.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024",
                                          stream=True, partial_images=2)
    events = [event.type async for event in stream]
    assert events == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    row = only(await recorded(client, usage_db))
    # 272 image tokens + 2 partials x 100 = 472 output tokens x $32 + 6 text tokens x $5.
    assert (row["output_image_tokens"], row["input_text_tokens"], row["cost_micros"]) == (472, 6, 15134)
    assert row["stream"] is True


async def test_a_two_image_stream_sums_the_usage_of_both_completed_events(client, usage_db):
    stream = await client.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024",
                                          stream=True, partial_images=2, n=2)
    [event async for event in stream]
    row = only(await recorded(client, usage_db))
    # Two images of 472 output tokens; the prompt's 6 tokens are billed once.
    assert (row["output_tokens"], row["input_tokens"], row["cost_micros"]) == (944, 6, 30238)


async def test_an_edit_bills_its_input_images_at_the_image_input_rate(client, usage_db):
    images = [("a.png", io.BytesIO(png_bytes("a")), "image/png"), ("b.png", io.BytesIO(png_bytes("b")), "image/png")]
    await client.images.edit(model="gpt-image-1.5", image=images, prompt=PROMPT, quality="low", size="1024x1024")
    row = only(await recorded(client, usage_db))
    # 2 input images x 65 tokens x $8 + 6 text tokens x $5 + 272 output tokens x $32.
    assert (row["input_image_tokens"], row["input_text_tokens"]) == (130, 6)
    assert row["cost_micros"] == 1040 + 30 + 8704
    assert row["route"] == "images/edits"


async def test_a_dated_snapshot_is_priced_as_its_base_model(client, usage_db):
    await client.images.generate(model="gpt-image-1.5-2025-12-16", prompt=PROMPT, quality="low", size="1024x1024")
    row = only(await recorded(client, usage_db))
    assert (row["model"], row["cost_micros"]) == ("gpt-image-1.5-2025-12-16", 8734)


async def test_dall_e_3_is_billed_per_image_by_quality_and_size(client, usage_db):
    await client.images.generate(model="dall-e-3", prompt=PROMPT, quality="hd", size="1792x1024")
    await client.images.generate(model="dall-e-3", prompt=PROMPT, quality="standard", size="1024x1024")
    rows = await recorded(client, usage_db)
    assert [(row["images"], row["cost_micros"]) for row in rows] == [(1, 120_000), (1, 40_000)]
    assert all(row["input_tokens"] is None for row in rows)


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK marks variations deprecated
async def test_dall_e_2_is_billed_for_every_image_it_returns(client, usage_db):
    await client.images.generate(model="dall-e-2", prompt=PROMPT, n=3, size="512x512")
    await client.images.create_variation(image=("v.png", io.BytesIO(png_bytes("v")), "image/png"), n=2,
                                         size="256x256")
    rows = await recorded(client, usage_db)
    assert [(row["route"], row["images"], row["cost_micros"]) for row in rows] == [
        ("images/generations", 3, 54_000), ("images/variations", 2, 32_000)]


async def test_a_request_is_rounded_half_up_once_not_per_part(client, usage_db):
    # gpt-4o-mini: 3 prompt tokens x $0.15 = 0.45 µ$ + 4 completion tokens x $0.60 = 2.40 µ$.
    # Rounded once: 2.85 -> 3. Rounding each part first would give 0 + 2 = 2.
    await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi there you"}])
    row = only(await recorded(client, usage_db))
    assert (row["input_tokens"], row["output_tokens"], row["cost_micros"]) == (3, 4, 3)


async def test_half_a_micro_dollar_rounds_up(client, usage_db):
    # gpt-4o: 1 prompt token x $2.50 + 2 completion tokens x $10 = 22.5 µ$ -> 23 (half-even would give 22).
    await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hello"}])
    assert only(await recorded(client, usage_db))["cost_micros"] == 23


async def test_a_chat_stream_with_include_usage_is_metered_from_its_last_chunk(client, usage_db):
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi there you"}], stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None
    row = only(await recorded(client, usage_db))
    assert (row["stream"], row["input_tokens"], row["output_tokens"], row["cost_micros"]) == (True, 3, 4, 3)


async def test_a_chat_stream_without_include_usage_is_recorded_as_unmetered(client, usage_db):
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi there you"}], stream=True)
    assert "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]) == \
        "echo: hi there you"
    row = only(await recorded(client, usage_db))
    assert (row["unmetered"], row["cost_micros"], row["input_tokens"], row["status"]) == (True, None, None, 200)


async def test_the_responses_api_is_metered_from_json_and_from_its_completed_event(client, usage_db):
    await client.responses.create(model="gpt-4.1", input="tell me a joke")
    stream = await client.responses.create(model="gpt-4.1", input="tell me a joke", stream=True)
    [event async for event in stream]
    rows = await recorded(client, usage_db)
    # 4 input tokens x $2 + 5 output tokens x $8, both times.
    assert [(row["stream"], row["input_tokens"], row["output_tokens"], row["cost_micros"]) for row in rows] == [
        (False, 4, 5, 48), (True, 4, 5, 48)]


async def test_embeddings_are_metered_from_their_prompt_tokens(client, usage_db):
    await client.embeddings.create(model="text-embedding-3-large", input="one two three four five six seven eight "
                                                                         "nine ten")
    row = only(await recorded(client, usage_db))
    # 10 tokens x $0.13 = 1.3 µ$ -> 1.
    assert (row["input_tokens"], row["output_tokens"], row["cost_micros"]) == (10, 0, 1)


async def test_an_unknown_model_is_recorded_with_its_tokens_and_a_null_cost(client, usage_db):
    await client.chat.completions.create(model="gpt-99-experimental", messages=[{"role": "user", "content": "hi"}])
    await client.chat.completions.create(model="gpt-4o-audio-preview", messages=[{"role": "user", "content": "hi"}])
    rows = await recorded(client, usage_db)
    assert [(row["model"], row["input_tokens"], row["cost_micros"], row["unmetered"]) for row in rows] == [
        ("gpt-99-experimental", 1, None, False), ("gpt-4o-audio-preview", 1, None, False)]


async def test_an_upstream_error_is_recorded_at_no_cost(client, usage_db, fake_upstream):
    fake_upstream.inject(path="/v1/images/generations", status=500)
    with pytest.raises(openai.InternalServerError):
        await client.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024")
    row = only(await recorded(client, usage_db))
    assert (row["status"], row["cost_micros"], row["unmetered"]) == (500, 0, False)


async def test_a_stream_cut_before_its_usage_is_recorded_as_unmetered(client, usage_db, fake_upstream):
    fake_upstream.inject(path="/v1/images/generations", status=200, cut_after_events=1)
    stream = await client.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024",
                                          stream=True, partial_images=2)
    with pytest.raises(openai.APIError):
        [event async for event in stream]
    row = only(await recorded(client, usage_db))
    assert (row["outcome"], row["unmetered"], row["cost_micros"]) == ("truncated", True, None)


async def test_the_flow_carries_usage_and_an_exact_decimal_cost_for_later_plugins(usage_db, gateway_kit):
    from decimal import Decimal

    from gatekeeper import hookimpl

    seen = {}

    class Observer:
        name = "test-observer"

        @hookimpl
        def exchange_complete(self, flow):
            seen.update(usage=flow.usage, cost=flow.cost_usd)

    gateway = await gateway_kit.start(gateway_config(usage_db), plugins=[Observer()])
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as sdk:
        await sdk.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024")
    assert seen["usage"]["output_tokens"] == 272
    assert seen["cost"] == Decimal("0.008734") and isinstance(seen["cost"], Decimal)


async def test_a_metering_failure_does_not_stop_the_hooks_after_it(usage_db, gateway_kit):
    from gatekeeper import hookimpl

    completed = []

    class Observer:
        name = "test-observer"

        @hookimpl
        def exchange_complete(self, flow):
            completed.append(flow.status)

    gateway = await gateway_kit.start(gateway_config(usage_db), plugins=[Observer()])

    def exploding_price(*_args):
        raise RuntimeError("the price table exploded")

    metering_plugin(gateway).prices.token_cost = exploding_price
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as sdk:
        response = await sdk.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024")
    assert response.data and completed == [200]
