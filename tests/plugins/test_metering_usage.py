"""Usage is read from event streams as they pass, keeping one line at most, and from JSON bodies."""

from __future__ import annotations

import json

import msgspec
import pytest

from gatekeeper.images_body import skim_images_body
from gatekeeper_plugins.metering_prices import Tokens
from gatekeeper_plugins.metering_usage import (JsonSummary, SseUsageScanner, add_usage, summarize_json,
                                               tokens_from_usage)

BIG_B64 = "iVBORw0KGgo" * 200_000  # about 2 MB, like a real partial image


def event(name: str | None, payload: dict) -> bytes:
    head = b"" if name is None else b"event: " + name.encode() + b"\n"
    return head + b"data: " + msgspec.json.encode(payload) + b"\n\n"


def image_stream(images: int = 1, partials: int = 2) -> bytes:
    out = b""
    for index in range(images):
        for _ in range(partials):
            out += event("image_generation.partial_image",
                         {"type": "image_generation.partial_image", "b64_json": BIG_B64, "partial_image_index": 0})
        usage = {"total_tokens": 478 if index == 0 else 472, "input_tokens": 6 if index == 0 else 0,
                 "output_tokens": 472, "input_tokens_details": {"text_tokens": 6 if index == 0 else 0,
                                                                "image_tokens": 0}}
        out += event("image_generation.completed",
                     {"type": "image_generation.completed", "b64_json": BIG_B64, "usage": usage})
    return out


def scan(stream: bytes, chunk_size: int) -> SseUsageScanner:
    scanner = SseUsageScanner()
    for start in range(0, len(stream), chunk_size):
        scanner.feed(stream[start:start + chunk_size])
    return scanner


@pytest.mark.parametrize("chunk_size", [7, 159, 160, 161, 4096, 65536, 10**8])
def test_image_stream_usage_is_found_whatever_the_chunk_boundaries(chunk_size):
    scanner = scan(image_stream(), chunk_size)
    assert (scanner.usage["input_tokens"], scanner.usage["output_tokens"], scanner.completed_images) == (6, 472, 1)


def test_a_stream_fed_one_byte_at_a_time_gives_the_same_usage():
    stream = event("image_generation.partial_image", {"type": "image_generation.partial_image", "b64_json": "QUJD"})
    stream += event("image_generation.completed", {"type": "image_generation.completed", "b64_json": "QUJD",
                                                   "usage": {"input_tokens": 6, "output_tokens": 472}})
    assert scan(stream, 1).usage == {"input_tokens": 6, "output_tokens": 472}


def test_a_two_image_stream_sums_its_completed_usages():
    scanner = scan(image_stream(images=2), 65536)
    assert scanner.usage == {"total_tokens": 950, "input_tokens": 6, "output_tokens": 944,
                             "input_tokens_details": {"text_tokens": 6, "image_tokens": 0}}
    assert scanner.completed_images == 2


def test_partial_image_lines_are_skipped_without_being_kept():
    scanner = SseUsageScanner()
    partial = event("image_generation.partial_image",
                    {"type": "image_generation.partial_image", "b64_json": BIG_B64, "partial_image_index": 0})
    held = []
    for start in range(0, len(partial), 65536):
        scanner.feed(partial[start:start + 65536])
        held.append(scanner.buffered_bytes)
    assert max(held) <= 160  # at most the first bytes of a line, read to decide


def test_event_lines_are_optional_the_type_field_decides():
    stream = image_stream().replace(b"event: image_generation.partial_image\n", b"").replace(
        b"event: image_generation.completed\n", b"")
    assert scan(stream, 65536).usage["output_tokens"] == 472


def test_crlf_line_endings_are_understood():
    assert scan(image_stream().replace(b"\n", b"\r\n"), 65536).usage["output_tokens"] == 472


def test_a_chat_stream_yields_the_usage_of_its_last_chunk_and_ignores_done():
    stream = event(None, {"id": "c", "object": "chat.completion.chunk", "choices": [{"delta": {"content": "hi"}}],
                          "usage": None})
    stream += event(None, {"id": "c", "model": "gpt-4o-mini-2024-07-18", "choices": [],
                           "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
    stream += b"data: [DONE]\n\n"
    scanner = scan(stream, 5)
    assert scanner.usage == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert scanner.model == "gpt-4o-mini-2024-07-18"


def test_a_chat_stream_without_a_usage_chunk_has_no_usage():
    stream = event(None, {"id": "c", "choices": [{"delta": {"content": "hi"}}]}) + b"data: [DONE]\n\n"
    assert scan(stream, 64).usage is None


@pytest.mark.parametrize("terminal", ["response.completed", "response.incomplete", "response.failed"])
def test_a_responses_stream_yields_the_usage_of_its_terminal_event(terminal):
    stream = event("response.created", {"type": "response.created", "response": {"usage": None, "model": "gpt-4.1"}})
    stream += event("response.output_text.delta", {"type": "response.output_text.delta", "delta": "hi"})
    stream += event(terminal, {"type": terminal, "response": {"model": "gpt-4.1-2025-04-14",
                                                              "usage": {"input_tokens": 4, "output_tokens": 5}}})
    scanner = scan(stream, 33)
    assert (scanner.usage, scanner.model) == ({"input_tokens": 4, "output_tokens": 5}, "gpt-4.1-2025-04-14")


def test_image_usage_splits_text_and_image_tokens_both_ways():
    usage = {"input_tokens": 136, "input_tokens_details": {"text_tokens": 6, "image_tokens": 130},
             "output_tokens": 282, "output_tokens_details": {"image_tokens": 272, "text_tokens": 10}}
    assert tokens_from_usage(usage, image_route=True) == Tokens(text_input=6, image_input=130, text_output=10,
                                                                image_output=272)


def test_streamed_image_usage_counts_every_output_token_as_an_image_token():
    usage = {"input_tokens": 6, "input_tokens_details": {"text_tokens": 6, "image_tokens": 0}, "output_tokens": 472}
    assert tokens_from_usage(usage, image_route=True) == Tokens(text_input=6, image_output=472)


def test_chat_usage_separates_prompt_cache_hits():
    usage = {"prompt_tokens": 1000, "prompt_tokens_details": {"cached_tokens": 800}, "completion_tokens": 5}
    assert tokens_from_usage(usage, image_route=False) == Tokens(text_input=200, text_cached=800, text_output=5)


def test_embedding_usage_is_all_input():
    assert tokens_from_usage({"prompt_tokens": 9, "total_tokens": 9}, image_route=False) == Tokens(text_input=9)


def test_a_usage_without_token_counts_is_no_usage():
    assert tokens_from_usage({"something": 1}, image_route=False) is None
    assert tokens_from_usage({"input_tokens": "many"}, image_route=False) is None


def test_summing_usages_adds_nested_counts():
    assert add_usage({"a": 1, "d": {"x": 2}}, {"a": 3, "d": {"x": 4, "y": 1}, "b": 5}) == {
        "a": 4, "d": {"x": 6, "y": 1}, "b": 5}


def test_a_json_body_is_summarised_without_its_images():
    body = msgspec.json.encode({"created": 1, "data": [{"b64_json": BIG_B64}, {"b64_json": BIG_B64}],
                                "usage": {"input_tokens": 6}, "model": "m"})
    summary = summarize_json(body)
    assert (summary.usage, summary.model, summary.items) == ({"input_tokens": 6}, "m", 2)
    assert summarize_json(b"not json") is None and summarize_json(b"[1, 2]") is None


def test_a_large_images_body_is_skimmed_to_the_same_summary_msgspec_decodes():
    # Skimming finds the members by structure (a base64 string's end by one find); the escaped
    # quotes and backslashes in a revised prompt must not end a string early.
    body = msgspec.json.encode({
        "created": 1, "data": [{"b64_json": BIG_B64, "revised_prompt": 'a "quoted" fox \\ "}]'},
                               {"b64_json": BIG_B64}],
        "background": "opaque", "size": "1024x1024", "usage": {"input_tokens": 6, "output_tokens": 1056},
        "model": "gpt-image-1.5"}, order="deterministic")
    skimmed = summarize_json(b" " + body.replace(b",", b", ") + b"\n", skim=True)
    assert skimmed == summarize_json(body)
    assert (skimmed.usage, skimmed.model, skimmed.items) == ({"input_tokens": 6, "output_tokens": 1056},
                                                             "gpt-image-1.5", 2)


def test_a_pretty_printed_large_images_body_is_skimmed_too():
    answer = {"created": 1, "data": [{"b64_json": BIG_B64}], "usage": {"input_tokens": 6}, "model": "gpt-image-1"}
    body = json.dumps(answer, indent=2).encode()
    assert skim_images_body(body) is not None
    assert summarize_json(body, skim=True) == summarize_json(msgspec.json.encode(answer)) == JsonSummary(
        {"input_tokens": 6}, "gpt-image-1", 1)


@pytest.mark.parametrize("body", [
    b'{"data": [{"b64_json": "' + BIG_B64.encode(),  # cut short
    b'{"data": [{"b64_json": "' + BIG_B64.encode() + b'"}], "usage": {"input_tokens": 1}} trailing',
    b'{"data": [1, {"b64_json": "' + BIG_B64.encode() + b'"}], "usage": {"input_tokens": 1}}',
    b'{"data": [{"b64_json": "' + BIG_B64.encode() + b'"}], "usage": "many"}',
    b'{"data": [{"b64_json": "' + BIG_B64.encode() + b'"}], "usage": [1], "usage": {"input_tokens": 1}}',
])
def test_a_large_images_body_msgspec_would_refuse_is_no_summary(body):
    assert summarize_json(body) is None
    assert summarize_json(body, skim=True) is None


def test_a_large_images_body_with_an_escaped_key_is_read_by_msgspec():
    body = b'{"data": [{"b64_json": "' + BIG_B64.encode() + b'"}], "us\\u0061ge": {"input_tokens": 3}}'
    assert summarize_json(body, skim=True).usage == {"input_tokens": 3}
