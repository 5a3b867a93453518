"""The fake upstream follows the OpenAI wire contract: checked with the official SDK and raw HTTP."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import struct
import time
import zlib
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gatekeeper.testing.fake_upstream import (
    INPUT_IMAGE_TOKENS_PER_IMAGE,
    PNG_SIGNATURE,
    FakeUpstream,
    jpeg_bytes,
    png_bytes,
    webp_bytes,
)

API_KEY = "sk-fake-upstream-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream(api_key=API_KEY)


@pytest.fixture
async def server(fake: FakeUpstream, aiohttp_server) -> TestServer:
    return await aiohttp_server(fake.make_app())


@pytest.fixture
async def http(server: TestServer, aiohttp_client) -> TestClient:
    """A raw HTTP client on the fake that presents the right key."""
    return await aiohttp_client(server, headers=AUTH)


@pytest.fixture
async def sdk(server: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official async SDK pointed straight at the fake, without retries."""
    async with openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=API_KEY, max_retries=0) as client:
        yield client


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk; asserts the signature and every CRC."""
    assert data.startswith(PNG_SIGNATURE)
    chunks, position = [], len(PNG_SIGNATURE)
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        payload = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(kind + payload), f"bad CRC in {kind!r}"
        chunks.append((kind, payload))
        position += 12 + length
    return chunks


# ----------------------------------------------------------------------------- image bytes


def test_png_bytes_is_a_valid_png_of_the_requested_size() -> None:
    chunks = png_chunks(png_bytes("a fox", px=16))
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"caBX" not in kinds
    width, height, depth, colour_type = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (width, height, depth, colour_type) == (16, 16, 8, 2)
    pixels = zlib.decompress(b"".join(payload for kind, payload in chunks if kind == b"IDAT"))
    assert len(pixels) == 16 * (1 + 16 * 3)


def test_png_bytes_is_deterministic_per_seed() -> None:
    assert png_bytes("seed") == png_bytes("seed")
    assert png_bytes("seed") != png_bytes("other seed")


def test_png_bytes_with_c2pa_has_a_cabx_chunk_before_iend() -> None:
    kinds = [kind for kind, _ in png_chunks(png_bytes("a fox", c2pa=True))]
    assert b"caBX" in kinds
    assert kinds.index(b"caBX") < kinds.index(b"IEND")
    cabx = dict(png_chunks(png_bytes("a fox", c2pa=True)))[b"caBX"]
    assert cabx[4:8] == b"jumb" and b"c2pa" in cabx


def test_jpeg_and_webp_bytes_have_their_magic_and_c2pa_containers() -> None:
    jpeg = jpeg_bytes("x", c2pa=True)
    assert jpeg.startswith(b"\xff\xd8") and jpeg.endswith(b"\xff\xd9")
    assert b"\xff\xeb" in jpeg and b"\xff\xeb" not in jpeg_bytes("x")
    webp = webp_bytes("x", c2pa=True)
    assert webp[:4] == b"RIFF" and webp[8:12] == b"WEBP"
    assert struct.unpack("<I", webp[4:8])[0] == len(webp) - 8
    assert b"C2PA" in webp and b"C2PA" not in webp_bytes("x")


# ----------------------------------------------------------------------------- generations


async def test_generate_gpt_image_usage_follows_the_token_table(sdk: openai.AsyncOpenAI) -> None:
    result = await sdk.images.generate(
        model="gpt-image-1.5", prompt="a red fox in snow", quality="high", size="1024x1536", n=2
    )
    assert (result.size, result.quality, result.background, result.output_format) == (
        "1024x1536",
        "high",
        "opaque",
        "png",
    )
    assert len(result.data) == 2
    assert all(base64.b64decode(image.b64_json).startswith(PNG_SIGNATURE) for image in result.data)
    usage = result.usage
    assert usage.output_tokens == 12480 == 2 * 6240
    assert usage.output_tokens_details.image_tokens == 12480
    assert usage.output_tokens_details.text_tokens == 0
    assert usage.input_tokens_details.text_tokens == 5  # one per word of the prompt
    assert usage.input_tokens_details.image_tokens == 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


async def test_generate_resolves_auto_options(sdk: openai.AsyncOpenAI) -> None:
    result = await sdk.images.generate(model="gpt-image-1-mini", prompt="a fox", quality="auto", size="auto")
    assert (result.size, result.quality, result.background) == ("1024x1024", "medium", "opaque")
    assert result.usage.output_tokens == 1056


async def test_generate_without_model_is_dalle2_with_urls_and_no_usage(sdk: openai.AsyncOpenAI) -> None:
    result = await sdk.images.generate(prompt="a fox", n=2)
    assert [image.url.startswith("https://fake-upstream.invalid/img/") for image in result.data] == [True, True]
    assert result.usage is None and result.data[0].revised_prompt is None


async def test_generate_dalle3_b64_has_revised_prompt(sdk: openai.AsyncOpenAI) -> None:
    result = await sdk.images.generate(model="dall-e-3", prompt="a fox", response_format="b64_json")
    assert base64.b64decode(result.data[0].b64_json).startswith(PNG_SIGNATURE)
    assert "a fox" in result.data[0].revised_prompt


async def test_generate_jpeg_and_webp_outputs_carry_c2pa_when_enabled(aiohttp_client) -> None:
    client = await aiohttp_client(FakeUpstream(c2pa=True).make_app())
    for output_format, magic, marker in (("jpeg", b"\xff\xd8", b"\xff\xeb"), ("webp", b"RIFF", b"C2PA")):
        answer = await client.post(
            "/v1/images/generations",
            json={"model": "gpt-image-1.5", "prompt": "a fox", "output_format": output_format},
        )
        image = base64.b64decode((await answer.json())["data"][0]["b64_json"])
        assert image.startswith(magic) and marker in image


async def test_response_format_to_gpt_image_gets_the_exact_unknown_parameter_error(http: TestClient) -> None:
    answer = await http.post(
        "/v1/images/generations", json={"model": "gpt-image-1", "prompt": "a fox", "response_format": "b64_json"}
    )
    assert answer.status == 400
    assert await answer.json() == {
        "error": {
            "message": "Unknown parameter: 'response_format'.",
            "type": "invalid_request_error",
            "param": "response_format",
            "code": "unknown_parameter",
        }
    }


async def test_generate_without_prompt_is_400_naming_prompt(http: TestClient) -> None:
    answer = await http.post("/v1/images/generations", json={"model": "gpt-image-1.5"})
    error = (await answer.json())["error"]
    assert answer.status == 400
    assert (error["type"], error["param"]) == ("invalid_request_error", "prompt")
    assert answer.content_type == "application/json" and answer.headers["x-request-id"].startswith("req_")


async def test_generate_dalle3_with_two_images_is_a_bad_request(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        await sdk.images.generate(model="dall-e-3", prompt="a fox", n=2)


@pytest.mark.parametrize("body", [b"{not json", b'{"prompt":"\xff"}', b'{"prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}"],
                         ids=["not-json", "not-utf8", "nested-100k"])
async def test_invalid_json_body_is_400(http: TestClient, body: bytes) -> None:
    answer = await http.post("/v1/images/generations", data=body, headers={"Content-Type": "application/json"})
    assert answer.status == 400
    assert (await answer.json())["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("n", "status"), [(2.0, 200), (1.5, 400), (True, 400), ("2", 400)])
async def test_an_integer_field_takes_any_json_number_without_a_fraction(http: TestClient, n: object, status: int) -> None:
    """As JSON Schema reads `type: integer`, and as the gateway's normalization compares values (1.0 is 1)."""
    answer = await http.post("/v1/images/generations", json={"model": "gpt-image-1", "prompt": "fox", "n": n})
    assert answer.status == status
    if status == 200:
        assert len((await answer.json())["data"]) == 2
    else:
        assert (await answer.json())["error"]["param"] == "n"


async def test_unknown_request_fields_are_ignored(http: TestClient) -> None:
    answer = await http.post(
        "/v1/images/generations", json={"model": "gpt-image-1.5", "prompt": "a fox", "frame_count": 4}
    )
    assert answer.status == 200


# ----------------------------------------------------------------------------- image streaming


async def test_generate_stream_yields_partials_then_completed_with_partial_cost(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.images.generate(
        model="gpt-image-1.5", prompt="a fox", stream=True, partial_images=2, quality="low"
    )
    events = [event async for event in stream]
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    completed = events[-1]
    assert base64.b64decode(completed.b64_json).startswith(PNG_SIGNATURE)
    assert completed.usage.output_tokens == 272 + 200
    assert completed.usage.total_tokens == completed.usage.input_tokens + 472


async def test_image_stream_wire_format_is_event_and_data_pairs_without_done(http: TestClient) -> None:
    answer = await http.post(
        "/v1/images/generations",
        json={"model": "gpt-image-1.5", "prompt": "a fox", "stream": True, "partial_images": 1},
    )
    assert answer.content_type == "text/event-stream"
    text = await answer.text()
    frames = [frame for frame in text.split("\n\n") if frame]
    assert [frame.split("\n")[0] for frame in frames] == [
        "event: image_generation.partial_image",
        "event: image_generation.completed",
    ]
    assert "[DONE]" not in text
    assert "output_tokens_details" not in frames[-1]  # streaming usage has no output details


# ----------------------------------------------------------------------------- edits and variations


async def test_edit_with_one_file_sends_an_image_part(sdk: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    result = await sdk.images.edit(
        model="gpt-image-1.5", image=("in.png", png_bytes("in"), "image/png"), prompt="make it blue"
    )
    assert sorted(fake.calls[-1].part_names()) == ["image", "model", "prompt"]
    assert result.usage.input_tokens_details.image_tokens == INPUT_IMAGE_TOKENS_PER_IMAGE
    assert result.usage.output_tokens == 1056


async def test_edit_with_a_list_of_files_sends_image_bracket_parts(sdk: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    images = [("a.png", png_bytes("a"), "image/png"), ("b.png", png_bytes("b"), "image/png")]
    result = await sdk.images.edit(model="gpt-image-1.5", image=images, prompt="combine", n=2)
    names = fake.calls[-1].part_names()
    assert names.count("image[]") == 2 and "image" not in names
    assert result.usage.input_tokens_details.image_tokens == 2 * INPUT_IMAGE_TOKENS_PER_IMAGE
    assert len(result.data) == 2


async def test_edit_json_variant_takes_image_references(http: TestClient) -> None:
    answer = await http.post(
        "/v1/images/edits",
        json={"prompt": "blue", "images": [{"image_url": "https://example.test/a.png"}, {"file_id": "file-1"}]},
    )
    body = await answer.json()
    assert answer.status == 200
    assert body["usage"]["input_tokens_details"]["image_tokens"] == 2 * INPUT_IMAGE_TOKENS_PER_IMAGE


async def test_edit_without_image_is_400(http: TestClient) -> None:
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("prompt", "blue")
    answer = await http.post("/v1/images/edits", data=form)
    assert answer.status == 400
    assert (await answer.json())["error"]["param"] == "image"


@pytest.mark.parametrize("part_head", [
    b'Content-Disposition: form-data; name="pro',  # a Content-Disposition that does not parse
    b"Content-Disp",  # a part header cut short
], ids=["bad-disposition", "cut-header"])
@pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionHeader")  # aiohttp's own, before ours
async def test_an_edit_whose_multipart_body_will_not_parse_is_400(http: TestClient, part_head: bytes) -> None:
    body = b"--b\r\n" + part_head + b"\r\n\r\nblue\r\n--b--\r\n"
    answer = await http.post("/v1/images/edits", data=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert answer.status == 400
    assert (await answer.json())["error"]["message"] == "Could not parse the multipart/form-data body."


async def test_edit_with_dalle3_is_rejected(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        await sdk.images.edit(model="dall-e-3", image=("in.png", png_bytes("in"), "image/png"), prompt="x")


async def test_edit_stream_uses_image_edit_events(sdk: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    stream = await sdk.images.edit(
        image=("in.png", png_bytes("in"), "image/png"), prompt="blue", stream=True, partial_images=1
    )
    events = [event async for event in stream]
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert events[-1].usage.input_tokens_details.image_tokens == INPUT_IMAGE_TOKENS_PER_IMAGE
    assert re.search(rb'name="stream"\r\n(?:[^\r\n]+\r\n)*\r\ntrue\r\n', fake.calls[-1].body)


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK deprecates variations
async def test_variation_is_dalle2_only_without_usage(sdk: openai.AsyncOpenAI) -> None:
    result = await sdk.images.create_variation(
        image=("in.png", png_bytes("in"), "image/png"), n=2, response_format="b64_json"
    )
    assert len(result.data) == 2 and result.usage is None
    assert all(base64.b64decode(image.b64_json).startswith(PNG_SIGNATURE) for image in result.data)
    with pytest.raises(openai.BadRequestError):
        await sdk.images.create_variation(image=("in.png", png_bytes("in"), "image/png"), model="gpt-image-1")


# ----------------------------------------------------------------------------- text endpoints


async def test_chat_completion_echoes_the_last_user_message(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    )
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.content == "echo: hi"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


async def test_chat_stream_with_include_usage_ends_with_a_usage_chunk(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hello there"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == "echo: hello there"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert all(chunk.usage is None for chunk in chunks[:-1])


async def test_chat_stream_wire_format_is_data_only_and_ends_with_done(http: TestClient) -> None:
    answer = await http.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    frames = [frame for frame in (await answer.text()).split("\n\n") if frame]
    assert all(frame.startswith("data: ") for frame in frames)
    assert frames[-1] == "data: [DONE]"
    assert '"usage"' not in "".join(frames)  # without include_usage no chunk has the key


async def test_responses_create_and_stream(sdk: openai.AsyncOpenAI) -> None:
    response = await sdk.responses.create(model="gpt-4o-mini", input="hello")
    assert (response.object, response.status, response.output_text) == ("response", "completed", "echo: hello")
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    stream = await sdk.responses.create(model="gpt-4o-mini", input="hello", stream=True)
    events = [event async for event in stream]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "echo: hello"
    assert events[-1].response.usage.output_tokens == 2


async def test_responses_with_the_image_generation_tool_return_an_image_call_then_the_message(
        sdk: openai.AsyncOpenAI) -> None:
    response = await sdk.responses.create(model="gpt-4.1", input="a fox", tools=[{"type": "image_generation"}])
    call, message = response.output
    assert (call.type, call.status, message.type) == ("image_generation_call", "completed", "message")
    assert base64.b64decode(call.result).startswith(b"\x89PNG")
    stream = await sdk.responses.create(model="gpt-4.1", input="a fox", stream=True,
                                        tools=[{"type": "image_generation", "partial_images": 1}])
    events = [event async for event in stream]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    image_events = [event.type for event in events if "image_generation_call" in event.type]
    assert image_events == ["response.image_generation_call.in_progress", "response.image_generation_call.generating",
                            "response.image_generation_call.partial_image", "response.image_generation_call.completed"]
    done = [event.item for event in events if event.type == "response.output_item.done"]
    assert done[0].type == "image_generation_call" and done[0].result == call.result  # the same prompt, the same image
    assert events[-1].response.output[0].result == call.result


async def test_embeddings_sdk_default_asks_base64_and_decodes_the_float_vectors(
    sdk: openai.AsyncOpenAI, fake: FakeUpstream
) -> None:
    decoded = await sdk.embeddings.create(model="text-embedding-3-small", input=["a cat", "a dog"])
    assert fake.calls[-1].json()["encoding_format"] == "base64"
    floats = await sdk.embeddings.create(
        model="text-embedding-3-small", input=["a cat", "a dog"], encoding_format="float"
    )
    assert [item.embedding for item in decoded.data] == [item.embedding for item in floats.data]
    assert len(decoded.data[0].embedding) == 8 and decoded.data[0].embedding != decoded.data[1].embedding
    assert decoded.usage.prompt_tokens == 4
    resized = await sdk.embeddings.create(model="text-embedding-3-small", input="a cat", dimensions=16)
    assert len(resized.data[0].embedding) == 16


async def test_models_list_retrieve_and_unknown_model(sdk: openai.AsyncOpenAI) -> None:
    ids = {model.id async for model in sdk.models.list()}
    assert {"gpt-image-1.5", "gpt-image-1", "gpt-image-1-mini", "dall-e-2", "dall-e-3"} <= ids
    assert {"gpt-4o-mini", "text-embedding-3-small"} <= ids
    assert (await sdk.models.retrieve("dall-e-3")).id == "dall-e-3"
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


async def test_unknown_path_is_an_openai_404_and_recorded(http: TestClient, fake: FakeUpstream) -> None:
    answer = await http.post("/v1/nope", json={})
    assert answer.status == 404
    assert (await answer.json())["error"]["message"] == "Invalid URL (POST /v1/nope)"
    assert fake.count("/v1/nope") == 1


# ----------------------------------------------------------------------------- files and uploads

JSONL = b'{"custom_id": "1", "method": "POST", "url": "/v1/embeddings", "body": {}}\n'


async def test_a_file_is_created_retrieved_downloaded_listed_and_deleted(sdk: openai.AsyncOpenAI) -> None:
    created = await sdk.files.create(file=("data.jsonl", JSONL), purpose="batch")
    assert re.fullmatch(r"file-[0-9a-f]+", created.id)
    assert (created.object, created.bytes, created.filename, created.purpose, created.status) == (
        "file", len(JSONL), "data.jsonl", "batch", "processed"
    )
    assert abs(created.created_at - time.time()) < 5
    assert await sdk.files.retrieve(created.id) == created
    assert (await sdk.files.content(created.id)).content == JSONL
    assert [file.id async for file in sdk.files.list()] == [created.id]
    deleted = await sdk.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    assert [file.id async for file in sdk.files.list()] == []


async def test_file_list_has_the_spec_shape_newest_first_and_filters_by_purpose(
    sdk: openai.AsyncOpenAI, http: TestClient
) -> None:
    older = await sdk.files.create(file=("a.jsonl", JSONL), purpose="batch")
    newer = await sdk.files.create(file=("b.txt", b"notes"), purpose="user_data")
    listed = await (await http.get("/v1/files")).json()
    assert listed == {
        "object": "list",
        "data": [newer.model_dump(exclude_unset=True), older.model_dump(exclude_unset=True)],
        "first_id": newer.id,
        "last_id": older.id,
        "has_more": False,
    }
    assert [f["id"] for f in (await (await http.get("/v1/files?order=asc")).json())["data"]] == [older.id, newer.id]
    assert [f["id"] for f in (await (await http.get("/v1/files?purpose=batch")).json())["data"]] == [older.id]


async def test_file_content_is_the_stored_bytes_as_octet_stream(sdk: openai.AsyncOpenAI, http: TestClient) -> None:
    payload = bytes(range(256)) * 4  # not UTF-8: the bytes come back as sent
    created = await sdk.files.create(file=("blob.bin", payload), purpose="user_data")
    answer = await http.get(f"/v1/files/{created.id}/content")
    assert (answer.status, answer.content_type, await answer.read()) == (200, "application/octet-stream", payload)


async def test_a_batch_file_expires_after_30_days_and_others_do_not(sdk: openai.AsyncOpenAI) -> None:
    batch = await sdk.files.create(file=("a.jsonl", JSONL), purpose="batch")
    kept = await sdk.files.create(file=("a.jsonl", JSONL), purpose="fine-tune")
    assert batch.expires_at == batch.created_at + 30 * 24 * 3600
    assert kept.expires_at is None


async def test_file_create_without_purpose_is_400_naming_purpose(http: TestClient) -> None:
    form = aiohttp.FormData()
    form.add_field("file", JSONL, filename="data.jsonl")
    answer = await http.post("/v1/files", data=form)
    assert answer.status == 400
    assert await answer.json() == {
        "error": {
            "message": "Missing required parameter: 'purpose'.",
            "type": "invalid_request_error",
            "param": "purpose",
            "code": "missing_required_parameter",
        }
    }


async def test_file_create_with_an_unknown_purpose_is_400_listing_the_spec_values(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.files.create(file=("data.jsonl", JSONL), purpose="training")
    error = caught.value.body
    assert (caught.value.code, error["param"], error["type"]) == ("invalid_value", "purpose", "invalid_request_error")
    assert error["message"] == (
        "Invalid value: 'training'. Supported values are: "
        "'assistants', 'batch', 'fine-tune', 'vision', 'user_data', 'evals'."
    )


async def test_file_create_without_a_file_part_is_400_naming_file(http: TestClient) -> None:
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("purpose", "batch")
    answer = await http.post("/v1/files", data=form)
    assert answer.status == 400
    assert (await answer.json())["error"]["param"] == "file"


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/files/file-nope"),
    ("GET", "/v1/files/file-nope/content"),
    ("DELETE", "/v1/files/file-nope"),
])
async def test_an_unknown_file_id_is_404(http: TestClient, method: str, path: str) -> None:
    answer = await http.request(method, path)
    assert answer.status == 404
    assert await answer.json() == {
        "error": {
            "message": "No such File object: file-nope",
            "type": "invalid_request_error",
            "param": "id",
            "code": None,
        }
    }


async def test_a_deleted_file_is_404(sdk: openai.AsyncOpenAI) -> None:
    created = await sdk.files.create(file=("data.jsonl", JSONL), purpose="batch")
    await sdk.files.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await sdk.files.content(created.id)


async def test_an_upload_completes_into_a_file_of_its_parts_in_part_ids_order(sdk: openai.AsyncOpenAI) -> None:
    first, second = b'{"n": 1}\n', b'{"n": 2}\n'
    upload = await sdk.uploads.create(
        filename="big.jsonl", purpose="batch", bytes=len(first + second), mime_type="text/jsonl"
    )
    assert re.fullmatch(r"upload_[0-9a-f]+", upload.id)
    assert (upload.object, upload.status, upload.file) == ("upload", "pending", None)
    assert upload.expires_at == upload.created_at + 3600
    part_2 = await sdk.uploads.parts.create(upload.id, data=second)  # sent first, placed second
    part_1 = await sdk.uploads.parts.create(upload.id, data=first)
    assert re.fullmatch(r"part_[0-9a-f]+", part_1.id) and part_1.id != part_2.id
    assert (part_1.object, part_1.upload_id) == ("upload.part", upload.id)
    completed = await sdk.uploads.complete(upload.id, part_ids=[part_1.id, part_2.id])
    assert (completed.id, completed.status) == (upload.id, "completed")
    assert (completed.file.filename, completed.file.purpose, completed.file.bytes) == (
        "big.jsonl", "batch", len(first + second)
    )
    assert (await sdk.files.content(completed.file.id)).content == first + second
    assert await sdk.files.retrieve(completed.file.id) == completed.file


async def test_completing_an_upload_whose_parts_miss_its_declared_size_is_400(sdk: openai.AsyncOpenAI) -> None:
    upload = await sdk.uploads.create(filename="a.jsonl", purpose="batch", bytes=100, mime_type="text/jsonl")
    part = await sdk.uploads.parts.create(upload.id, data=b"only ten b")
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.uploads.complete(upload.id, part_ids=[part.id])
    assert caught.value.body["type"] == "invalid_request_error"
    assert caught.value.body["message"] == "The Parts add up to 10 bytes, but the Upload was created with bytes=100."
    assert [file.id async for file in sdk.files.list()] == []  # no file was made


async def test_completing_with_a_wrong_md5_is_400_and_the_right_one_passes(sdk: openai.AsyncOpenAI) -> None:
    upload = await sdk.uploads.create(filename="a.txt", purpose="assistants", bytes=5, mime_type="text/plain")
    part = await sdk.uploads.parts.create(upload.id, data=b"hello")
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.uploads.complete(upload.id, part_ids=[part.id], md5="0" * 32)
    assert caught.value.param == "md5"
    completed = await sdk.uploads.complete(upload.id, part_ids=[part.id], md5="5d41402abc4b2a76b9719d911017c592")
    assert completed.status == "completed"


async def test_a_cancelled_upload_takes_no_more_parts(sdk: openai.AsyncOpenAI) -> None:
    upload = await sdk.uploads.create(filename="a.jsonl", purpose="batch", bytes=3, mime_type="text/jsonl")
    cancelled = await sdk.uploads.cancel(upload.id)
    assert (cancelled.id, cancelled.status, cancelled.file) == (upload.id, "cancelled", None)
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.uploads.parts.create(upload.id, data=b"abc")
    assert caught.value.message.endswith("Cannot add parts to an Upload with status 'cancelled'.")


@pytest.mark.parametrize("field", ["filename", "purpose", "bytes", "mime_type"])
async def test_creating_an_upload_without_a_required_field_is_400_naming_it(http: TestClient, field: str) -> None:
    body = {"filename": "a.jsonl", "purpose": "batch", "bytes": 3, "mime_type": "text/jsonl"}
    del body[field]
    answer = await http.post("/v1/uploads", json=body)
    error = (await answer.json())["error"]
    assert (answer.status, error["param"], error["code"]) == (400, field, "missing_required_parameter")


async def test_an_upload_purpose_outside_the_spec_enum_is_400(http: TestClient) -> None:
    # CreateUploadRequest allows fewer purposes than CreateFileRequest: no user_data, no evals.
    body = {"filename": "a.txt", "purpose": "user_data", "bytes": 3, "mime_type": "text/plain"}
    answer = await http.post("/v1/uploads", json=body)
    error = (await answer.json())["error"]
    assert (answer.status, error["param"], error["code"]) == (400, "purpose", "invalid_value")


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/uploads/upload_nope/complete", {"part_ids": []}),
    ("POST", "/v1/uploads/upload_nope/cancel", None),
])
async def test_an_unknown_upload_id_is_404(http: TestClient, method: str, path: str, body: object) -> None:
    answer = await http.request(method, path, json=body)
    assert answer.status == 404
    assert (await answer.json())["error"]["message"] == "No such Upload object: upload_nope"


async def test_a_part_for_an_unknown_upload_is_404(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await sdk.uploads.parts.create("upload_nope", data=b"abc")


async def test_upload_bytes_received_grows_by_each_upload_body(sdk: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    content = b"x" * 300_000
    assert fake.upload_bytes_received == 0
    await sdk.files.create(file=("big.jsonl", content), purpose="batch")
    file_body = len(fake.calls[-1].body)
    assert fake.upload_bytes_received == file_body > len(content)  # the whole multipart body, file part and all
    upload = await sdk.uploads.create(filename="a", purpose="batch", bytes=len(content), mime_type="text/plain")
    await sdk.uploads.parts.create(upload.id, data=content)
    assert fake.upload_bytes_received == file_body + len(fake.calls[-1].body) > file_body + len(content)


async def test_upload_bytes_are_counted_as_they_arrive_before_the_body_ends(
    http: TestClient, fake: FakeUpstream
) -> None:
    boundary = "fakeboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="slow.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    half = b"y" * 65536
    release = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield head + half
        await release.wait()  # the rest is held back until the fake has seen the first piece
        yield half + f"\r\n--{boundary}--\r\n".encode()

    async def first_piece_arrives() -> None:
        while fake.upload_bytes_received < len(head + half):
            await asyncio.sleep(0.005)

    sending = asyncio.create_task(
        http.post("/v1/files", data=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    )
    try:
        await asyncio.wait_for(first_piece_arrives(), timeout=5)
        assert not sending.done() and fake.count("/v1/files") == 0  # the body is still coming in
    finally:
        release.set()
    answer = await sending
    assert (answer.status, (await answer.json())["bytes"]) == (200, 2 * len(half))
    assert fake.calls[-1].body.endswith(f"--{boundary}--\r\n".encode())  # the recorded body is the whole body


async def test_an_upload_cut_short_is_dropped_quietly(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    fake = FakeUpstream(api_key=API_KEY)
    host, port = (await fake.start()).split("//")[1].split("/")[0].split(":")
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/files HTTP/1.1\r\nHost: fake\r\nAuthorization: Bearer " + API_KEY.encode()
                     + b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
                     + b"x" * 50_000)
        await writer.drain()
        while fake.upload_bytes_received < 50_000:
            await asyncio.sleep(0.005)
        writer.close()
        await asyncio.sleep(0.2)  # the fake sees the connection go
    finally:
        await fake.stop()
    assert fake.calls == []
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []


async def test_faults_apply_to_the_upload_routes_after_the_body_is_counted(
    sdk: openai.AsyncOpenAI, fake: FakeUpstream
) -> None:
    fake.inject(path="/v1/files", status=503)
    with pytest.raises(openai.InternalServerError):
        await sdk.files.create(file=("a.jsonl", JSONL), purpose="batch")
    assert fake.upload_bytes_received == len(fake.calls[-1].body) > len(JSONL)
    assert [file.id async for file in sdk.files.list()] == []  # the fault replaced the answer: nothing stored
    assert (await sdk.files.create(file=("a.jsonl", JSONL), purpose="batch")).bytes == len(JSONL)


# ----------------------------------------------------------------------------- headers and auth


async def test_every_response_carries_openai_headers(aiohttp_client) -> None:
    client = await aiohttp_client(FakeUpstream(organization="org-x", project="proj_y").make_app())
    for answer in (await client.get("/v1/models"), await client.post("/v1/embeddings", data=b"[")):
        headers = answer.headers
        assert re.fullmatch(r"req_[0-9a-f]{32}", headers["x-request-id"])
        assert (headers["openai-organization"], headers["openai-project"]) == ("org-x", "proj_y")
        assert headers["openai-version"] == "2020-10-01" and headers["openai-processing-ms"].isdigit()
        assert headers["x-ratelimit-reset-requests"] == "6ms"
        assert int(headers["x-ratelimit-remaining-requests"]) <= int(headers["x-ratelimit-limit-requests"])


async def test_no_project_header_without_a_project(http: TestClient) -> None:
    assert "openai-project" not in (await http.get("/v1/models")).headers


async def test_wrong_key_is_401_and_not_echoed(server: TestServer) -> None:
    async with openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")), api_key="sk-wrong-secret", max_retries=0
    ) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.models.list()
    assert caught.value.code == "invalid_api_key"
    assert "sk-wrong-secret" not in caught.value.response.text


async def test_missing_or_duplicate_authorization_is_401(aiohttp_client, server: TestServer) -> None:
    client = await aiohttp_client(server)
    assert (await client.get("/v1/models")).status == 401
    duplicate = [("Authorization", AUTH["Authorization"]), ("Authorization", AUTH["Authorization"])]
    assert (await client.get("/v1/models", headers=duplicate)).status == 401
    assert (await client.get("/v1/models", headers=AUTH)).status == 200


async def test_recorded_call_keeps_every_header_value(aiohttp_client, fake: FakeUpstream, server: TestServer) -> None:
    client = await aiohttp_client(server)
    await client.get("/v1/models", headers=[*AUTH.items(), ("X-Trace", "1"), ("X-Trace", "2")])
    assert fake.calls[-1].headers.getall("x-trace") == ["1", "2"]
    assert (fake.calls[-1].method, fake.calls[-1].path, fake.calls[-1].body) == ("GET", "/v1/models", b"")


# ----------------------------------------------------------------------------- faults


async def test_fault_429_with_retry_after_raises_rate_limit_error_once(
    sdk: openai.AsyncOpenAI, fake: FakeUpstream
) -> None:
    fake.inject(path="/v1/images/generations", status=429, headers={"retry-after": "1"})
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.images.generate(model="gpt-image-1.5", prompt="a fox")
    error = caught.value
    assert error.code == "rate_limit_exceeded" and "Rate limit reached for requests" in error.message
    assert error.response.headers["retry-after"] == "1" and error.request_id.startswith("req_")
    assert (await sdk.images.generate(model="gpt-image-1.5", prompt="a fox")).data  # consumed after one use
    assert fake.count("/v1/images/generations") == 2


async def test_sdk_retries_past_a_500_fault(server: TestServer, fake: FakeUpstream) -> None:
    fake.inject(status=500, headers={"retry-after-ms": "10"})
    async with openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=API_KEY, max_retries=1) as client:
        models = await client.models.list()
    assert models.data and fake.count("/v1/models") == 2
    assert fake.calls[1].headers["x-stainless-retry-count"] == "1"


async def test_faults_match_their_path_in_fifo_order(http: TestClient, fake: FakeUpstream) -> None:
    fake.inject(path="/v1/embeddings", status=503)
    fake.inject(status=502, times=2)
    statuses = [(await http.get("/v1/models")).status for _ in range(3)]
    assert statuses == [502, 502, 200]
    answer = await http.post("/v1/embeddings", json={"model": "m", "input": "x"})
    assert answer.status == 503
    assert (await answer.json())["error"]["message"].startswith("The engine is currently overloaded")


async def test_fault_with_custom_body_and_content_type(http: TestClient, fake: FakeUpstream) -> None:
    fake.inject(status=502, body=b"<html>bad gateway</html>", headers={"Content-Type": "text/html"})
    answer = await http.get("/v1/models")
    assert (answer.status, answer.content_type, await answer.text()) == (502, "text/html", "<html>bad gateway</html>")


async def test_cut_sse_stream_makes_the_sdk_raise_api_connection_error_after_the_first_event(
    sdk: openai.AsyncOpenAI, fake: FakeUpstream
) -> None:
    fake.inject(status=200, cut_after_events=1)
    stream = await sdk.images.generate(model="gpt-image-1.5", prompt="a fox", stream=True, partial_images=2)
    received = []
    with pytest.raises(openai.APIConnectionError):
        async for event in stream:
            received.append(event.type)
    assert received == ["image_generation.partial_image"]


async def test_cut_after_bytes_truncates_a_json_body(http: TestClient, fake: FakeUpstream) -> None:
    fake.inject(status=200, cut_after_bytes=10)
    answer = await http.get("/v1/models")
    assert answer.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await answer.read()


async def test_reset_closes_the_connection_without_a_response(http: TestClient, fake: FakeUpstream) -> None:
    fake.inject(reset=True)
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await http.get("/v1/models")
    assert fake.count() == 1
    assert (await http.get("/v1/models")).status == 200


async def test_status_200_delay_only_delays_the_normal_response(http: TestClient, fake: FakeUpstream) -> None:
    fake.inject(status=200, delay_s=0.2)
    started = time.monotonic()
    answer = await http.get("/v1/models")
    assert time.monotonic() - started >= 0.2
    assert answer.status == 200 and (await answer.json())["object"] == "list"


async def test_stream_interval_spaces_the_events(http: TestClient, fake: FakeUpstream) -> None:
    fake.stream_interval_s = 0.05
    answer = await http.post(
        "/v1/images/generations",
        json={"model": "gpt-image-1.5", "prompt": "a fox", "stream": True, "partial_images": 2},
    )
    arrivals = []
    async for line in answer.content:
        if line.startswith(b"event:"):
            arrivals.append(time.monotonic())
    assert len(arrivals) == 3 and arrivals[-1] - arrivals[0] >= 0.09


async def test_inject_rejects_nonsense() -> None:
    fake = FakeUpstream()
    with pytest.raises(ValueError):
        fake.inject(status=42)
    with pytest.raises(ValueError):
        fake.inject(times=0)


async def test_http_control_endpoints_inject_list_and_clear(http: TestClient, fake: FakeUpstream) -> None:
    created = await http.post("/__fake/faults", json={"path": "/v1/models", "status": 429, "times": 2})
    assert created.status == 201
    assert (await http.post("/__fake/faults", json={"bogus": 1})).status == 400
    assert (await http.get("/v1/models")).status == 429
    assert (await http.delete("/__fake/faults")).status == 200
    assert (await http.get("/v1/models")).status == 200
    calls = await (await http.get("/__fake/calls")).json()
    assert calls == {"count": 2, "calls": [{"method": "GET", "path": "/v1/models"}] * 2}
    await http.delete("/__fake/calls")
    assert fake.count() == 0


async def test_clear_drops_faults_and_calls(http: TestClient, fake: FakeUpstream) -> None:
    fake.inject(status=500)
    await http.get("/v1/models")
    fake.inject(status=500)
    fake.clear()
    assert fake.count() == 0
    assert (await http.get("/v1/models")).status == 200


# ----------------------------------------------------------------------------- lifecycle


async def test_start_serves_the_sync_sdk_and_stop_closes() -> None:
    fake = FakeUpstream(api_key=API_KEY)
    base_url = await fake.start()
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", base_url) and fake.base_url == base_url

        def generate() -> int:
            with openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as client:
                return client.images.generate(model="gpt-image-1.5", prompt="a fox", quality="low").usage.output_tokens

        assert await asyncio.to_thread(generate) == 272
        assert fake.calls[-1].headers["x-stainless-async"] == "false"
    finally:
        await fake.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session:
            await session.get(f"{base_url}/models")
