"""An images answer is skimmed: its data[].b64_json strings are found without reading them, and
everything else is left as a small skeleton that decodes like the body."""

from __future__ import annotations

import base64
import json
import random

import msgspec
import pytest

from gatekeeper.images_body import skim_images_body

IMAGES = [base64.b64encode(random.Random(seed).randbytes(3000)).decode() for seed in range(3)]
USAGE = {"input_tokens": 50, "output_tokens": 1056, "input_tokens_details": {"text_tokens": 50, "image_tokens": 0}}


def answer(*items: dict, **members) -> dict:
    return {"created": 1, "data": list(items), "usage": USAGE, "model": "gpt-image-1", **members}


def compact(document: dict) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def pretty(document: dict) -> bytes:
    return json.dumps(document, indent=2).encode()


def values(texts: list[memoryview | None]) -> list:
    return [None if text is None else msgspec.json.decode(text) for text in texts]


class _Item(msgspec.Struct):
    b64_json: msgspec.Raw = msgspec.Raw()


class _Answer(msgspec.Struct):
    data: list[_Item] | None = None


@pytest.mark.parametrize("encode", [compact, pretty])
def test_the_b64_json_values_are_views_of_the_body_and_the_rest_is_a_skeleton(encode):
    document = answer({"b64_json": IMAGES[0], "revised_prompt": "a fox"}, size="1024x1024")
    body = encode(document)
    skimmed = skim_images_body(body)
    assert values(skimmed.b64_json) == [IMAGES[0]]
    assert skimmed.b64_json[0].obj is body
    assert len(skimmed.skeleton) < 400
    assert json.loads(skimmed.skeleton) == answer({"b64_json": "", "revised_prompt": "a fox"}, size="1024x1024")


def test_several_images_come_in_order_and_an_item_without_one_is_none():
    body = pretty(answer({"b64_json": IMAGES[0]}, {"url": "https://x.invalid/1.png"}, {"b64_json": None},
                         {"revised_prompt": "third", "b64_json": IMAGES[2]}))
    assert values(skim_images_body(body).b64_json) == [IMAGES[0], None, None, IMAGES[2]]


def test_key_order_and_blanks_anywhere_are_read_as_json_reads_them():
    body = (b'\r\n {  "usage" :\t{"input_tokens" : 3} ,\n "data"\n:\n[ { "revised_prompt" : "x" ,"b64_json"\t:\t"'
            + IMAGES[1].encode() + b'" } ] , "created":1 }\n')
    skimmed = skim_images_body(body)
    assert values(skimmed.b64_json) == [IMAGES[1]]
    assert json.loads(skimmed.skeleton)["usage"] == {"input_tokens": 3}


def test_escaped_quotes_and_brackets_in_other_strings_do_not_end_them_early():
    prompt = 'a "quoted" fox \\ "}], "b64_json": "AAAA"'
    body = compact(answer({"revised_prompt": prompt, "b64_json": IMAGES[0]}, note='\\"', other=["]", {"}": "\\"}]))
    skimmed = skim_images_body(body)
    assert values(skimmed.b64_json) == [IMAGES[0]]
    assert json.loads(skimmed.skeleton)["data"][0]["revised_prompt"] == prompt


def test_a_b64_json_key_quoted_inside_a_prompt_is_not_an_image():
    body = compact(answer({"revised_prompt": '{"b64_json":"' + IMAGES[1] + '"}', "b64_json": IMAGES[0]},
                          prompt='"b64_json": "' + IMAGES[2] + '"'))
    assert values(skim_images_body(body).b64_json) == [IMAGES[0]]


def test_a_b64_json_outside_the_data_items_stays_in_the_skeleton():
    body = compact(answer({"b64_json": IMAGES[0], "extra": {"b64_json": IMAGES[1]}}, meta={"b64_json": IMAGES[2]}))
    skimmed = skim_images_body(body)
    assert values(skimmed.b64_json) == [IMAGES[0]]
    skeleton = json.loads(skimmed.skeleton)
    assert (skeleton["meta"]["b64_json"], skeleton["data"][0]["extra"]["b64_json"]) == (IMAGES[2], IMAGES[1])


def test_escapes_inside_the_base64_are_handed_over_as_json_text():
    image = IMAGES[0] + "/+/="
    body = compact(answer({"b64_json": image})).replace(b"/", b"\\/")
    skimmed = skim_images_body(body)
    assert bytes(skimmed.b64_json[0]).startswith(b'"') and b"\\/" in bytes(skimmed.b64_json[0])
    assert values(skimmed.b64_json) == [image]


def test_a_value_that_is_not_a_string_is_handed_over_as_it_is():
    body = compact(answer({"b64_json": IMAGES[0]}, {"b64_json": 5}, {"b64_json": None}))
    assert [None if text is None else bytes(text) for text in skim_images_body(body).b64_json][1:] == [b"5", b"null"]


def test_an_answer_without_b64_json_strings_is_not_skimmed():
    assert skim_images_body(compact(answer({"url": "https://x.invalid/1.png"}))) is None
    assert skim_images_body(compact(answer({"b64_json": None}))) is None
    assert skim_images_body(compact({"b64_json": IMAGES[0]})) is None


GOOD = compact(answer({"b64_json": IMAGES[0]}))


@pytest.mark.parametrize("body", [
    GOOD[:len(GOOD) // 2],  # cut short inside the image
    GOOD[:-1],  # cut short after it
    GOOD[:GOOD.index(b'"b64_json"') + 5],
    GOOD + b" trailing",
    GOOD.replace(b'"created":1,', b'"created":1,,'),
    GOOD.replace(b'"created":1', b'"created" 1'),
    GOOD.replace(b'"created":1', b'"created":01x'),
    GOOD.replace(b'"model":"gpt-image-1"', b'"model":"gpt-image-1\\q"'),
    GOOD.replace(b'"data":[', b'"data":[1,'),
    GOOD.replace(b'"data":[{', b'"data":[{"b64_json":"AAAA",'),  # a repeated key
    GOOD.replace(b'"model"', b'"mod\\u0065l"'),  # an escaped key
    GOOD.replace(b'{"b64_json"', b'{"b64\\u005fjson"'),
    b"[" + GOOD + b"]",
    b"",
    b"<html>bad gateway</html>",
])
def test_a_body_it_cannot_be_sure_of_is_none(body):
    assert skim_images_body(body) is None


def test_whatever_it_reads_agrees_with_a_full_decode():
    rng = random.Random(7)
    blanks = ["", " ", "\n  ", "\t", "\r\n"]
    strings = ['a "quoted" \\ b64_json": "x', '"b64_json":"AAAA"', "é\u2028", "}]", "fox"]

    def blank() -> str:
        return rng.choice(blanks)

    def text(value: str) -> str:
        return json.dumps(value, ensure_ascii=rng.random() < 0.5)

    def value(depth: int) -> str:
        if depth > 2 or rng.random() < 0.5:
            return rng.choice(["1", "-2.5e3", "true", "null", text(rng.choice(strings))])
        if rng.random() < 0.5:
            return "[" + ",".join(blank() + value(depth + 1) + blank() for _ in range(rng.randint(0, 3))) + "]"
        return members({rng.choice(["a", "b64_json", "data"]) + str(n): value(depth + 1) for n in range(3)})

    def members(fields: dict[str, str]) -> str:
        keys = [key for key in fields if rng.random() < 0.85]
        rng.shuffle(keys)
        return "{" + ",".join(f"{blank()}{text(key)}{blank()}:{blank()}{fields[key]}{blank()}" for key in keys) + "}"

    def item() -> str:
        image = text(rng.choice(IMAGES)[:rng.randint(0, 80)].replace("/", "\\/" if rng.random() < 0.2 else "/"))
        return members({"b64_json": image if rng.random() < 0.9 else rng.choice(["null", "7", "{}"]),
                        "revised_prompt": text(rng.choice(strings)), "extra": value(1)})

    read = 0
    for _ in range(1500):
        body = blank() + members({"created": "1", "data": "[" + ",".join(item() for _ in range(rng.randint(0, 3))) + "]",
                                  "usage": value(0), "meta": value(0)}) + blank()
        if rng.random() < 0.1:
            body = body[:rng.randrange(len(body))]
        skimmed = skim_images_body(body.encode())
        if skimmed is None:
            continue
        read += 1
        expected = json.loads(body)
        for data_item in expected["data"]:
            if isinstance(data_item.get("b64_json"), str):
                data_item["b64_json"] = ""
        assert json.loads(skimmed.skeleton) == expected
        assert [None if text is None else bytes(text) for text in skimmed.b64_json] == [
            bytes(data_item.b64_json) or None for data_item in msgspec.json.decode(body, type=_Answer).data]
    assert read > 500
