"""Where cache entries live: a size-bounded LRU in memory, or Redis shared by every replica.

Both are aiocache backends. aiocache's own memory backend has no size bound, so `LRUMemoryCache`
is a `BaseCache` of our own: it keeps the `Entry` objects themselves (nothing is serialised on a
hit or a store) and evicts the least recently used until the body bytes fit `max_bytes`.
`RedisEntryCache` is aiocache's `RedisCache` keeping each entry as a hash of a msgpack head and
the body's own bytes (never JSON or base64), with fast socket timeouts and a SCAN-based purge; its
hits are read by `EntryReader`, which receives a large body straight into the buffer it is served
from. `MemoryStore` and `RedisStore` put the same small interface in front of them for the plugin;
`RedisStore` fails open: any Redis error is a miss, and Redis is left alone for a cool-down.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from collections import OrderedDict
from typing import Any, cast

import msgspec
from aiocache.backends.redis import RedisBackend, RedisCache
from aiocache.base import BaseCache
from aiocache.serializers import BaseSerializer, NullSerializer
from redis.asyncio import ConnectionPool
from redis.asyncio.connection import UnixDomainSocketConnection, parse_url
from redis.exceptions import RedisError, ResponseError

from gatekeeper.logs import get_logger
from gatekeeper.memo import BoundedMemo

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
    body: bytes  # read from Redis: a bytearray when longer than 16 KiB (see `EntryReader`)
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
    more. Packed, an entry holds nothing the GC tracks; the entries hit lately have the two decoded
    once (`_unpack`), a few hundred dicts in all.
    """

    entry: Entry  # with usage None and annotations {}
    extras: bytes | None  # (usage, annotations) as msgpack, None when both are empty


def _pack(entry: Entry) -> _Packed:
    if entry.usage is None and not entry.annotations:
        return _Packed(entry, None)
    bare = msgspec.structs.replace(entry, usage=None, annotations={})
    return _Packed(bare, _encode_extras((entry.usage, entry.annotations)))


def _unpack(packed: _Packed) -> Entry:
    extras = packed.extras
    if extras is None:
        return packed.entry
    decoded = _recent_extras.get(extras)  # bytes keep their hash: a repeat costs one lookup
    if decoded is None:
        decoded = _recent_extras.remember(extras, _decode_extras(extras))
    usage, annotations = decoded
    # The same `usage` for every hit of an entry lets metering find its price by identity;
    # `annotations` is the flow's own, for plugins to add to.
    return msgspec.structs.replace(packed.entry, usage=usage, annotations=dict(annotations))


# The extras of the entries hit lately, decoded: a few hundred dicts for the GC to walk, not one
# per entry.
_recent_extras: BoundedMemo[bytes, tuple[dict[str, Any] | None, dict[str, Any]]] = BoundedMemo(256)


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


_ENTRY_FIELDS = ("h", "b")  # an entry's Redis hash: its head, and its body

_SCRATCH_BYTES = 64 * 1024  # each reader connection's buffer for reply lines and small values
_IN_PLACE_BYTES = 16 * 1024  # a longer value is received straight into a bytearray of its own
_LONGEST_LINE = 4096  # reply lines are short ("$1500000"); an error message is the longest


class _ReplyProtocol(asyncio.BufferedProtocol):
    """One connection of `EntryReader`: RESP2 replies of one request at a time.

    Lines and small values are parsed in a scratch buffer. A value longer than `_IN_PLACE_BYTES`
    gets a bytearray of its exact size, and the socket reads into it directly: the 1.5 MB body of
    a b64 image answer is copied once, by the kernel, and served from that bytearray.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._scratch = bytearray(_SCRATCH_BYTES)
        self._view = memoryview(self._scratch)
        self._start = 0  # unparsed bytes are self._scratch[self._start:self._end]
        self._end = 0
        self._skip = 0  # bytes still to drop: a value's closing CRLF
        self._small = -1  # the length of a value waiting in scratch for the rest of its bytes
        self._value: bytearray | None = None  # a long value being received in place
        self._value_view: memoryview | None = None
        self._filled = 0
        self._array: list[Any] | None = None
        self._missing = 0  # items the array still waits for
        self._replies: list[Any] = []
        self._expected = 0
        self._waiter: asyncio.Future[list[Any]] | None = None
        self._loop = asyncio.get_running_loop()
        self._timeout_s = 0.0
        self._heard_at = 0.0  # loop time of the last bytes received
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("Redis closed the connection"))

    async def request(self, commands: bytes, replies: int, timeout_s: float) -> list[Any]:
        """Send `commands` (RESP-encoded) and wait for their `replies`.

        Raises TimeoutError when Redis sends nothing for `timeout_s` (like a socket timeout: a large
        value that keeps arriving may take longer in all).
        """
        if self.closed or self.transport is None:
            raise ConnectionError("Redis closed the connection")
        self._replies = []
        self._expected = replies
        self._waiter = self._loop.create_future()
        self._timeout_s = timeout_s
        self._heard_at = self._loop.time()
        self._timer = self._loop.call_later(timeout_s, self._check_heard)
        self.transport.write(commands)
        try:
            return await self._waiter
        finally:
            self._waiter = None
            if self._timer is not None:
                self._timer.cancel()

    def _check_heard(self) -> None:
        if self._waiter is None or self._waiter.done():
            return
        silent_s = self._loop.time() - self._heard_at
        if silent_s >= self._timeout_s:
            self._fail(TimeoutError(f"Redis sent nothing for {self._timeout_s} s"))
        else:  # bytes came meanwhile: wait the rest of a timeout from the last of them
            self._timer = self._loop.call_later(self._timeout_s - silent_s, self._check_heard)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._value_view is not None:
            return self._value_view[self._filled:]
        if self._start == self._end:
            self._start = self._end = 0
        elif _SCRATCH_BYTES - self._end < _IN_PLACE_BYTES:
            pending = self._end - self._start
            self._scratch[:pending] = self._view[self._start:self._end]
            self._start, self._end = 0, pending
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        self._heard_at = self._loop.time()
        if self._value_view is None:
            self._end += nbytes
        else:
            self._filled += nbytes
            value = self._value
            assert value is not None
            if self._filled < len(value):
                return
            self._value = self._value_view = None
            self._skip = 2
            self._add(value)
        try:
            self._parse()
        except ValueError as error:  # not RESP: drop this connection
            self._fail(RedisError(f"unreadable reply from Redis: {error}"))

    def _parse(self) -> None:
        scratch = self._scratch
        while True:
            if self._skip:
                dropped = min(self._skip, self._end - self._start)
                self._start += dropped
                self._skip -= dropped
                if self._skip:
                    return
            if self._small >= 0:
                if self._end - self._start < self._small + 2:
                    return
                value = bytes(self._view[self._start:self._start + self._small])
                self._start += self._small + 2
                self._small = -1
                self._add(value)
                continue
            eol = scratch.find(b"\r\n", self._start, self._end)
            if eol < 0:
                if self._end - self._start > _LONGEST_LINE:
                    raise ValueError("no line end")
                return
            kind = scratch[self._start]
            line = bytes(self._view[self._start + 1:eol])
            self._start = eol + 2
            if kind == 0x24:  # $ a bulk string
                length = int(line)
                if length < 0:
                    self._add(None)
                elif length <= _IN_PLACE_BYTES:
                    self._small = length
                else:
                    self._receive_in_place(length)
                    if self._value is not None:
                        return
            elif kind == 0x2A:  # * an array
                count = int(line)
                if self._array is not None:
                    raise ValueError("nested array")  # no command sent here answers with one
                if count <= 0:
                    self._add(None if count < 0 else [])
                else:
                    self._array, self._missing = [], count
            elif kind == 0x2B:  # + a simple string
                self._add(line)
            elif kind == 0x2D:  # - an error
                self._add(ResponseError(line.decode(errors="replace")))
            elif kind == 0x3A:  # : an integer
                self._add(int(line))
            else:
                raise ValueError(f"unexpected reply type {chr(kind)!r}")

    def _receive_in_place(self, length: int) -> None:
        value = bytearray(length)
        ready = min(length, self._end - self._start)
        value[:ready] = self._view[self._start:self._start + ready]
        self._start += ready
        if ready == length:
            self._skip = 2
            self._add(value)
        else:
            self._value, self._value_view, self._filled = value, memoryview(value), ready

    def _add(self, value: Any) -> None:
        if self._array is not None:
            self._array.append(value)
            self._missing -= 1
            if self._missing:
                return
            value, self._array = self._array, None
        self._replies.append(value)
        if len(self._replies) == self._expected and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(self._replies)

    def _fail(self, error: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _command(*args: str | bytes) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class EntryReader:
    """The hit path's Redis reads: HMGET on connections of its own, kept idle between hits.

    redis-py reads replies through an asyncio.StreamReader, which pauses and resumes the socket
    every 128 KiB, wakes the reading task for each piece and copies the value two to four times:
    a 1.5 MB entry cost 2.4 ms of CPU one read at a time and 0.7-1.0 ms with 32 in flight (hiredis
    or not), against 0.3 ms here. Only `HMGET` of an entry goes this way; stores, locks and purges
    stay on redis-py. A connection that errs, times out or is cancelled mid-reply is closed, never
    reused.
    """

    def __init__(self, host: str, port: int, db: int, username: str | None, password: str | None,
                 timeout_s: float, path: str | None = None) -> None:
        self.host = host
        self.port = port
        self.path = path  # a unix socket's, instead of host and port
        self.timeout_s = timeout_s
        hello = []
        if password:
            hello.append(_command("AUTH", username, password) if username else _command("AUTH", password))
        if db:
            hello.append(_command("SELECT", str(db)))
        self._hello = b"".join(hello)
        self._hello_replies = len(hello)
        self._idle: list[_ReplyProtocol] = []
        self._closing = False

    @classmethod
    def from_url(cls, url: str, timeout_s: float) -> EntryReader | None:
        """A reader for a redis:// or unix:// URL; None for a rediss:// (TLS) one, whose entries
        redis-py reads."""
        params = parse_url(url)
        unix = params.get("connection_class") is UnixDomainSocketConnection
        if "connection_class" in params and not unix:
            return None
        return cls(params.get("host", "127.0.0.1"), int(params.get("port", 6379)), int(params.get("db", 0)),
                   params.get("username"), params.get("password"), timeout_s, params["path"] if unix else None)

    async def _connect(self) -> _ReplyProtocol:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeout_s):
            if self.path is not None:
                _, protocol = await loop.create_unix_connection(_ReplyProtocol, self.path)
            else:
                _, protocol = await loop.create_connection(_ReplyProtocol, self.host, self.port)
        if not self._hello:
            return protocol
        try:
            replies = await protocol.request(self._hello, self._hello_replies, self.timeout_s)
        except BaseException:
            protocol.close()
            raise
        for reply in replies:
            if isinstance(reply, ResponseError):  # a wrong password, a database that doesn't exist
                protocol.close()
                raise reply
        return protocol

    async def hmget(self, key: str, fields: tuple[str, ...]) -> list[bytes | bytearray | None]:
        """The fields' values (None where absent); raises `ResponseError` for an error reply."""
        protocol = None
        try:
            protocol = self._idle_connection() or await self._connect()
            (reply,) = await protocol.request(_command("HMGET", key, *fields), 1, self.timeout_s)
        except BaseException:
            if protocol is not None:
                protocol.close()
            raise
        if self._closing:
            protocol.close()  # the store closed while this read was under way
        elif not protocol.closed:
            self._idle.append(protocol)
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    def _idle_connection(self) -> _ReplyProtocol | None:
        while self._idle:
            protocol = self._idle.pop()
            if not protocol.closed:  # Redis may have closed it while it waited (a restart, a timeout)
                return protocol
        return None

    def close(self, final: bool = False) -> None:
        """Close the idle connections; when `final`, also those of reads under way as they end."""
        self._closing = self._closing or final
        while self._idle:
            self._idle.pop().close()


class EntrySerializer(BaseSerializer):
    """An entry as a Redis hash of two fields: `h`, the entry without its body as msgpack (via
    msgspec), and `b`, the body's own bytes.

    Apart from the head, the body is never decoded: a hit serves the buffer `EntryReader` received
    it into (a bytearray when longer than 16 KiB, else bytes), without another copy of its 1.5 MB.
    """

    DEFAULT_ENCODING = None  # values are bytes; aiocache must not decode them as text
    _encode = msgspec.msgpack.Encoder().encode
    _decode = msgspec.msgpack.Decoder(Entry).decode

    def dumps(self, value: Entry) -> dict[str, bytes]:
        return {"h": self._encode(msgspec.structs.replace(value, body=b"")), "b": value.body}

    def loads(self, value: list[bytes | bytearray | None] | None) -> Entry | None:
        if not value:
            return None
        head, body = value
        if head is None or body is None:
            return None
        remembered = type(head) is bytes  # a head over 16 KiB arrives as a bytearray: not hashable
        entry = _recent_heads.get(head) if remembered else None  # a repeat: one hash of it, no decode
        if entry is None:
            try:
                entry = self._decode(head)
            except (msgspec.DecodeError, msgspec.ValidationError):
                return None  # written by another version: a miss, overwritten on the next store
            if remembered:
                _recent_heads.remember(head, entry)
        # As from the memory store: the same `usage` for every hit of an entry, and
        # `annotations` of each flow's own.
        return msgspec.structs.replace(entry, body=body, annotations=dict(entry.annotations))


# The heads of the Redis entries hit lately, decoded (by their bytes: what Redis holds is the truth).
_recent_heads: BoundedMemo[bytes, Entry] = BoundedMemo(256)


class _ConnectionPool(ConnectionPool):
    """redis-py's pool, for aiocache, which always passes a host and a port: a unix socket's
    connections take neither (they would fail on every command)."""

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("connection_class") is UnixDomainSocketConnection:
            kwargs.pop("host", None)
            kwargs.pop("port", None)
        super().__init__(**kwargs)


class RedisEntryCache(RedisCache):
    """aiocache's RedisCache, configured from a redis://, rediss:// or unix:// URL, that keeps
    entries as hashes (see `EntrySerializer`) and purges with SCAN, not KEYS/FLUSHDB.

    aiocache 0.12's Redis backend works with redis-py 8; get, set, close and the whole-database
    clear are replaced. Its string commands (add, multi_get, multi_set, increment) are not for
    entries.
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
            create_connection_timeout=timeout_s, connection_pool_class=_ConnectionPool, connection_pool_kwargs=params,
            **kwargs,
        )
        self.reader = EntryReader.from_url(url, timeout_s)

    async def get_entry(self, key: str) -> Entry | None:
        """`get` without aiocache's per-call layers (enabled, timeout, plugins): the hit path."""
        return self.serializer.loads(await self._get(key))

    async def _get(self, key: str, encoding: Any = None, _conn: Any = None) -> Any:
        try:
            if self.reader is not None:
                return await self.reader.hmget(key, _ENTRY_FIELDS)
            return await self.client.hmget(key, _ENTRY_FIELDS)
        except ResponseError as error:
            if str(error).startswith("WRONGTYPE"):
                return None  # a plain string: an entry of the older format, a miss until replaced
            raise

    async def _set(self, key: str, value: Any, ttl: float | None = None, _cas_token: Any = None, _conn: Any = None) -> Any:
        if _cas_token is not None:
            raise ValueError("entries are not set with a CAS token")
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(key)  # the key may hold an entry of the older format, a string
            pipe.hset(key, mapping=value)
            if ttl:
                pipe.pexpire(key, max(1, int(ttl * 1000)))
            await pipe.execute()
        return True

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

    async def drop_idle_connections(self) -> None:
        """Close the idle connections, the reader's and redis-py's (after a failure they may be dead)."""
        if self.reader is not None:
            self.reader.close()
        await self.client.connection_pool.disconnect(inuse_connections=False)

    async def _close(self, *args: Any, _conn: Any = None, **kwargs: Any) -> None:
        if self.reader is not None:
            self.reader.close(final=True)
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
            if self.up is False:  # the first call after a cool-down: connections left idle may be dead
                await self.cache.drop_idle_connections()
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
            return await self._call(self.cache.get_entry, self.entry_prefix + key)
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
