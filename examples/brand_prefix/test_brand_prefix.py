"""The brand prefix puts each tenant's house style in front of its image prompts, and only its own."""

from __future__ import annotations

import openai
import pytest

from examples.brand_prefix import brand_prefix
from gatekeeper import hookimpl
from gatekeeper.config import ConfigError
from gatekeeper.multipart import form_field

ACME_KEY = "sk-gk-example-acme-0001"
GLOBEX_KEY = "sk-gk-example-globex-0001"
ACME_STYLE = "ACME house style: flat pastel colours, rounded shapes, no text in the image."
TENANTS = {"auth": {"keys": [
    {"id": "acme-app", "key": ACME_KEY, "tenant": "acme"},
    {"id": "globex-app", "key": GLOBEX_KEY, "tenant": "globex"},
]}}
PNG = b"\x89PNG\r\n\x1a\n" + b"pixels"


def client(running, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=running.base_url, api_key=key, max_retries=0)


async def start(gateway_kit, brand: dict, plugins: tuple = ()):
    return await gateway_kit.start({**TENANTS, "brand": brand}, plugins=[brand_prefix, *plugins])


async def test_a_tenants_image_prompt_reaches_the_upstream_after_its_house_style(gateway_kit, fake_upstream):
    running = await start(gateway_kit, {"prefixes": {"acme": ACME_STYLE}})
    async with client(running, ACME_KEY) as acme:
        await acme.images.generate(model="gpt-image-1-mini", prompt="a fox in a meadow", quality="low")
    assert fake_upstream.calls[-1].json()["prompt"] == f"{ACME_STYLE}\n\na fox in a meadow"


async def test_another_tenants_prompt_reaches_the_upstream_unchanged(gateway_kit, fake_upstream):
    running = await start(gateway_kit, {"prefixes": {"acme": ACME_STYLE}})
    async with client(running, GLOBEX_KEY) as globex:
        await globex.images.generate(model="gpt-image-1-mini", prompt="a fox in a meadow", quality="low")
    assert fake_upstream.calls[-1].json()["prompt"] == "a fox in a meadow"


async def test_the_rest_of_the_request_is_kept_as_sent(gateway_kit, fake_upstream):
    running = await start(gateway_kit, {"prefixes": {"acme": ACME_STYLE}})
    async with client(running, ACME_KEY) as acme:
        await acme.images.generate(model="gpt-image-1.5", prompt="a fox", size="1536x1024", quality="low",
                                   background="opaque", n=2)
    sent = fake_upstream.calls[-1].json()
    del sent["prompt"]
    assert sent == {"model": "gpt-image-1.5", "size": "1536x1024", "quality": "low", "background": "opaque", "n": 2}


async def test_a_multipart_edit_gets_the_house_style_and_keeps_its_image_bytes(gateway_kit, fake_upstream):
    running = await start(gateway_kit, {"prefixes": {"acme": ACME_STYLE}})
    async with client(running, ACME_KEY) as acme:
        await acme.images.edit(model="gpt-image-1.5", image=("in.png", PNG, "image/png"), prompt="add a hat",
                               quality="low")
    call = fake_upstream.calls[-1]
    content_type = call.headers["content-type"]
    assert form_field(content_type, call.body, "prompt") == f"{ACME_STYLE}\n\nadd a hat"
    assert form_field(content_type, call.body, "quality") == "low"
    assert PNG in call.body and call.part_names().count("image") == 1


async def test_a_streamed_generation_is_prefixed_too(gateway_kit, fake_upstream):
    running = await start(gateway_kit, {"prefixes": {"acme": ACME_STYLE}})
    async with client(running, ACME_KEY) as acme:
        stream = await acme.images.generate(model="gpt-image-1.5", prompt="a fox", stream=True, partial_images=1)
        events = [event async for event in stream]
    assert events[-1].type == "image_generation.completed"
    assert fake_upstream.calls[-1].json()["prompt"].startswith(ACME_STYLE)


async def test_the_default_house_style_covers_tenants_without_their_own(gateway_kit, fake_upstream):
    running = await start(gateway_kit, {"prefixes": {"acme": ACME_STYLE}, "default": "Corporate blue.",
                                        "separator": " "})
    async with client(running, GLOBEX_KEY) as globex:
        await globex.images.generate(model="gpt-image-1-mini", prompt="a fox", quality="low")
    assert fake_upstream.calls[-1].json()["prompt"] == "Corporate blue. a fox"


async def test_text_routes_are_left_alone(gateway_kit, fake_upstream):
    running = await start(gateway_kit, {"prefixes": {"acme": ACME_STYLE}})
    async with client(running, ACME_KEY) as acme:
        await acme.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert fake_upstream.calls[-1].json()["messages"] == [{"role": "user", "content": "hi"}]


async def test_normalize_impls_after_it_see_the_prefixed_request(gateway_kit):
    """What the cache key is built from: the built-in normalizer runs after the prefix."""
    seen = []

    class LaterNormalizer:
        @hookimpl(trylast=True)
        def normalize_request(self, flow):
            seen.append((flow.json["prompt"], flow.body))

    running = await start(gateway_kit, {"prefixes": {"acme": ACME_STYLE}}, plugins=(LaterNormalizer(),))
    async with client(running, ACME_KEY) as acme:
        await acme.images.generate(model="gpt-image-1-mini", prompt="a fox", quality="low")
    [(prompt, body)] = seen
    assert prompt == f"{ACME_STYLE}\n\na fox"
    assert ACME_STYLE.encode() in body


async def test_an_empty_house_style_is_a_config_error_naming_the_key_and_file(gateway_kit):
    with pytest.raises(ConfigError, match=r"test-config\.toml: \[brand\] prefixes\.acme is empty"):
        await start(gateway_kit, {"prefixes": {"acme": "  "}})


async def test_an_unknown_key_in_its_section_is_a_config_error(gateway_kit):
    with pytest.raises(ConfigError, match=r"test-config\.toml: \[brand\.prefix\]"):
        await start(gateway_kit, {"prefix": {"acme": ACME_STYLE}})


async def generated_cache_status(running, key: str, prompt: str) -> str:
    async with client(running, key) as tenant_client:
        raw = await tenant_client.images.with_raw_response.generate(model="gpt-image-1-mini", prompt=prompt,
                                                                    quality="low")
    return raw.headers["x-gatekeeper-cache"]


async def test_the_house_style_is_part_of_the_cache_key(gateway_kit, fake_upstream):
    """With one cache for every tenant, a prefixed prompt and the bare one are different requests."""
    running = await gateway_kit.start({**TENANTS, "brand": {"prefixes": {"acme": ACME_STYLE}},
                                       "cache": {"scope": "global"}}, plugins=[brand_prefix])
    assert await generated_cache_status(running, ACME_KEY, "a fox") == "MISS"
    assert await generated_cache_status(running, GLOBEX_KEY, "a fox") == "MISS"
    assert await generated_cache_status(running, GLOBEX_KEY, "a fox") == "HIT"
    assert await generated_cache_status(running, ACME_KEY, "a fox") == "HIT"
    assert [call.json()["prompt"] for call in fake_upstream.calls] == [f"{ACME_STYLE}\n\na fox", "a fox"]
