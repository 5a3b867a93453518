"""Apps change only base_url: the official openai SDK works through the gateway, sync and async."""

from __future__ import annotations

import asyncio
import base64

import openai
import pytest

from gatekeeper.testing.kit import CLIENT_KEY, UPSTREAM_KEY

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sync_client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0)


async def test_images_generate_returns_png_and_usage(openai_client, fake_upstream):
    result = await openai_client.images.generate(model="gpt-image-1.5", prompt="a red fox", size="1024x1536", quality="high", n=2)
    assert len(result.data) == 2
    assert base64.b64decode(result.data[0].b64_json).startswith(PNG_SIGNATURE)
    assert result.usage.output_tokens_details.image_tokens == 2 * 6240
    assert fake_upstream.count("/v1/images/generations") == 1


async def test_upstream_key_replaces_the_client_key(openai_client, fake_upstream):
    await openai_client.images.generate(model="gpt-image-1.5", prompt="key check")
    sent = fake_upstream.calls[-1].headers.getall("authorization")
    assert sent == [f"Bearer {UPSTREAM_KEY}"]


async def test_sync_client_generates_through_the_gateway(gateway):
    def call():
        with sync_client(gateway) as client:
            return client.images.generate(model="gpt-image-1-mini", prompt="sync fox", quality="low")

    result = await asyncio.to_thread(call)
    assert result.usage.output_tokens == 272
    assert result.data[0].b64_json


async def test_streaming_generate_yields_partials_then_completed(openai_client):
    stream = await openai_client.images.generate(model="gpt-image-1.5", prompt="streamed fox", stream=True, partial_images=2)
    events = [event async for event in stream]
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert events[-1].usage.output_tokens >= 200  # each partial adds 100 output tokens


async def test_edit_with_one_image_sends_image_part(openai_client, fake_upstream):
    result = await openai_client.images.edit(model="gpt-image-1.5", image=("in.png", PNG_SIGNATURE + b"one", "image/png"), prompt="add a hat")
    assert result.data[0].b64_json
    assert fake_upstream.calls[-1].part_names().count("image") == 1


async def test_edit_with_a_list_of_images_sends_image_array_parts(openai_client, fake_upstream):
    images = [("a.png", PNG_SIGNATURE + b"a", "image/png"), ("b.png", PNG_SIGNATURE + b"b", "image/png")]
    result = await openai_client.images.edit(model="gpt-image-1.5", image=images, prompt="merge them")
    assert result.usage.input_tokens_details.image_tokens > 0
    assert fake_upstream.calls[-1].part_names().count("image[]") == 2


async def test_sync_edit_through_the_gateway(gateway, fake_upstream):
    def call():
        with sync_client(gateway) as client:
            return client.images.edit(model="gpt-image-1", image=("x.png", PNG_SIGNATURE + b"sync", "image/png"), prompt="sync edit")

    result = await asyncio.to_thread(call)
    assert result.data[0].b64_json
    assert fake_upstream.count("/v1/images/edits") == 1


async def test_chat_completion_stream_with_usage(openai_client):
    stream = await openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}], stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "hello there" in text
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


async def test_models_list(openai_client):
    models = [model.id async for model in openai_client.models.list()]
    assert "gpt-image-1.5" in models


async def test_embeddings_default_base64_round_trip(openai_client):
    result = await openai_client.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
    assert [len(item.embedding) for item in result.data] == [8, 8]
    assert result.usage.prompt_tokens > 0


async def test_upstream_error_reaches_the_sdk_as_its_own_exception(openai_client, fake_upstream):
    with pytest.raises(openai.BadRequestError) as raised:
        await openai_client.images.generate(model="gpt-image-1.5", prompt="x", response_format="url")
    assert raised.value.code == "unknown_parameter"
    assert raised.value.request_id  # x-request-id passed through


async def test_with_raw_response_exposes_upstream_headers(openai_client):
    raw = await openai_client.images.with_raw_response.generate(model="gpt-image-1.5", prompt="headers please")
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["openai-organization"] == "org-fake"
    assert raw.headers["x-gatekeeper-request-id"].startswith("req_gk_")
