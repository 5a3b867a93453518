"""The cache backends: the bounded LRU, the Redis encoding, and failing open when Redis is down."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator

import msgspec
import pytest
import redis.asyncio as redis
from aiohttp import web
from cache_support import GENERATIONS, REDIS_URL, RedisServer, delete_prefix, free_port, own_redis, post, unique_prefix  # noqa: F401
from certificates import self_signed
from structlog.testing import capture_logs

from gatekeeper_plugins.cache_backends import Entry, LRUMemoryCache, RedisStore, entry_size

BASE = {"model": "gpt-image-1.5", "prompt": "a quiet harbour", "quality": "low"}


def entry(body: bytes) -> Entry:
    return Entry(status=200, headers=[("content-type", "application/json")], body=body, created=time.time())


def cache_plugin(gateway):
    return gateway.gateway.plugins.hooks.pm.get_plugin("cache")


# ---------------------------------------------------------------- the LRU memory backend


async def test_the_memory_backend_stays_within_max_bytes_while_ten_times_that_is_inserted():
    cache = LRUMemoryCache(max_bytes=100_000, max_entry_bytes=20_000)
    inserted = 0
    index = 0
    while inserted < 1_000_000:
        value = entry(bytes(1000 + index % 5000))
        await cache.set(f"k{index}", value)
        inserted += entry_size(value)
        index += 1
        assert cache.bytes <= 100_000
    assert cache.evictions > 0
    assert cache.bytes == sum([entry_size(await cache.get(key)) for key in list(cache._items)])


async def test_the_least_recently_used_entry_is_evicted_first():
    cache = LRUMemoryCache(max_bytes=3 * entry_size(entry(bytes(100))), max_entry_bytes=10_000)
    for key in ("a", "b", "c"):
        await cache.set(key, entry(bytes(100)))
    await cache.get("a")  # "b" is now the least recently used
    await cache.set("d", entry(bytes(100)))
    assert await cache.get("b") is None
    assert all([await cache.get("a"), await cache.get("c"), await cache.get("d")])


async def test_an_entry_larger_than_max_entry_bytes_is_never_stored():
    cache = LRUMemoryCache(max_bytes=1_000_000, max_entry_bytes=2_000)
    assert await cache.set("big", entry(bytes(5_000))) is False
    assert await cache.get("big") is None and cache.bytes == 0


async def test_memory_entries_expire_after_their_ttl():
    cache = LRUMemoryCache(max_bytes=1_000_000, max_entry_bytes=10_000)
    await cache.set("short", entry(b"x"), ttl=0.05)
    assert await cache.get("short") is not None
    await asyncio.sleep(0.08)
    assert await cache.get("short") is None and cache.bytes == 0


async def test_memory_backend_keeps_the_entry_object_itself():
    cache = LRUMemoryCache(max_bytes=1_000_000, max_entry_bytes=10_000)
    stored = entry(b"body")
    await cache.set("k", stored)
    assert await cache.get("k") is stored


async def test_clearing_a_prefix_counts_what_it_removed():
    cache = LRUMemoryCache(max_bytes=1_000_000, max_entry_bytes=10_000)
    for key in ("ta:1", "ta:2", "tb:1"):
        await cache.set(key, entry(b"x"))
    assert await cache.clear(namespace="ta:") == 2
    assert await cache.get("tb:1") is not None


async def test_a_gateway_memory_cache_stays_within_max_bytes(gateway_kit):
    gateway = await gateway_kit.start({"cache": {"backend": "memory", "max_bytes": 20_000}})
    plugin = cache_plugin(gateway)
    for index in range(40):
        reply = await post(gateway, GENERATIONS, json={**BASE, "prompt": f"harbour number {index}"})
        assert reply.status == 200
        assert plugin.store.cache.bytes <= 20_000
    stats = plugin.snapshot()
    assert stats["evictions"] > 0 and stats["stores"] == 40


# ---------------------------------------------------------------- Redis encoding


@pytest.fixture
async def redis_prefix():
    prefix = unique_prefix()
    try:
        yield prefix
    finally:
        await delete_prefix(prefix)


def full_entry(body: bytes) -> Entry:
    return Entry(status=200, headers=(("content-type", "application/json"), ("x-request-id", "req_1")), body=body,
                 created=1700000000.5, usage={"input_tokens": 50, "output_tokens": 4160},
                 annotations={"output_image_sha256": ["ab" * 32]}, model="gpt-image-1", upstream_request_id="req_1")


async def test_redis_keeps_an_entry_as_a_hash_of_its_msgpack_head_and_its_body_bytes(redis_prefix):
    store = RedisStore(REDIS_URL, redis_prefix, 0.1, 1.0)
    stored = full_entry(bytes(range(256)) * 10)
    try:
        assert await store.put("t:key", stored, 60)
        raw = await store.client.hgetall(redis_prefix + ":e:t:key")
        loaded = await store.get("t:key")
    finally:
        await store.close()
    assert set(raw) == {b"h", b"b"}
    assert raw[b"b"] == stored.body  # the bytes themselves: no msgpack, JSON or base64 around them
    assert msgspec.msgpack.decode(raw[b"h"], type=Entry) == msgspec.structs.replace(stored, body=b"")
    assert loaded == stored


@pytest.mark.parametrize("size", [0, 1, 16 * 1024, 16 * 1024 + 1, 64 * 1024 + 3, 1_500_000])
async def test_a_redis_entry_is_read_back_byte_for_byte_whatever_its_size(redis_prefix, size):
    store = RedisStore(REDIS_URL, redis_prefix, 0.5, 1.0)
    body = (b"$5\r\n*2\r\n-ERR\r\n" + os.urandom(4093)) * (size // 4110 + 1)
    body = body[:size]
    try:
        assert await store.put("t:key", full_entry(body), 60)
        first, second = await store.get("t:key"), await store.get("t:key")  # the second on a reused connection
        together = await asyncio.gather(*[store.get("t:key") for _ in range(8)])
    finally:
        await store.close()
    for loaded in (first, second, *together):
        assert loaded is not None and bytes(loaded.body) == body and loaded == full_entry(body)


async def test_a_hit_served_from_redis_is_the_upstreams_large_body_byte_for_byte(gateway_kit, custom_upstream):
    image = base64.b64encode(os.urandom(1_100_000)).decode()  # a 1.5 MB b64_json answer, like a high-quality image
    answer = msgspec.json.encode({"created": 1, "data": [{"b64_json": image}],
                                  "usage": {"input_tokens": 10, "output_tokens": 4160, "total_tokens": 4170}})

    async def upstream(request: web.Request) -> web.Response:
        return web.Response(body=answer, content_type="application/json")

    prefix = unique_prefix()
    try:
        gateway = await gateway_kit.start({"upstream": {"base_url": await custom_upstream(upstream)},
                                           "cache": {"backend": "redis", "redis_url": REDIS_URL, "key_prefix": prefix}})
        miss = await post(gateway, GENERATIONS, json=BASE)
        await asyncio.gather(*cache_plugin(gateway)._tasks)
        hit = await post(gateway, GENERATIONS, json=BASE)
    finally:
        await delete_prefix(prefix)
    assert (miss.cache, hit.cache) == ("MISS", "HIT")
    assert hit.body == miss.body == answer
    assert int(hit.headers["content-length"]) == len(answer)


async def test_redis_hits_of_one_entry_share_its_usage_and_each_get_their_own_annotations(redis_prefix):
    store = RedisStore(REDIS_URL, redis_prefix, 0.5, 1.0)
    try:
        assert await store.put("t:key", full_entry(b"{}"), 60)
        first, second = await store.get("t:key"), await store.get("t:key")
        first.annotations["added_by_a_plugin"] = True
        third = await store.get("t:key")
        # Stored again with other usage: the new head is read, not the one remembered.
        assert await store.put("t:key", msgspec.structs.replace(full_entry(b"{}"), usage={"input_tokens": 1}), 60)
        replaced = await store.get("t:key")
    finally:
        await store.close()
    assert first.usage is second.usage == {"input_tokens": 50, "output_tokens": 4160}
    assert third.annotations == {"output_image_sha256": ["ab" * 32]}
    assert replaced.usage == {"input_tokens": 1}


async def test_a_redis_entry_whose_head_is_over_16_kib_is_read_back_too(redis_prefix):
    store = RedisStore(REDIS_URL, redis_prefix, 0.5, 1.0)
    stored = msgspec.structs.replace(full_entry(b"{}"), annotations={"long": "x" * 20_000})
    try:
        assert await store.put("t:key", stored, 60)
        first, second = await store.get("t:key"), await store.get("t:key")
    finally:
        await store.close()
    assert first == stored and second == stored


async def test_an_entry_of_the_older_format_is_a_miss_not_an_error_and_the_next_store_replaces_it(redis_prefix):
    store = RedisStore(REDIS_URL, redis_prefix, 0.1, 1.0)
    older = msgspec.msgpack.encode(full_entry(b"{}"))  # the whole entry as one msgpack string value
    try:
        await store.client.set(redis_prefix + ":e:t:key", older)
        assert await store.get("t:key") is None
        assert (store.up, store.errors) == (True, 0)  # Redis is fine: no cool-down, no warning
        assert await store.put("t:key", full_entry(b"{}"), 60)
        assert await store.get("t:key") == full_entry(b"{}")
    finally:
        await store.close()


async def test_a_redis_hash_of_another_shape_is_a_miss(redis_prefix):
    store = RedisStore(REDIS_URL, redis_prefix, 0.1, 1.0)
    try:
        await store.client.hset(redis_prefix + ":e:t:key", mapping={"h": b"not msgpack of an entry", "b": b"{}"})
        await store.client.hset(redis_prefix + ":e:t:other", mapping={"head": b"", "body": b"{}"})
        assert await store.get("t:key") is None
        assert await store.get("t:other") is None
        assert store.errors == 0
    finally:
        await store.close()


async def test_a_hit_cancelled_while_its_body_arrives_leaves_no_half_read_reply_behind(redis_prefix):
    store = RedisStore(REDIS_URL, redis_prefix, 1.0, 1.0)
    large, small = full_entry(os.urandom(3_000_000)), full_entry(b'{"small": true}')
    try:
        await store.put("t:large", large, 60)
        await store.put("t:small", small, 60)
        for delay in (0, 0.0005, 0.002):
            reading = asyncio.ensure_future(store.get("t:large"))
            await asyncio.sleep(delay)
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
            assert await store.get("t:small") == small
            assert await store.get("t:large") == large
    finally:
        await store.close()


async def test_closing_the_store_leaves_no_connection_open_not_even_of_a_read_under_way(own_redis):
    await own_redis.start()
    store = RedisStore(own_redis.url, "gk:close", 1.0, 1.0)
    observer = redis.from_url(own_redis.url)
    stored = full_entry(os.urandom(3_000_000))
    try:
        await store.put("t:key", stored, 60)
        await asyncio.gather(*[store.get("t:key") for _ in range(3)])  # three idle reader connections
        reading = asyncio.ensure_future(store.get("t:key"))
        await asyncio.sleep(0)
        await store.close()
        assert await reading == stored
        await asyncio.sleep(0.05)
        assert len(await observer.client_list()) == 1  # the observer itself
    finally:
        await observer.aclose()


async def test_a_large_entry_that_keeps_arriving_is_not_cut_off_by_the_redis_timeout(redis_prefix):
    # redis_timeout_s bounds silence, like a socket timeout, not the whole transfer: through a slow
    # link, 1.5 MB takes several timeouts to arrive.
    async with slow_link_to_redis(piece_bytes=128 * 1024, pause_s=0.03) as port:
        store = RedisStore(f"redis://127.0.0.1:{port}/0", redis_prefix, 0.1, 1.0)
        stored = full_entry(os.urandom(1_500_000))
        try:
            assert await store.put("t:key", stored, 60)
            loaded, elapsed = await timed(store.get("t:key"))
        finally:
            await store.close()
    assert loaded == stored and elapsed > 0.2 and store.errors == 0


@contextlib.asynccontextmanager
async def slow_link_to_redis(piece_bytes: int, pause_s: float) -> AsyncIterator[int]:
    """A TCP relay to the real Redis that passes its answers on a piece at a time, pausing between."""

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", 6379)

        async def requests() -> None:
            while data := await client_reader.read(65536):
                redis_writer.write(data)
            redis_writer.close()

        forwarding = asyncio.ensure_future(requests())
        try:
            while data := await redis_reader.read(piece_bytes):
                client_writer.write(data)
                await asyncio.sleep(pause_s)
        finally:
            forwarding.cancel()
            client_writer.close()

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_redis_entries_are_read_with_the_urls_password_and_database(redis_prefix):
    with password_redis("s3cret") as port:
        store = RedisStore(f"redis://:s3cret@127.0.0.1:{port}/3", redis_prefix, 0.5, 1.0)
        client = redis.Redis(port=port, password="s3cret", db=3)
        try:
            assert await store.put("t:key", full_entry(b"{}"), 60)
            assert await store.get("t:key") == full_entry(b"{}")
            assert await client.exists(redis_prefix + ":e:t:key") == 1  # in database 3
        finally:
            await store.close()
            await client.aclose()


async def test_a_wrong_redis_password_is_a_miss_and_a_warning(redis_prefix):
    with password_redis("s3cret") as port:
        store = RedisStore(f"redis://:wrong@127.0.0.1:{port}/0", redis_prefix, 0.5, 30.0)
        try:
            with capture_logs() as logs:
                assert await store.get("t:key") is None
        finally:
            await store.close()
    assert store.up is False and [log["event"] for log in logs] == ["cache redis unavailable: serving misses"]


async def test_a_tls_redis_url_reads_entries_through_redis_py(redis_prefix, tmp_path):
    certificate, key = self_signed(tmp_path, "redis")
    port = free_port()
    with redis_server("--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certificate),
                      "--tls-key-file", str(key), "--tls-ca-cert-file", str(certificate), "--tls-auth-clients", "no"):
        store = RedisStore(f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none", redis_prefix, 0.5, 1.0)
        try:
            assert store.cache.reader is None  # the entry reader speaks plain TCP only
            assert await store.put("t:key", full_entry(b"{}"), 60)
            assert await store.get("t:key") == full_entry(b"{}")
        finally:
            await store.close()


@contextlib.contextmanager
def redis_server(*arguments: str) -> Iterator[subprocess.Popen[bytes]]:
    server = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *arguments],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.2)  # redis-server listens within a few milliseconds
        yield server
    finally:
        server.kill()
        server.wait()


@contextlib.contextmanager
def unix_socket_redis() -> Iterator[str]:
    """A redis-server listening on a unix socket only (no TCP port); yields its unix:// URL."""
    folder = tempfile.mkdtemp(prefix="gk-redis-")  # short: a socket's path may not pass 107 bytes
    path = os.path.join(folder, "redis.sock")
    try:
        with redis_server("--port", "0", "--unixsocket", path, "--unixsocketperm", "700"):
            for _ in range(100):
                if os.path.exists(path):
                    break
                time.sleep(0.05)
            yield f"unix://{path}?db=2"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def test_a_unix_socket_redis_url_keeps_reads_locks_and_purges_on_that_socket(redis_prefix):
    body = os.urandom(1_500_000)
    with unix_socket_redis() as url:
        store = RedisStore(url, redis_prefix, 0.5, 1.0)
        client = redis.from_url(url)
        try:
            assert store.cache.reader is not None and store.cache.reader.path == url[len("unix://"):-len("?db=2")]
            assert await store.put("t:large", full_entry(body), 60)  # redis-py, on the socket
            assert await store.put("t:small", full_entry(b"{}"), 60)
            large, small = await store.get("t:large"), await store.get("t:small")  # the entry reader
            assert await store.try_lock("t:large", "token", 5) is True
            assert await store.peek("t:large", "t:large") == (True, True)
            in_database_2 = await client.exists(redis_prefix + ":e:t:large")
            purged = await store.purge("t:")
        finally:
            await store.close()
            await client.aclose()
    assert large is not None and bytes(large.body) == body and large == full_entry(body)
    assert small == full_entry(b"{}")
    assert in_database_2 == 1 and purged == 2
    assert store.up is True and store.errors == 0


async def test_a_gateway_caches_in_a_redis_reached_through_a_unix_socket(gateway_kit, fake_upstream):
    prefix = unique_prefix()
    with unix_socket_redis() as url:
        gateway = await gateway_kit.start({"cache": {"backend": "redis", "redis_url": url, "key_prefix": prefix}})
        miss = await post(gateway, GENERATIONS, json=BASE)
        await asyncio.gather(*cache_plugin(gateway)._tasks)
        hit = await post(gateway, GENERATIONS, json=BASE)
    assert (miss.status, miss.cache, hit.status, hit.cache) == (200, "MISS", 200, "HIT")
    assert hit.body == miss.body
    assert fake_upstream.count(GENERATIONS) == 1


@contextlib.contextmanager
def password_redis(password: str) -> Iterator[int]:
    port = free_port()
    with redis_server("--port", str(port), "--requirepass", password):
        yield port


async def test_the_redis_lock_is_taken_once_and_released_only_by_its_owner(redis_prefix):
    store = RedisStore(REDIS_URL, redis_prefix, 0.1, 1.0)
    try:
        assert await store.try_lock("key", "mine", 5) is True
        assert await store.try_lock("key", "theirs", 5) is False
        await store.unlock("key", "theirs")
        assert await store.peek("nothing", "key") == (False, True)
        await store.unlock("key", "mine")
        assert await store.peek("nothing", "key") == (False, False)
    finally:
        await store.close()


# ---------------------------------------------------------------- Redis down


async def test_the_gateway_starts_and_serves_misses_with_redis_down(gateway_kit, fake_upstream):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with capture_logs() as logs:
        gateway = await gateway_kit.start({"cache": {"backend": "redis", "redis_url": dead, "redis_retry_s": 0}})
        replies = []
        for _ in range(5):
            started = time.perf_counter()
            replies.append(await post(gateway, GENERATIONS, json=BASE))
            assert time.perf_counter() - started < 0.5
    assert {(reply.status, reply.cache) for reply in replies} == {(200, "MISS")}
    assert fake_upstream.count(GENERATIONS) == 5
    warnings = [log for log in logs if log["event"].startswith("cache redis unavailable")]
    assert len(warnings) == 1  # rate-limited: one line for many failures
    assert cache_plugin(gateway).store.errors > 1


async def timed(call) -> tuple[object, float]:
    started = time.perf_counter()
    result = await call
    return result, time.perf_counter() - started


async def test_a_refused_redis_call_fails_open_at_once(redis_prefix):
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", redis_prefix, 0.1, 0.0)
    try:
        for call, expected in ((store.get("t:key"), None), (store.put("t:key", entry(b"x"), 60), False),
                               (store.try_lock("key", "token", 5), None)):
            result, elapsed = await timed(call)
            assert result == expected and elapsed < 0.1
    finally:
        await store.close()


async def test_a_redis_that_never_answers_fails_open_within_about_100_ms(redis_prefix):
    import socket

    silent = socket.socket()  # accepts connections (kernel backlog) and never says a word
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    store = RedisStore(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", redis_prefix, 0.1, 0.0)
    try:
        result, elapsed = await timed(store.get("t:key"))
        assert result is None and elapsed < 0.15
        result, elapsed = await timed(store.put("t:key", entry(b"x"), 60))
        assert result is False and elapsed < 0.15
    finally:
        await store.close()
        silent.close()


async def test_redis_is_left_alone_during_its_cool_down(redis_prefix):
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", redis_prefix, 0.1, 30.0)
    try:
        await store.get("t:key")
        await store.get("t:key")
        await store.get("t:key")
    finally:
        await store.close()
    assert store.errors == 1


async def test_ready_reports_redis_down_but_stays_ready(gateway_kit):
    import aiohttp

    dead = f"redis://127.0.0.1:{free_port()}/0"
    gateway = await gateway_kit.start({"cache": {"backend": "redis", "redis_url": dead}})
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/ready") as response:
            body = await response.json()
    assert body["plugins"]["cache"]["redis"] == "down" and body["plugins"]["cache"]["ready"] is True


async def test_redis_killed_mid_test_serves_misses_then_recovers(gateway_kit, fake_upstream, own_redis):
    await own_redis.start()
    gateway = await gateway_kit.start({"cache": {"backend": "redis", "redis_url": own_redis.url,
                                                 "key_prefix": "gk:kill", "redis_retry_s": 0.2}})
    plugin = cache_plugin(gateway)

    async def ask(prompt: str):
        started = time.perf_counter()
        reply = await post(gateway, GENERATIONS, json={**BASE, "prompt": prompt})
        await asyncio.gather(*plugin._tasks)
        return reply, time.perf_counter() - started

    assert (await ask("before"))[0].cache == "MISS"
    assert (await ask("before"))[0].cache == "HIT"

    own_redis.kill()
    for prompt in ("before", "during one", "during two", "during one"):
        reply, elapsed = await ask(prompt)
        assert (reply.status, reply.cache) == (200, "MISS")
        assert elapsed < 0.5
    assert plugin.store.up is False

    await own_redis.start()  # same port, empty: the cache starts over
    await asyncio.sleep(0.3)  # past the cool-down
    assert (await ask("after"))[0].cache == "MISS"
    assert (await ask("after"))[0].cache == "HIT"
    assert plugin.store.up is True


async def test_admin_purge_answers_503_when_redis_is_down(gateway_kit):
    from cache_support import admin

    dead = f"redis://127.0.0.1:{free_port()}/0"
    gateway = await gateway_kit.start({"cache": {"backend": "redis", "redis_url": dead}})
    reply = await admin(gateway, "DELETE", "/admin/cache")
    assert reply.status == 503 and reply.json()["error"]["code"] == "cache_unavailable"


def test_entries_stay_out_of_the_cyclic_garbage_collectors_way():
    # A memory cache holds hundreds of thousands of entries; each full collection walks every
    # tracked object, so entries (and their header tuples) must not be tracked.
    import gc

    from gatekeeper_plugins.cache_policy import replayed_headers
    from multidict import CIMultiDict

    headers = replayed_headers(CIMultiDict({"content-type": "application/json", "x-request-id": "req_1"}), "req_1")
    entry = Entry(status=200, headers=headers, body=b"{}", created=0.0)
    assert not gc.is_tracked(entry)
    assert isinstance(entry.headers, tuple) and entry.headers == (("content-type", "application/json"), ("x-request-id", "req_1"))


def test_the_memory_store_keeps_nothing_the_garbage_collector_tracks_and_gives_back_what_it_was_given():
    import gc

    from gatekeeper_plugins.cache_backends import MemoryStore

    store = MemoryStore(max_bytes=1_000_000)
    usage = {"input_tokens": 50, "input_tokens_details": {"text_tokens": 50}, "output_tokens": 4160, "total_tokens": 4210}
    annotations = {"output_image_sha256": ["ab" * 32], "c2pa": [False], "metering": {"model": "gpt-image-1", "images": 1}}
    entry = Entry(status=200, headers=(("content-type", "application/json"),), body=b"{}", created=1.0,
                  usage=usage, annotations=annotations, model="gpt-image-1")
    assert store.put_now("k", entry, 60)
    gc.collect()
    kept = [slot.value for slot in store.cache._items.values()]
    assert kept and not any(gc.is_tracked(value) or gc.is_tracked(value.entry) for value in kept)
    restored = store.get_now("k")
    assert (restored.usage, restored.annotations, restored.body, restored.model) == (usage, annotations, b"{}", "gpt-image-1")
    assert restored.annotations is not store.get_now("k").annotations  # each hit gets its own


def test_memory_hits_of_one_entry_share_its_usage_and_each_get_their_own_annotations():
    # Metering prices a hit's usage by identity (no encoding per hit); plugins add to annotations.
    from gatekeeper_plugins.cache_backends import MemoryStore

    store = MemoryStore(max_bytes=1_000_000)
    entry = Entry(status=200, headers=(("content-type", "application/json"),), body=b"{}", created=1.0,
                  usage={"input_tokens": 7, "output_tokens": 9}, annotations={"c2pa": [False]})
    assert store.put_now("k", entry, 60)
    first, second = store.get_now("k"), store.get_now("k")
    assert first.usage is second.usage == {"input_tokens": 7, "output_tokens": 9}
    first.annotations["added_by_a_plugin"] = True
    assert store.get_now("k").annotations == {"c2pa": [False]}
