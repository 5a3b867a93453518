"""Returned images are identified by the sha256 of their decoded bytes; C2PA is detected, never touched."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import zlib

import msgspec
import pytest

from gatekeeper.images_body import skim_images_body
from gatekeeper.testing.fake_upstream import jpeg_bytes, png_bytes, webp_bytes
from gatekeeper_plugins.audit_images import analyze_json_body, analyze_responses_body, analyze_sse_body, has_c2pa

MAKERS = {"png": png_bytes, "jpeg": jpeg_bytes, "webp": webp_bytes}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sse(event: str, payload: dict) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + msgspec.json.encode({"type": event, **payload}) + b"\n\n"


@pytest.mark.parametrize("fmt", MAKERS)
def test_c2pa_manifest_is_detected_in_each_format(fmt):
    assert has_c2pa(MAKERS[fmt]("seed", c2pa=True)) is True


@pytest.mark.parametrize("fmt", MAKERS)
def test_no_c2pa_is_reported_for_an_image_without_a_manifest(fmt):
    assert has_c2pa(MAKERS[fmt]("seed")) is False


def test_a_png_text_chunk_mentioning_c2pa_is_not_a_manifest():
    plain = png_bytes("seed")
    iend = plain.rindex(b"IEND") - 4
    text = b"tEXt" + b"comment\x00caBX c2pa"
    chunk = struct.pack(">I", len(text) - 4) + text + struct.pack(">I", zlib.crc32(text))
    assert has_c2pa(plain[:iend] + chunk + plain[iend:]) is False


def test_unknown_formats_have_no_c2pa():
    assert has_c2pa(b"GIF89a....") is False


def test_json_body_hashes_each_decoded_image_in_order():
    images = [png_bytes("a"), png_bytes("b", c2pa=True)]
    body = msgspec.json.encode({"created": 1, "data": [{"b64_json": b64(i)} for i in images], "usage": {}})
    facts = analyze_json_body(body)
    assert facts.sha256 == [sha(images[0]), sha(images[1])]
    assert facts.c2pa == [False, True]


def test_a_pretty_printed_body_is_hashed_from_its_skim_like_a_compact_one():
    images = [png_bytes("a"), png_bytes("b", c2pa=True)]
    answer = {"created": 1, "data": [{"revised_prompt": 'a "fox"', "b64_json": b64(image)} for image in images],
              "usage": {"input_tokens": 1}}
    body = json.dumps(answer, indent=2).encode()
    assert skim_images_body(body) is not None  # the images are found without a full decode
    facts = analyze_json_body(body)
    assert (facts.sha256, facts.c2pa) == ([sha(images[0]), sha(images[1])], [False, True])
    assert facts == analyze_json_body(msgspec.json.encode(answer))


def test_base64_wrapped_in_lines_hashes_the_same_bytes():
    image = png_bytes("wrapped")
    body = msgspec.json.encode({"created": 1, "data": [{"b64_json": base64.encodebytes(image).decode()}]})
    assert analyze_json_body(body).sha256 == [sha(image)]


def test_json_escapes_in_the_base64_read_the_same_bytes():
    image = png_bytes("escaped") + bytes(range(256)) * 4  # enough bytes for a "/" in the base64
    encoded = b64(image)
    assert "/" in encoded
    body = b'{"data":[{"b64_json":"' + encoded.replace("/", "\\/").encode() + b'"}]}'
    assert analyze_json_body(body).sha256 == [sha(image)]


def test_null_and_empty_images_are_skipped_and_a_non_string_one_spoils_the_body():
    image = png_bytes("kept")
    body = msgspec.json.encode({"data": [{"b64_json": None}, {"b64_json": ""}, {"b64_json": b64(image)}]})
    assert analyze_json_body(body).sha256 == [sha(image)]
    odd = msgspec.json.encode({"data": [{"b64_json": b64(image)}, {"b64_json": 5}]})
    assert analyze_json_body(odd).sha256 == []


def test_only_the_data_items_images_are_hashed_wherever_b64_json_appears():
    first, second = png_bytes("first"), png_bytes("second", c2pa=True)
    elsewhere = msgspec.json.encode({"meta": {"b64_json": b64(first)}, "data": [{"b64_json": b64(second)}]})
    assert analyze_json_body(elsewhere).sha256 == [sha(second)]
    spaced = ('{"data":[{"b64_json" : "", "n":1},{"b64_json":"%s"}],"z":{"b64_json":"%s"}}'
              % (b64(first), b64(second))).encode()
    assert analyze_json_body(spaced).sha256 == [sha(first)]
    numbered = ('{"data":[{"b64_json":0},{"b64_json":"%s"}]}' % b64(first)).encode()
    assert analyze_json_body(numbered).sha256 == []


def test_a_body_that_is_not_utf8_yields_no_hashes():
    body = b'{"data":[{"b64_json":"' + b64(png_bytes("x")).encode() + b'"},{"b64_json":"\xff\xfe"}]}'
    assert analyze_json_body(body).sha256 == []


def test_url_responses_yield_no_image_hashes():
    body = msgspec.json.encode({"created": 1, "data": [{"url": "https://example.invalid/a.png"}]})
    assert analyze_json_body(body).sha256 == []


def test_a_stream_hashes_completed_images_and_skips_partials():
    final, partial = png_bytes("final", c2pa=True), png_bytes("partial")
    body = (sse("image_generation.partial_image", {"b64_json": b64(partial), "partial_image_index": 0})
            + sse("image_generation.completed", {"b64_json": b64(final), "usage": {"total_tokens": 1}}))
    facts = analyze_sse_body(body)
    assert facts.sha256 == [sha(final)]
    assert facts.c2pa == [True]


def test_edit_streams_are_read_like_generation_streams():
    final = jpeg_bytes("edit")
    body = sse("image_edit.partial_image", {"b64_json": b64(png_bytes("p"))}) + sse(
        "image_edit.completed", {"b64_json": b64(final)})
    assert analyze_sse_body(body.replace(b"\n", b"\r\n")).sha256 == [sha(final)]


def test_a_body_that_is_not_json_yields_no_hashes():
    assert analyze_json_body(b"<html>bad gateway</html>").sha256 == []


def test_a_responses_object_yields_the_result_of_each_image_generation_call():
    images = [png_bytes("r1"), png_bytes("r2", c2pa=True)]
    body = msgspec.json.encode({"object": "response", "output": [
        {"type": "image_generation_call", "id": "ig_1", "status": "completed", "result": b64(images[0])},
        {"type": "message", "content": [{"type": "output_text", "text": "image_generation_call"}]},
        {"type": "image_generation_call", "id": "ig_2", "status": "failed", "result": None},
        {"type": "image_generation_call", "id": "ig_3", "status": "completed", "result": b64(images[1])},
    ]})
    facts = analyze_responses_body(body, event_stream=False)
    assert facts.sha256 == [sha(images[0]), sha(images[1])] and facts.c2pa == [False, True]


def test_a_responses_stream_yields_the_images_of_output_item_done_only():
    image, partial = png_bytes("final"), png_bytes("partial")
    body = b"".join([
        sse("response.output_item.added", {"item": {"type": "image_generation_call", "id": "ig_1", "result": None}}),
        sse("response.image_generation_call.partial_image", {"item_id": "ig_1", "partial_image_b64": b64(partial)}),
        sse("response.image_generation_call.completed", {"item_id": "ig_1"}),
        sse("response.output_item.done", {"item": {"type": "image_generation_call", "id": "ig_1", "result": b64(image)}}),
        sse("response.completed", {"response": {"output": [
            {"type": "image_generation_call", "id": "ig_1", "result": b64(image)}]}}),
    ])
    assert analyze_responses_body(body, event_stream=True).sha256 == [sha(image)]


@pytest.mark.parametrize("body", [b"", b"{not json", b'{"output": "image_generation_call"}', b'\xff"image_generation_call"'])
def test_a_responses_answer_that_does_not_parse_yields_no_images(body):
    assert analyze_responses_body(body, event_stream=False).sha256 == []
