"""Where cache entries live: a size-bounded LRU in memory, or Redis shared by every replica.

Both are aiocache backends. aiocache's own memory backend has no size bound, so `LRUMemoryCache`
is a `BaseCache` of our own: it keeps the `Entry` objects themselves (nothing is serialised on a
hit or a store) and evicts the least recently used until the body bytes fit `max_bytes`.
`RedisEntryCache` is aiocache's `RedisCache` with a msgpack serializer (the body travels as a
msgpack bin field, never as JSON or base64), fast socket timeouts, and a SCAN-based purge.
`MemoryStore` and `RedisStore` put the same small interface in front of them for the plugin;
`RedisStore` fails open: any Redis error is a miss, and Redis is left alone for a cool-down.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from collections import OrderedDict
from typing import Any

import msgspec
from aiocache.backends.redis import RedisBackend, RedisCache
from aiocache.base import BaseCache
from aiocache.serializers import BaseSerializer, NullSerializer
from redis.asyncio.connection import parse_url
from redis.exceptions import RedisError

from gatekeeper.logs import get_logger

__all__ = ["Entry", "entry_size", "LRUMemoryCache", "RedisEntryCache", "MemoryStore", "RedisStore", "tenant_tag"]

log = get_logger("gatekeeper.cache")

_ENTRY_OVERHEAD_BYTES = 512  # the Entry object, its dicts and the LRU bookkeeping, roughly
_WARNING_INTERVAL_S = 10.0


class Entry(msgspec.Struct, array_like=True, gc=False):
    """One cached response, replayed byte for byte on a hit.

    Not tracked by the cyclic garbage collector (it holds plain data, never a cycle), and its
    headers are tuples, which the collector stops tracking too: a memory cache holds hundreds of
    thousands of entries, and every full collection would otherwise walk them all, pausing every
    request for tens to hundreds of milliseconds.
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    created: float  # unix time of the upstream answer; `age` counts from it
    usage: dict[str, Any] | None = None
    annotations: dict[str, Any] = {}
    model: str | None = None
    upstream_request_id: str | None = None


def entry_size(entry: Entry) -> int:
    return len(entry.body) + sum(len(name) + len(value) for name, value in entry.headers) + _ENTRY_OVERHEAD_BYTES


@functools.lru_cache(maxsize=4096)  # one sha256 per tenant, not one per request
def tenant_tag(scope_value: str | None) -> str:
    """The key segment entries of one tenant share, so one tenant can be purged alone."""
    if scope_value is None:
        return "g"  # global scope: entries belong to no tenant
    return "t" + hashlib.sha256(scope_value.encode()).hexdigest()[:20]


# ---------------------------------------------------------------- memory


class _Slot(msgspec.Struct, gc=False):
    """One cached value. Untracked by the cyclic GC, like the entries it holds (see `Entry`)."""

    value: Any
    size: int
    expires: float | None


class LRUMemoryCache(BaseCache):
    """An aiocache backend bounded by total size: least recently used entries go first.

    Values are kept as they are (NullSerializer). A value larger than `max_entry_bytes` (or than
    `max_bytes`) is never stored. Expiry is lazy: an expired value is dropped when it is read or
    when it reaches the LRU end, so no timer is armed per key.
    """

    NAME = "lru-memory"

    def __init__(self, *, max_bytes: int, max_entry_bytes: int, sizeof: Any = entry_size, **kwargs: Any) -> None:
        super().__init__(serializer=NullSerializer(), timeout=None, **kwargs)
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self.sizeof = sizeof
        self.bytes = 0
        self.evictions = 0
        self._items: OrderedDict[str, _Slot] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def expires_in(self, key: str) -> float | None:
        """Seconds until `key` expires (None: no expiry or no such key); for tests and tools."""
        slot = self._items.get(key)
        return None if slot is None or slot.expires is None else slot.expires - time.monotonic()

    def _drop(self, key: str) -> bool:
        slot = self._items.pop(key, None)
        if slot is None:
            return False
        self.bytes -= slot.size
        return True

    async def _get(self, key: str, encoding: Any = None, _conn: Any = None) -> Any:
        return self.get_now(key)

    def get_now(self, key: str) -> Any:
        """`_get` without a coroutine: the value, or None when absent or expired."""
        slot = self._items.get(key)
        if slot is None:
            return None
        if slot.expires is not None and slot.expires <= time.monotonic():
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return slot.value

    async def _gets(self, key: str, encoding: Any = None, _conn: Any = None) -> Any:
        return await self._get(key)

    async def _multi_get(self, keys: list[str], encoding: Any = None, _conn: Any = None) -> list[Any]:
        return [await self._get(key) for key in keys]

    async def _set(self, key: str, value: Any, ttl: float | None = None, _cas_token: Any = None, _conn: Any = None) -> bool:
        return self.set_now(key, value, ttl)

    def set_now(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """`_set` without a coroutine; False when the value is too large to keep."""
        size = self.sizeof(value)
        if size > self.max_entry_bytes:
            return False
        self._drop(key)
        self._items[key] = _Slot(value, size, time.monotonic() + ttl if ttl else None)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, oldest = self._items.popitem(last=False)
            self.bytes -= oldest.size
            self.evictions += 1
        return True

    async def _multi_set(self, pairs: list[tuple[str, Any]], ttl: float | None = None, _conn: Any = None) -> bool:
        for key, value in pairs:
            await self._set(key, value, ttl)
        return True

    async def _add(self, key: str, value: Any, ttl: float | None = None, _conn: Any = None) -> bool:
        if await self._get(key) is not None:
            raise ValueError(f"Key {key} already exists, use .set to update the value")
        return await self._set(key, value, ttl)

    async def _exists(self, key: str, _conn: Any = None) -> bool:
        return await self._get(key) is not None

    async def _delete(self, key: str, _conn: Any = None) -> int:
        return int(self._drop(key))

    async def _expire(self, key: str, ttl: float, _conn: Any = None) -> bool:
        slot = self._items.get(key)
        if slot is None:
            return False
        slot.expires = time.monotonic() + ttl if ttl else None
        return True

    async def _clear(self, namespace: str | None = None, _conn: Any = None) -> int:
        """Drop every key that starts with `namespace` (all keys when None); returns how many."""
        doomed = [key for key in self._items if namespace is None or key.startswith(namespace)]
        for key in doomed:
            self._drop(key)
        return len(doomed)


_encode_extras = msgspec.msgpack.Encoder().encode
_decode_extras = msgspec.msgpack.Decoder(tuple[dict[str, Any] | None, dict[str, Any]]).decode


class _Packed(msgspec.Struct, gc=False):
    """An entry as the memory store keeps it: `usage` and `annotations` as msgpack.

    The cyclic GC never stops tracking a dict that holds a dict, and a full collection walks every
    tracked object: kept as dicts, a cache of small entries made those walks pauses of 100 ms and
    more. Packed, an entry holds nothing the GC tracks; a hit decodes the two (about 1 us).
    """

    entry: Entry  # with usage None and annotations {}
    extras: bytes | None  # (usage, annotations) as msgpack, None when both are empty


def _pack(entry: Entry) -> _Packed:
    if entry.usage is None and not entry.annotations:
        return _Packed(entry, None)
    bare = msgspec.structs.replace(entry, usage=None, annotations={})
    return _Packed(bare, _encode_extras((entry.usage, entry.annotations)))


def _unpack(packed: _Packed) -> Entry:
    if packed.extras is None:
        return packed.entry
    usage, annotations = _decode_extras(packed.extras)
    return msgspec.structs.replace(packed.entry, usage=usage, annotations=annotations)


def _packed_size(packed: _Packed) -> int:
    return entry_size(packed.entry) + len(packed.extras or b"")


class MemoryStore:
    """The in-process backend: one `LRUMemoryCache` per gateway, of packed entries."""

    shared = False  # entries are not visible to other replicas: no cross-replica lock

    def __init__(self, max_bytes: int) -> None:
        # The plugin enforces max_entry_bytes on the body, for both backends alike; the LRU only
        # refuses what could never fit.
        self.cache = LRUMemoryCache(max_bytes=max_bytes, max_entry_bytes=max_bytes, sizeof=_packed_size)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def get(self, key: str) -> Entry | None:
        return self.get_now(key)

    async def put(self, key: str, entry: Entry, ttl_s: float) -> bool:
        return self.put_now(key, entry, ttl_s)

    # Straight to the LRU, and without a coroutine: aiocache's public get() wraps every call in
    # its enabled, timeout and plugin layers, a third of a memory hit's cost, for a dict lookup
    # that can't block. The plugin calls these on its fast path.

    def get_now(self, key: str) -> Entry | None:
        packed = self.cache.get_now(key)
        return None if packed is None else _unpack(packed)

    def put_now(self, key: str, entry: Entry, ttl_s: float) -> bool:
        return self.cache.set_now(key, _pack(entry), ttl_s)

    async def purge(self, prefix: str) -> int:
        return await self.cache.clear(namespace=prefix)

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self.cache), "bytes": self.cache.bytes, "evictions": self.cache.evictions}


# ---------------------------------------------------------------- redis


class EntrySerializer(BaseSerializer):
    """msgpack via msgspec: the body is a bin field, stored and read without re-encoding."""

    DEFAULT_ENCODING = None  # values are bytes; aiocache must not decode them as text
    _encode = msgspec.msgpack.Encoder().encode
    _decode = msgspec.msgpack.Decoder(Entry).decode

    def dumps(self, value: Entry) -> bytes:
        return self._encode(value)

    def loads(self, value: bytes | None) -> Entry | None:
        if value is None:
            return None
        try:
            return self._decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None  # written by another version: a miss, overwritten on the next store


class RedisEntryCache(RedisCache):
    """aiocache's RedisCache, configured from a redis:// URL, that purges with SCAN, not KEYS/FLUSHDB.

    aiocache 0.12's Redis backend works with redis-py 8; only the calls redis-py deprecated
    (PSETEX, close) and the whole-database clear are replaced.
    """

    def __init__(self, url: str, timeout_s: float, **kwargs: Any) -> None:
        params = parse_url(url)
        host = params.pop("host", "127.0.0.1")
        port = params.pop("port", 6379)
        db = params.pop("db", 0)
        password = params.pop("password", None)
        params["socket_timeout"] = timeout_s
        super().__init__(
            serializer=EntrySerializer(), timeout=None, endpoint=host, port=port, db=db, password=password,
            create_connection_timeout=timeout_s, connection_pool_kwargs=params, **kwargs,
        )

    async def _set(self, key: str, value: Any, ttl: float | None = None, _cas_token: Any = None, _conn: Any = None) -> Any:
        if _cas_token is not None:
            return await super()._set(key, value, ttl, _cas_token, _conn)
        # One SET with PX (aiocache would call PSETEX/SETEX, deprecated in redis-py).
        return await self.client.set(key, value, px=max(1, int(ttl * 1000)) if ttl else None)

    async def _clear(self, namespace: str | None = None, _conn: Any = None) -> int:
        if not namespace:
            raise ValueError("refusing to clear a whole Redis database: give a key prefix")
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in namespace) + "*"
        deleted = 0
        batch: list[bytes] = []
        async for key in self.client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += await self.client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += await self.client.unlink(*batch)
        return deleted

    async def _close(self, *args: Any, _conn: Any = None, **kwargs: Any) -> None:
        await self.client.aclose()


class _Unavailable(Exception):
    """Redis is in its cool-down after a failure: don't even try."""


class RedisStore:
    """The shared backend. Every call fails open: on any Redis error it answers "nothing".

    After a failure Redis is not called again for `retry_s` (so a dead Redis costs nothing per
    request), and the warning is logged at most once every 10 s.
    """

    shared = True

    def __init__(self, url: str, key_prefix: str, timeout_s: float, retry_s: float) -> None:
        self.cache = RedisEntryCache(url, timeout_s)
        self.client = self.cache.client
        self.url = url
        self.entry_prefix = key_prefix + ":e:"
        self.lock_prefix = key_prefix + ":lock:"
        self.retry_s = retry_s
        self.up: bool | None = None  # None until the first call
        self.errors = 0
        self._retry_at = 0.0
        self._warned_at = -_WARNING_INTERVAL_S

    async def start(self) -> None:
        await self.ping()  # only to know and log its state: the gateway starts either way

    async def close(self) -> None:
        await self.cache.close()

    async def _call(self, operation: Any, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now < self._retry_at:
            raise _Unavailable
        try:
            result = await operation(*args, **kwargs)
        except (RedisError, OSError, asyncio.TimeoutError) as error:
            self._failed(error, now)
            raise _Unavailable from None
        if self.up is not True:
            if self.up is False:
                log.info("cache redis is reachable again", url=self.url)
            self.up = True
        return result

    def _failed(self, error: BaseException, now: float) -> None:
        self.up = False
        self.errors += 1
        self._retry_at = now + self.retry_s
        if now - self._warned_at >= _WARNING_INTERVAL_S:
            self._warned_at = now
            log.warning("cache redis unavailable: serving misses", url=self.url,
                        error=f"{type(error).__name__}: {error}", retry_in_s=self.retry_s)

    async def ping(self) -> bool:
        try:
            await self._call(self.client.ping)
        except _Unavailable:
            return False
        return True

    async def get(self, key: str) -> Entry | None:
        try:
            return await self._call(self.cache.get, self.entry_prefix + key)
        except _Unavailable:
            return None

    async def put(self, key: str, entry: Entry, ttl_s: float) -> bool:
        try:
            await self._call(self.cache.set, self.entry_prefix + key, entry, ttl=float(ttl_s))
        except _Unavailable:
            return False
        return True

    async def purge(self, prefix: str) -> int:
        """Delete entries whose key starts with `prefix`; raises `RedisError` when Redis is down."""
        return await self.cache.clear(namespace=self.entry_prefix + prefix)

    async def try_lock(self, key: str, token: str, ttl_s: float) -> bool | None:
        """True: we lead; False: another replica leads; None: Redis is down (lead without a lock)."""
        try:
            return bool(await self._call(self.client.set, self.lock_prefix + key, token, nx=True, px=max(1, int(ttl_s * 1000))))
        except _Unavailable:
            return None

    async def unlock(self, key: str, token: str) -> None:
        try:
            await self._call(self.client.eval, RedisBackend.RELEASE_SCRIPT, 1, self.lock_prefix + key, token)
        except _Unavailable:
            pass  # it expires on its own after lock_timeout_s

    async def peek(self, entry_key: str, lock_key: str) -> tuple[bool, bool] | None:
        """(entry exists, lock exists) without reading the entry; None when Redis is down."""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.exists(self.entry_prefix + entry_key)
                pipe.exists(self.lock_prefix + lock_key)
                entry_count, lock_count = await self._call(pipe.execute)
        except _Unavailable:
            return None
        return bool(entry_count), bool(lock_count)

    def stats(self) -> dict[str, Any]:
        return {"redis": "up" if self.up else ("down" if self.up is False else "unknown"), "redis_errors": self.errors}
