"""Single-flight: identical concurrent requests share one upstream call, on one replica and across
replicas; failed leaders don't hand their error around; a leaving leader still serves its followers."""

from __future__ import annotations

import asyncio

import aiohttp
import msgspec
import pytest
import redis.asyncio as redis
from cache_support import (
    GENERATIONS,
    OTHER_KEY,
    REDIS_URL,
    TWO_TENANTS,
    bearer,
    cache_overrides,  # noqa: F401  (fixture)
    delete_prefix,
    merge,
    post,
    unique_prefix,
)

from gatekeeper import hookimpl

BASE = {"model": "gpt-image-1.5", "prompt": "a lighthouse at dusk", "quality": "low"}
STREAM = {**BASE, "stream": True, "partial_images": 3}


def cache_plugin(gateway):
    return gateway.gateway.plugins.hooks.pm.get_plugin("cache")


async def settle(gateway) -> None:
    plugin = cache_plugin(gateway)
    while plugin._tasks:
        await asyncio.wait(list(plugin._tasks))


async def test_100_identical_cold_requests_make_one_upstream_call(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    fake_upstream.inject(path=GENERATIONS, status=200, delay_s=0.5)
    replies = await asyncio.gather(*[post(gateway, GENERATIONS, json=BASE) for _ in range(100)])
    assert {reply.status for reply in replies} == {200}
    assert len({reply.body for reply in replies}) == 1
    assert sorted(reply.cache for reply in replies).count("MISS") == 1
    assert fake_upstream.count(GENERATIONS) == 1
    assert cache_plugin(gateway).board.coalesced >= 90


async def test_identical_streams_in_flight_all_get_the_same_bytes(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    fake_upstream.inject(path=GENERATIONS, status=200, delay_s=0.3)
    replies = await asyncio.gather(*[post(gateway, GENERATIONS, json=STREAM) for _ in range(20)])
    assert len({reply.body for reply in replies}) == 1
    assert replies[0].body.count(b"event: image_generation.partial_image") == 3
    assert fake_upstream.count(GENERATIONS) == 1


async def test_50_and_50_across_two_tenants_make_two_calls(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(merge(cache_overrides, TWO_TENANTS))
    fake_upstream.inject(path=GENERATIONS, status=200, delay_s=0.5, times=2)
    replies = await asyncio.gather(*[post(gateway, GENERATIONS, json=BASE, key=key)
                                     for _ in range(50) for key in (bearer()["Authorization"][7:], OTHER_KEY)])
    assert {reply.status for reply in replies} == {200}
    assert fake_upstream.count(GENERATIONS) == 2


async def test_a_leaders_500_is_not_handed_to_its_followers(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    fake_upstream.inject(path=GENERATIONS, status=500, delay_s=0.3)
    replies = await asyncio.gather(*[post(gateway, GENERATIONS, json=BASE) for _ in range(100)])
    statuses = [reply.status for reply in replies]
    assert statuses.count(500) == 1 and statuses.count(200) == 99
    assert len({reply.body for reply in replies if reply.status == 200}) == 1
    assert fake_upstream.count(GENERATIONS) == 2  # the failed leader, then one new leader for everyone


async def test_a_leaders_400_is_not_cached_and_each_retry_is_serialised(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    bad = {**BASE, "quality": "ultra"}  # the fake refuses it with a 400 every time
    replies = await asyncio.gather(*[post(gateway, GENERATIONS, json=bad) for _ in range(5)])
    assert {reply.status for reply in replies} == {400}
    assert {reply.cache for reply in replies} == {"MISS"}
    assert fake_upstream.count(GENERATIONS) == 5


async def test_an_answer_too_large_to_keep_is_still_shared_with_its_followers(gateway_kit, fake_upstream,
                                                                             cache_overrides):
    gateway = await gateway_kit.start(merge(cache_overrides, {"cache": {"max_entry_bytes": 200}}))
    fake_upstream.inject(path=GENERATIONS, status=200, delay_s=0.3)
    replies = await asyncio.gather(*[post(gateway, GENERATIONS, json=BASE) for _ in range(10)])
    assert {reply.status for reply in replies} == {200} and len({reply.body for reply in replies}) == 1
    await settle(gateway)
    later = await post(gateway, GENERATIONS, json=BASE)
    assert later.cache == "MISS" and fake_upstream.count(GENERATIONS) == 2


async def test_an_upstream_no_store_answer_is_not_shared_followers_forward_on_their_own(gateway_kit, fake_upstream,
                                                                                      cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    fake_upstream.inject(path=GENERATIONS, status=200, delay_s=0.3, headers={"Cache-Control": "no-store"})
    replies = await asyncio.gather(*[post(gateway, GENERATIONS, json=BASE) for _ in range(5)])
    assert {(reply.status, reply.cache) for reply in replies} == {(200, "MISS")}
    assert fake_upstream.count(GENERATIONS) == 5


async def test_followers_stop_waiting_after_lock_timeout_and_forward_on_their_own(gateway_kit, fake_upstream,
                                                                                cache_overrides):
    gateway = await gateway_kit.start(merge(cache_overrides, {"cache": {"lock_timeout_s": 0.2}}))
    fake_upstream.inject(path=GENERATIONS, status=200, delay_s=1.0)
    started = asyncio.get_running_loop().time()
    leader = asyncio.create_task(post(gateway, GENERATIONS, json=BASE))
    await asyncio.sleep(0.05)
    followers = await asyncio.gather(*[post(gateway, GENERATIONS, json=BASE) for _ in range(3)])
    waited = asyncio.get_running_loop().time() - started
    assert {reply.status for reply in followers} == {200}
    assert waited < 0.9  # they did not wait for the 1 s leader
    assert (await leader).status == 200
    assert fake_upstream.count(GENERATIONS) >= 2


async def test_a_no_cache_request_in_flight_is_joined_by_followers(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    fake_upstream.inject(path=GENERATIONS, status=200, delay_s=0.3)
    leader = asyncio.create_task(post(gateway, GENERATIONS, json=BASE, headers={"Cache-Control": "no-cache"}))
    await asyncio.sleep(0.05)
    follower = await post(gateway, GENERATIONS, json=BASE)
    assert (await leader).cache == "BYPASS"
    assert follower.cache == "HIT" and follower.body == (await leader).body
    assert fake_upstream.count(GENERATIONS) == 1


# ---------------------------------------------------------------- the leader's client leaves


class DetachedUsage:
    """Captures the future the cache offers for the usage of a call finished after its client left."""

    name = "detached-usage"

    def __init__(self) -> None:
        self.metas: list = []
        self.outcomes: list = []

    @hookimpl
    def exchange_error(self, flow) -> None:
        # Runs before the cache's own impl (test plugins come first): keep the meta, read it later.
        self.outcomes.append(flow.outcome)
        self.metas.append(flow.scratch.get("cache"))

    async def usage(self):
        return await asyncio.wait_for(self.metas[0].detached, 1)


async def read_first_chunk_then_leave(gateway, body: dict) -> bytes:
    async with aiohttp.ClientSession() as session:
        response = await session.post(gateway.url + GENERATIONS, json=body, headers=bearer())
        first = await response.content.readany()
        response.close()  # drops the connection mid-body
        return first


async def test_a_leaving_streaming_leader_still_serves_and_caches_for_its_followers(gateway_kit, fake_upstream,
                                                                                   cache_overrides):
    capture = DetachedUsage()
    gateway = await gateway_kit.start(cache_overrides, plugins=[capture])
    fake_upstream.stream_interval_s = 0.15
    leader = asyncio.create_task(read_first_chunk_then_leave(gateway, STREAM))
    await asyncio.sleep(0.05)
    followers = [asyncio.create_task(post(gateway, GENERATIONS, json=STREAM)) for _ in range(5)]
    first_chunk = await leader
    replies = await asyncio.gather(*followers)
    assert {reply.status for reply in replies} == {200} and len({reply.body for reply in replies}) == 1
    assert replies[0].body.startswith(first_chunk)
    assert replies[0].body.count(b"event: image_generation.completed") == 1
    assert fake_upstream.count(GENERATIONS) == 1
    await settle(gateway)
    later = await post(gateway, GENERATIONS, json=STREAM)
    assert later.cache == "HIT" and later.body == replies[0].body
    assert capture.outcomes == ["client_abort"]
    usage = await capture.usage()
    assert usage["total_tokens"] > 0


async def test_a_leader_leaving_before_the_headers_still_serves_its_followers(gateway_kit, fake_upstream,
                                                                             cache_overrides):
    capture = DetachedUsage()
    gateway = await gateway_kit.start(cache_overrides, plugins=[capture])
    fake_upstream.inject(path=GENERATIONS, status=200, delay_s=0.6)
    leader = asyncio.create_task(post(gateway, GENERATIONS, json=BASE))
    await asyncio.sleep(0.05)
    followers = [asyncio.create_task(post(gateway, GENERATIONS, json=BASE)) for _ in range(5)]
    await asyncio.sleep(0.15)
    leader.cancel()  # the client gives up while the image is still being made
    replies = await asyncio.gather(*followers)
    assert {reply.status for reply in replies} == {200} and len({reply.body for reply in replies}) == 1
    assert fake_upstream.count(GENERATIONS) == 1
    assert capture.outcomes == ["client_abort"]
    usage = await capture.usage()
    assert usage == msgspec.json.decode(replies[0].body)["usage"]


async def test_a_leaving_leader_without_followers_cancels_the_upstream_call(gateway_kit, fake_upstream,
                                                                           cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    fake_upstream.stream_interval_s = 0.15
    await read_first_chunk_then_leave(gateway, STREAM)
    await asyncio.sleep(0.1)
    await settle(gateway)
    again = await post(gateway, GENERATIONS, json=STREAM)
    await settle(gateway)
    assert again.cache == "MISS" and fake_upstream.count(GENERATIONS) == 2
    assert cache_plugin(gateway).board.flights == {}


# ---------------------------------------------------------------- across replicas (Redis)


@pytest.fixture
async def shared_redis_prefix():
    prefix = unique_prefix()
    try:
        yield prefix
    finally:
        await delete_prefix(prefix)


async def test_two_replicas_on_one_redis_make_one_upstream_call(gateway_kit, fake_upstream, shared_redis_prefix):
    overrides = {"cache": {"backend": "redis", "redis_url": REDIS_URL, "key_prefix": shared_redis_prefix}}
    first = await gateway_kit.start(overrides)
    second = await gateway_kit.start(overrides)
    fake_upstream.inject(path=GENERATIONS, status=200, delay_s=0.5)
    replies = await asyncio.gather(*[post(gateway, GENERATIONS, json=BASE)
                                     for _ in range(10) for gateway in (first, second)])
    assert {reply.status for reply in replies} == {200}
    assert len({reply.body for reply in replies}) == 1
    assert fake_upstream.count(GENERATIONS) == 1


async def test_a_replica_takes_over_when_the_other_replicas_leader_fails(gateway_kit, fake_upstream,
                                                                        shared_redis_prefix):
    overrides = {"cache": {"backend": "redis", "redis_url": REDIS_URL, "key_prefix": shared_redis_prefix}}
    first = await gateway_kit.start(overrides)
    second = await gateway_kit.start(overrides)
    fake_upstream.inject(path=GENERATIONS, status=500, delay_s=0.3)
    leader = asyncio.create_task(post(first, GENERATIONS, json=BASE))
    await asyncio.sleep(0.1)
    follower = await post(second, GENERATIONS, json=BASE)
    assert (await leader).status == 500
    assert follower.status == 200 and fake_upstream.count(GENERATIONS) == 2


async def test_the_redis_lock_is_released_after_the_leader_finishes(gateway_kit, fake_upstream, shared_redis_prefix):
    gateway = await gateway_kit.start({"cache": {"backend": "redis", "redis_url": REDIS_URL,
                                                 "key_prefix": shared_redis_prefix}})
    fake_upstream.inject(path=GENERATIONS, status=500)
    await post(gateway, GENERATIONS, json=BASE)
    await post(gateway, GENERATIONS, json={**BASE, "prompt": "stored"})
    await settle(gateway)
    client = redis.from_url(REDIS_URL)
    try:
        locks = [key async for key in client.scan_iter(match=shared_redis_prefix + ":lock:*")]
        entries = [key async for key in client.scan_iter(match=shared_redis_prefix + ":e:*")]
    finally:
        await client.aclose()
    assert locks == [] and len(entries) == 1
