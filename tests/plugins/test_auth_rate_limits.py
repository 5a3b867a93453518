"""Where rpm is counted: per replica in memory by default, shared by every replica with Redis."""

from __future__ import annotations

import secrets

import aiohttp
import msgspec
import pytest
import redis.asyncio as redis
from multidict import CIMultiDict

from gatekeeper.testing.kit import CLIENT_KEY

REDIS_URL = "redis://127.0.0.1:6379/0"
LIMITED_KEY = "sk-gk-test-limited-0004"


def limited(rpm: int, **auth) -> dict:
    return {"auth": {"keys": [{"id": "test-1", "key": CLIENT_KEY, "tenant": "test"},
                              {"id": "limited", "key": LIMITED_KEY, "tenant": "t", "rpm": rpm}], **auth}}


async def status_of(gateway, key: str = LIMITED_KEY) -> tuple[int, CIMultiDict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.base_url + "/models", headers={"Authorization": f"Bearer {key}"}) as response:
            await response.read()
            return response.status, response.headers.copy()


@pytest.fixture
async def redis_prefix():
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"gk-test-auth-{secrets.token_hex(6)}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = [key async for key in client.scan_iter(match=prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_in_memory_limits_are_per_replica(gateway_kit):
    replica_a = await gateway_kit.start(limited(1))
    replica_b = await gateway_kit.start(limited(1))
    assert (await status_of(replica_a))[0] == 200
    assert (await status_of(replica_b))[0] == 200  # B has its own window
    assert (await status_of(replica_a))[0] == 429


async def test_with_redis_every_replica_shares_one_limit(gateway_kit, redis_prefix):
    settings = limited(2, rate_limit_backend="redis", redis_url=REDIS_URL, redis_prefix=redis_prefix)
    replica_a = await gateway_kit.start(settings)
    replica_b = await gateway_kit.start(settings)
    assert (await status_of(replica_a))[0] == 200
    assert (await status_of(replica_b))[0] == 200
    status, headers = await status_of(replica_a)
    assert status == 429
    assert 59 <= int(headers["retry-after"]) <= 60
    assert (await status_of(replica_b))[0] == 429


async def test_redis_window_lives_under_the_configured_prefix_and_expires(gateway_kit, redis_prefix):
    gateway = await gateway_kit.start(limited(5, rate_limit_backend="redis", redis_url=REDIS_URL,
                                              redis_prefix=redis_prefix))
    await status_of(gateway)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert await client.zcard(redis_prefix + "limited") == 1
        assert 0 < await client.pttl(redis_prefix + "limited") <= 60_000
    finally:
        await client.aclose()


async def test_keys_without_rpm_never_touch_redis(gateway_kit, redis_prefix):
    gateway = await gateway_kit.start(limited(5, rate_limit_backend="redis", redis_url=REDIS_URL,
                                              redis_prefix=redis_prefix))
    assert (await status_of(gateway, CLIENT_KEY))[0] == 200
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert [key async for key in client.scan_iter(match=redis_prefix + "*")] == []
    finally:
        await client.aclose()


async def test_an_unreachable_redis_lets_requests_through_and_shows_in_ready(gateway_kit):
    gateway = await gateway_kit.start(limited(1, rate_limit_backend="redis", redis_url="redis://127.0.0.1:1/0"))
    assert (await status_of(gateway))[0] == 200
    assert (await status_of(gateway))[0] == 200  # not enforced: availability first
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/ready") as response:
            report = msgspec.json.decode(await response.read())["plugins"]["auth"]
    assert report["redis"].startswith("unavailable")
