"""An app that changes only `base_url` notices nothing: hundreds of image requests, valid and not,
each sent straight to the upstream and then through the gateway, get the same status and the same
error. The requests come in a random order from a fixed seed, so the cache answers many of them:
normalization may only merge requests the upstream treats alike."""

from __future__ import annotations

import random
from typing import Any

import aiohttp
import msgspec
import pytest

from gatekeeper.testing.fake_upstream import png_bytes
from gatekeeper.testing.kit import CLIENT_KEY, UPSTREAM_KEY

GENERATION_FIELDS: dict[str, list[Any]] = {
    "model": ["gpt-image-1", "gpt-image-1.5", "gpt-image-1-mini", "dall-e-2", "dall-e-3", "no-such-model"],
    "prompt": ["a fox", "  a   fox ", "", 7, "x" * 33_000],
    "n": [1, 2, 4, 10, 11, 0, -1, "2", 1.0, 1.5, True],
    "size": ["auto", "1024x1024", "1536x1024", "256x256", "1792x1024", "999x999", ""],
    "quality": ["auto", "low", "medium", "high", "standard", "hd", "ultra"],
    "response_format": ["url", "b64_json", "jpeg"],
    "output_format": ["png", "jpeg", "webp", "gif"],
    "output_compression": [0, 50, 100, 101, "50"],
    "background": ["auto", "transparent", "opaque", "blue"],
    "moderation": ["auto", "low", "strict"],
    "style": ["vivid", "natural", "weird"],
    "stream": [False],
    "user": ["u1", 5],
}
EDIT_FIELDS: dict[str, list[str]] = {
    "model": ["gpt-image-1", "gpt-image-1.5", "dall-e-2", "dall-e-3", "no-such-model"],
    "prompt": ["blue", "", "  blue  "],
    "n": ["1", "2", "0", "x", "1.0"],
    "size": ["auto", "256x256", "1024x1024", "999x999"],
    "quality": ["low", "high", "standard", "x"],
    "response_format": ["url", "b64_json", "x"],
    "input_fidelity": ["low", "high", "x"],
    "background": ["transparent", "opaque"],
    "output_format": ["png", "jpeg", "gif"],
}
SMALL_PNG, OTHER_PNG = png_bytes("a", 8), png_bytes("b", 16)


def generation(rng: random.Random) -> dict[str, Any]:
    body = {"prompt": rng.choice(GENERATION_FIELDS["prompt"])}
    for name, values in GENERATION_FIELDS.items():
        if name != "prompt" and rng.random() < 0.35:
            body[name] = rng.choice(values)
    return body


def respaced(rng: random.Random, body: dict[str, Any]) -> dict[str, Any]:
    """`body` again, written another way now and then: its keys in another order, its prompt
    spaced differently, `n` as a float or left to its default. The cache takes each for the same
    request: the upstream must answer it the same way too."""
    items = list(body.items())
    rng.shuffle(items)
    again = dict(items)
    if isinstance(again["prompt"], str) and again["prompt"].strip() and rng.random() < 0.5:
        again["prompt"] = "  " + again["prompt"].replace(" ", "   ") + " "
    n = again.get("n")
    if type(n) is int and rng.random() < 0.5:
        again["n"] = float(n)
    elif n == 1 and rng.random() < 0.5:
        del again["n"]
    return again


def edit(rng: random.Random) -> aiohttp.FormData:
    form = aiohttp.FormData(default_to_multipart=True)
    images = rng.random()
    if images < 0.5:
        form.add_field("image", SMALL_PNG, filename="a.png", content_type="image/png")
    elif images < 0.8:
        for _ in range(rng.randint(1, 3)):
            form.add_field("image[]", rng.choice([SMALL_PNG, OTHER_PNG]), filename="b.png", content_type="image/png")
    if rng.random() < 0.3:
        form.add_field("mask", SMALL_PNG, filename="m.png", content_type="image/png")
    for name, values in EDIT_FIELDS.items():
        if name == "prompt" or rng.random() < 0.4:
            form.add_field(name, rng.choice(values))
    return form


async def answer(session: aiohttp.ClientSession, url: str, key: str, hits: list[str] | None = None,
                 **request: Any) -> tuple[int, Any]:
    """The status, and the error for a refusal; `hits` collects the gateway's cache verdicts."""
    async with session.post(url, headers={"Authorization": f"Bearer {key}"}, **request) as response:
        body = await response.read()
        if hits is not None and response.headers.get("x-gatekeeper-cache") == "HIT":
            hits.append(url)
        return response.status, None if response.status == 200 else msgspec.json.decode(body)["error"]


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_generations_answer_through_the_gateway_as_they_answer_straight(gateway, fake_upstream, seed):
    rng = random.Random(seed)
    pool = [generation(rng) for _ in range(80)]
    hits: list[str] = []
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            body = respaced(rng, rng.choice(pool))
            straight = await answer(session, fake_upstream.base_url + "/images/generations", UPSTREAM_KEY, json=body)
            through = await answer(session, gateway.base_url + "/images/generations", CLIENT_KEY, hits, json=body)
            assert through == straight, body
    assert len(hits) >= 10  # the cache answered some: what it merged, the upstream treats alike


@pytest.mark.parametrize("seed", [1])
async def test_edits_answer_through_the_gateway_as_they_answer_straight(gateway, fake_upstream, seed):
    hits: list[str] = []
    async with aiohttp.ClientSession() as session:
        for index in range(200):
            form_seed = f"{seed}-{index % 50}"  # 50 forms, each sent about four times
            # The same form twice: a FormData is consumed when sent.
            straight = await answer(session, fake_upstream.base_url + "/images/edits", UPSTREAM_KEY,
                                    data=edit(random.Random(form_seed)))
            through = await answer(session, gateway.base_url + "/images/edits", CLIENT_KEY, hits,
                                   data=edit(random.Random(form_seed)))
            assert through == straight, form_seed
    assert len(hits) >= 5
