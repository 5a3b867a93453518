"""The tenant router sends one tenant to its own upstream and leaves everyone else where they were."""

from __future__ import annotations

import openai
import pytest
import pytest_asyncio

from examples.tenant_router import tenant_router
from gatekeeper.config import ConfigError
from gatekeeper.testing.fake_upstream import FakeUpstream
from gatekeeper.testing.kit import CLIENT_KEY, UPSTREAM_KEY

BANK_KEY = "sk-gk-example-bank-0001"
DEDICATED_UPSTREAM_KEY = "sk-dedicated-upstream-7c1f"
GENERATIONS = "/v1/images/generations"


@pytest_asyncio.fixture
async def dedicated_upstream():
    async with FakeUpstream(api_key=DEDICATED_UPSTREAM_KEY) as upstream:
        yield upstream


def routed_config(dedicated: FakeUpstream) -> dict:
    return {
        "upstreams": {"dedicated": {"base_url": dedicated.base_url, "api_key": DEDICATED_UPSTREAM_KEY,
                                    "models": [], "priority": -1, "max_retries": 0}},
        "tenant_router": {"tenants": {"eu-bank": "dedicated"}},
        "auth": {"keys": [{"id": "test-1", "key": CLIENT_KEY, "tenant": "test"},
                          {"id": "bank-app", "key": BANK_KEY, "tenant": "eu-bank"}]},
    }


async def generate(running, key: str, **options) -> openai.types.ImagesResponse:
    async with openai.AsyncOpenAI(base_url=running.base_url, api_key=key, max_retries=0) as client:
        return await client.images.generate(model="gpt-image-1-mini", prompt="a fox", quality="low", **options)


async def test_a_routed_tenant_reaches_only_its_own_upstream(gateway_kit, fake_upstream, dedicated_upstream):
    running = await gateway_kit.start(routed_config(dedicated_upstream), plugins=[tenant_router])
    result = await generate(running, BANK_KEY)
    assert result.data[0].b64_json
    assert (dedicated_upstream.count(GENERATIONS), fake_upstream.count()) == (1, 0)


async def test_the_routed_upstream_gets_its_own_api_key(gateway_kit, dedicated_upstream):
    running = await gateway_kit.start(routed_config(dedicated_upstream), plugins=[tenant_router])
    await generate(running, BANK_KEY)
    assert dedicated_upstream.calls[-1].headers.getall("authorization") == [f"Bearer {DEDICATED_UPSTREAM_KEY}"]


async def test_other_tenants_keep_the_default_upstream(gateway_kit, fake_upstream, dedicated_upstream):
    running = await gateway_kit.start(routed_config(dedicated_upstream), plugins=[tenant_router])
    await generate(running, CLIENT_KEY)
    assert (fake_upstream.count(GENERATIONS), dedicated_upstream.count()) == (1, 0)
    assert fake_upstream.calls[-1].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_a_routed_tenants_stream_comes_from_its_upstream(gateway_kit, fake_upstream, dedicated_upstream):
    running = await gateway_kit.start(routed_config(dedicated_upstream), plugins=[tenant_router])
    async with openai.AsyncOpenAI(base_url=running.base_url, api_key=BANK_KEY, max_retries=0) as client:
        stream = await client.images.generate(model="gpt-image-1.5", prompt="a fox", stream=True, partial_images=1)
        events = [event async for event in stream]
    assert [event.type for event in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert (dedicated_upstream.count(GENERATIONS), fake_upstream.count()) == (1, 0)


async def test_an_unknown_upstream_name_is_a_config_error_naming_the_key_and_file(gateway_kit):
    with pytest.raises(ConfigError, match=r"test-config\.toml: \[tenant_router\] tenants\.eu-bank names upstream 'eu'"):
        await gateway_kit.start({"tenant_router": {"tenants": {"eu-bank": "eu"}}}, plugins=[tenant_router])
