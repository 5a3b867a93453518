"""The normalize plugin: equivalent requests share one canonical form; different ones never do."""

from __future__ import annotations

import hashlib
import unicodedata

import msgspec
import pytest
from cache_support import EDITS, GENERATIONS, multipart, post

from gatekeeper import hookimpl
from gatekeeper.testing.fake_upstream import png_bytes
from gatekeeper_plugins.normalize import canonical_form_request, canonical_json_request

BASE = {"model": "gpt-image-1.5", "prompt": "a red fox in the snow"}
PNG_A = png_bytes("a")
PNG_B = png_bytes("b")
MASK = png_bytes("mask")


def canonical(body: dict, route: str = "images/generations") -> bytes:
    return canonical_json_request(route, body)[0]


async def form_canonical(fields: list, boundary: str | None = None, route: str = "images/edits") -> bytes:
    body, content_type = multipart(fields, boundary)
    return (await canonical_form_request(route, content_type, body))[0]


# ---------------------------------------------------------------- what doesn't change the form


def test_key_order_does_not_change_the_canonical_form():
    assert canonical({"prompt": "a red fox in the snow", "model": "gpt-image-1.5"}) == canonical(BASE)


def test_prompt_whitespace_is_trimmed_and_collapsed():
    assert canonical({**BASE, "prompt": "  a red\tfox \n in   the snow "}) == canonical(BASE)


def test_prompt_is_compared_in_unicode_nfc():
    composed = {**BASE, "prompt": unicodedata.normalize("NFC", "café au lait")}
    decomposed = {**BASE, "prompt": unicodedata.normalize("NFD", "café au lait")}
    assert composed["prompt"] != decomposed["prompt"]
    assert canonical(composed) == canonical(decomposed)


@pytest.mark.parametrize("field, default", [
    ("n", 1), ("stream", False), ("quality", "auto"), ("size", "auto"), ("output_format", "png"),
    ("output_compression", 100), ("background", "auto"), ("moderation", "auto"),
])
def test_an_omitted_gpt_image_parameter_equals_its_default(field, default):
    assert canonical({**BASE, field: default}) == canonical(BASE)


def test_partial_images_defaults_to_zero_only_when_streaming():
    streaming = {**BASE, "stream": True}
    assert canonical({**streaming, "partial_images": 0}) == canonical(streaming)
    assert canonical({**BASE, "partial_images": 0}) != canonical(BASE)


def test_null_fields_equal_omitted_ones():
    assert canonical({**BASE, "n": None, "user": None}) == canonical(BASE)


def test_numbers_are_compared_as_values():
    assert canonical({**BASE, "n": 2.0}) == canonical({**BASE, "n": 2})


def test_a_generation_without_model_is_dall_e_2_with_its_defaults():
    implicit = canonical({"prompt": "a fox"})
    assert implicit == canonical({"prompt": "a fox", "model": "dall-e-2", "n": 1, "size": "1024x1024",
                                  "response_format": "url", "quality": "standard"})


def test_a_gpt_image_only_parameter_implies_a_gpt_image_model():
    assert canonical({"prompt": "a fox", "output_format": "webp"}) == canonical(
        {"prompt": "a fox", "output_format": "webp", "model": "gpt-image-1.5"})


def test_dall_e_3_style_defaults_to_vivid():
    dalle3 = {"model": "dall-e-3", "prompt": "a fox"}
    assert canonical({**dalle3, "style": "vivid"}) == canonical(dalle3)
    assert canonical({**dalle3, "style": "natural"}) != canonical(dalle3)


def test_an_edit_without_model_is_gpt_image_1_5():
    assert canonical({"prompt": "x", "images": []}, "images/edits") == canonical(
        {"prompt": "x", "images": [], "model": "gpt-image-1.5"}, "images/edits")


def test_embeddings_omitted_encoding_format_means_float_not_base64():
    request = {"model": "text-embedding-3-small", "input": "hello"}
    assert canonical(request, "embeddings") == canonical({**request, "encoding_format": "float"}, "embeddings")
    assert canonical(request, "embeddings") != canonical({**request, "encoding_format": "base64"}, "embeddings")


def test_embedding_input_whitespace_is_kept():
    request = {"model": "text-embedding-3-small", "input": "hello  world"}
    assert canonical(request, "embeddings") != canonical({**request, "input": "hello world"}, "embeddings")


def test_unknown_fields_are_kept_typed():
    assert canonical({**BASE, "frame_count": 4}) != canonical(BASE)
    assert canonical({**BASE, "frame_count": 4}) != canonical({**BASE, "frame_count": "4"})


def test_canonical_form_is_sorted_json_of_the_defaulted_body():
    decoded = msgspec.json.decode(canonical(BASE))
    assert decoded["body"]["model"] == "gpt-image-1.5"
    assert decoded["body"]["n"] == 1
    assert list(decoded["body"]) == sorted(decoded["body"])


# ---------------------------------------------------------------- what does change it


@pytest.mark.parametrize("field, value", [
    ("model", "gpt-image-1"), ("n", 2), ("size", "1024x1536"), ("quality", "high"), ("output_format", "webp"),
    ("output_compression", 80), ("background", "opaque"), ("moderation", "low"), ("stream", True),
    ("prompt", "a red fox in the rain"),
])
def test_changing_a_parameter_changes_the_canonical_form(field, value):
    assert canonical({**BASE, field: value}) != canonical(BASE)


def test_changing_partial_images_changes_the_canonical_form():
    streaming = {**BASE, "stream": True}
    assert canonical({**streaming, "partial_images": 2}) != canonical(streaming)


def test_prompt_case_is_significant():
    assert canonical({**BASE, "prompt": "A red fox in the snow"}) != canonical(BASE)


# ---------------------------------------------------------------- multipart


EDIT_FIELDS = [("model", "gpt-image-1.5"), ("prompt", "add a hat"), ("image[]", PNG_A), ("image[]", PNG_B)]


async def test_multipart_boundary_and_filenames_do_not_change_the_form():
    assert await form_canonical(EDIT_FIELDS, "b1") == await form_canonical(EDIT_FIELDS, "b2")


async def test_multipart_text_field_order_does_not_change_the_form():
    reordered = [EDIT_FIELDS[1], EDIT_FIELDS[0], *EDIT_FIELDS[2:]]
    assert await form_canonical(reordered) == await form_canonical(EDIT_FIELDS)


async def test_image_order_changes_the_form():
    swapped = [*EDIT_FIELDS[:2], EDIT_FIELDS[3], EDIT_FIELDS[2]]
    assert await form_canonical(swapped) != await form_canonical(EDIT_FIELDS)


async def test_image_bytes_change_the_form():
    changed = [*EDIT_FIELDS[:3], ("image[]", png_bytes("c"))]
    assert await form_canonical(changed) != await form_canonical(EDIT_FIELDS)


async def test_a_mask_changes_the_form():
    assert await form_canonical([*EDIT_FIELDS, ("mask", MASK)]) != await form_canonical(EDIT_FIELDS)


async def test_image_and_image_brackets_are_the_same_single_image():
    single = [("prompt", "add a hat"), ("image", PNG_A)]
    bracketed = [("prompt", "add a hat"), ("image[]", PNG_A)]
    assert await form_canonical(single) == await form_canonical(bracketed)


async def test_multipart_strings_become_json_types():
    fields = [("prompt", "add a hat"), ("image", PNG_A), ("n", "2"), ("stream", "true")]
    body, content_type = multipart(fields)
    _, params, _, _ = await canonical_form_request("images/edits", content_type, body)
    assert params["n"] == 2 and params["stream"] is True and params["partial_images"] == 0


async def test_multipart_files_are_keyed_by_sha256():
    body, content_type = multipart(EDIT_FIELDS + [("mask", MASK)])
    _, _, files, _ = await canonical_form_request("images/edits", content_type, body)
    assert files == {"image": [hashlib.sha256(PNG_A).hexdigest(), hashlib.sha256(PNG_B).hexdigest()],
                     "mask": [hashlib.sha256(MASK).hexdigest()]}


async def test_large_uploads_are_hashed_off_the_event_loop_with_the_same_result():
    big = b"\x89PNG" + bytes(3 << 20)
    small_key = await form_canonical([("prompt", "p"), ("image", big)])
    body, content_type = multipart([("prompt", "p"), ("image", big)])
    _, _, files, _ = await canonical_form_request("images/edits", content_type, body)
    assert files["image"] == [hashlib.sha256(big).hexdigest()]
    assert small_key == await form_canonical([("prompt", "p"), ("image", big)], "other")


# ---------------------------------------------------------------- through the gateway


class Seen:
    """Records the canonical form, parameters and model each flow carried past normalization."""

    name = "seen"

    def __init__(self) -> None:
        self.flows: list = []
        self.models: list = []  # (the model normalization left in scratch, flow.model)

    @hookimpl
    def check_request(self, flow) -> None:
        self.flows.append((flow.canonical, flow.scratch.get("normalize"), flow.body))
        self.models.append((flow.scratch.get("model"), flow.model))


async def test_hook_normalize_request_sets_canonical_and_parameters_for_other_plugins(gateway_kit):
    seen = Seen()
    gateway = await gateway_kit.start(plugins=[seen])
    reply = await post(gateway, GENERATIONS, json={"prompt": " a  fox ", "quality": "low", "stream": False,
                                                    "model": "gpt-image-1.5"})
    assert reply.status == 200
    canonical_bytes, params, _ = seen.flows[0]
    assert canonical_bytes == canonical({"model": "gpt-image-1.5", "prompt": "a fox", "quality": "low"})
    assert params["model"] == "gpt-image-1.5" and params["n"] == 1 and params["quality"] == "low"
    assert params["prompt"] == "a fox" and params["stream"] is False and params["size"] == "auto"


async def test_multipart_edit_parameters_list_input_image_hashes(gateway_kit):
    seen = Seen()
    gateway = await gateway_kit.start(plugins=[seen])
    body, content_type = multipart([*EDIT_FIELDS, ("mask", MASK)])
    reply = await post(gateway, EDITS, data=body, headers={"Content-Type": content_type})
    assert reply.status == 200
    _, params, _ = seen.flows[0]
    assert params["input_images"] == [hashlib.sha256(PNG_A).hexdigest(), hashlib.sha256(PNG_B).hexdigest()]
    assert params["mask"] == hashlib.sha256(MASK).hexdigest() and params["multipart"] is True


async def test_the_upstream_gets_the_clients_exact_bytes_by_default(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start()
    raw = b'{ "prompt" : "a   fox",  "model":"gpt-image-1.5" }'
    reply = await post(gateway, GENERATIONS, data=raw, headers={"Content-Type": "application/json"})
    assert reply.status == 200
    assert fake_upstream.calls[-1].body == raw


async def test_rewrite_forwards_the_normalized_body_without_added_defaults(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start({"normalize": {"rewrite": True}})
    raw = b'{ "prompt" : "a   fox",  "model":"gpt-image-1.5", "n": 1.0 }'
    reply = await post(gateway, GENERATIONS, data=raw, headers={"Content-Type": "application/json"})
    assert reply.status == 200
    assert fake_upstream.calls[-1].body == b'{"model":"gpt-image-1.5","n":1,"prompt":"a fox"}'


async def test_chat_is_normalized_only_when_the_cache_lists_it(gateway_kit):
    seen = Seen()
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    gateway = await gateway_kit.start(plugins=[seen])
    await post(gateway, "/v1/chat/completions", json=chat)
    listed = await gateway_kit.start({"cache": {"endpoints": ["chat/completions"]}}, plugins=[seen])
    await post(listed, "/v1/chat/completions", json=chat)
    assert seen.flows[0][0] is None
    assert msgspec.json.decode(seen.flows[1][0])["body"] == {**chat, "n": 1, "stream": False}


async def test_a_body_that_is_not_json_is_refused_with_an_openai_error(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start()
    reply = await post(gateway, GENERATIONS, data=b"{not json", headers={"Content-Type": "application/json"})
    assert reply.status == 400
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert fake_upstream.count(GENERATIONS) == 0


# ---------------------------------------------------------------- memoised canonical forms


async def test_a_repeated_body_gets_the_same_canonical_form_and_a_summary_of_its_own(gateway_kit):
    seen = Seen()
    gateway = await gateway_kit.start(plugins=[seen])
    raw = b'{"model":"gpt-image-1","prompt":"a  fox"}'
    for _ in range(2):
        reply = await post(gateway, GENERATIONS, data=raw, headers={"Content-Type": "application/json"})
        assert reply.status == 200
    (first, first_summary, _), (second, second_summary, _) = seen.flows
    assert first == second == canonical({"model": "gpt-image-1", "prompt": "a fox"})
    assert first_summary == second_summary and first_summary is not second_summary


async def test_the_model_as_sent_is_known_without_decoding_the_body_again(gateway_kit):
    seen = Seen()
    gateway = await gateway_kit.start(plugins=[seen])
    for body in (b'{"model":"gpt-image-1","prompt":"a fox"}', b'{"model":"gpt-image-1","prompt":"a fox"}', b'{"prompt":"a fox"}'):
        await post(gateway, GENERATIONS, data=body, headers={"Content-Type": "application/json"})
    # As sent: a body without a model has none, though normalize's parameters default it to dall-e-2.
    assert seen.models == [("gpt-image-1", "gpt-image-1")] * 2 + [(None, None)]


async def test_a_repeated_body_is_rewritten_the_same_way(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start({"normalize": {"rewrite": True}})
    raw = b'{ "prompt" : "a   fox",  "model":"gpt-image-1.5", "n": 1.0 }'
    for _ in range(2):
        reply = await post(gateway, GENERATIONS, data=raw,
                           headers={"Content-Type": "application/json", "Cache-Control": "no-cache"})
        assert reply.status == 200
    assert [call.body for call in fake_upstream.calls[-2:]] == [b'{"model":"gpt-image-1.5","n":1,"prompt":"a fox"}'] * 2


async def test_a_body_seen_as_json_is_not_keyed_when_sent_as_another_content_type(gateway_kit):
    seen = Seen()
    gateway = await gateway_kit.start(plugins=[seen])
    raw = b'{"model":"gpt-image-1","prompt":"a fox"}'
    await post(gateway, GENERATIONS, data=raw, headers={"Content-Type": "application/json"})
    await post(gateway, GENERATIONS, data=raw, headers={"Content-Type": "text/plain"})
    assert seen.flows[0][0] is not None
    assert seen.flows[1][0] is None and seen.flows[1][1] is None


def test_the_memo_keeps_to_its_byte_budget_dropping_the_oldest_first():
    from gatekeeper_plugins.normalize import _Canonical, _Memo

    memo = _Memo(max_bytes=10_000)
    bodies = [b'{"prompt":"%d"}' % i + b" " * 1000 for i in range(20)]
    value = _Canonical(b"canonical", {}, None, None)
    for body in bodies:
        memo.put("images/generations", body, value)
        assert memo.size <= 10_000
    assert memo.get("images/generations", bodies[0]) is None
    assert memo.get("images/generations", bodies[-1]) == value
    assert memo.size == sum(2 * len(key[1]) + len(b"canonical") + 512 for key in memo.entries)
