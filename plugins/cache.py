"""The content-hash cache: a paid-for answer is replayed instead of being paid for again.

The key is sha256 over the method, the path, the scope (the tenant, unless ``scope =
"global"``) and `flow.canonical` (built by the normalize plugin). A hit replays the stored
status, headers and body byte for byte (SSE streams included), with ``age``, and restores
`flow.usage` and `flow.annotations`, so metering and audit treat it without recomputing.

On a miss the request leads a single flight (see `cache_flight`): identical requests that
arrive meanwhile wait for its answer instead of calling the upstream; with Redis they also
wait across replicas (``SET NX PX`` lock, then a poll for the entry). A leader whose client
disconnects while followers wait finishes its upstream call in the background and caches it
for them. Only complete 200 answers are stored: never errors, ``no-store`` answers, or
truncated and aborted streams. Redis trouble is a miss, never an error.

``flow.scratch["cache"]`` holds a `CacheMeta` for the flow (role, key, and on a hit the
stored answer's ``upstream_request_id``, ``model``, ``created`` and ``age_s``).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from aiohttp import web
from multidict import CIMultiDict

from gatekeeper import hookimpl
from gatekeeper.config import Config
from gatekeeper.errors import GatewayError
from gatekeeper.flow import Flow, GatewayResponse, Outcome
from gatekeeper.logs import get_logger, register_url_secrets
from gatekeeper.memo import BoundedMemo
from gatekeeper_plugins.cache_backends import Entry, MemoryStore, RedisStore, tenant_tag
from gatekeeper_plugins.cache_flight import FAILED, PASS, Flight, FlightBoard, UpstreamPump
from gatekeeper_plugins.cache_metrics import CacheCollector
from gatekeeper_plugins.cache_policy import (
    URL_TTL_CAP_S,
    RequestControls,
    has_image_url,
    replayed_headers,
    request_controls,
    upstream_forbids_store,
    usage_from_body,
    worth_keeping,
)
from gatekeeper_plugins.normalize_rules import DEFAULT_CACHE_ENDPOINTS, IMAGE_ROUTES

if TYPE_CHECKING:
    from gatekeeper.app import Gateway

__all__ = ["Plugin", "CacheConfig", "CacheMeta"]

log = get_logger("gatekeeper.cache")

Endpoint = Literal["images/generations", "images/edits", "images/variations", "embeddings", "chat/completions", "responses"]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]

_HASH_IN_THREAD_BYTES = 1 << 20
_POLL_FIRST_S = 0.02  # a follower on another replica polls Redis from this interval ...
_POLL_MAX_S = 0.25  # ... backing off to this one
_SHUTDOWN_WAIT_S = 10.0
_KEY_PREFIX_MEMO = 4096  # (method, path, scope) triples whose key prefix is kept encoded


class CacheConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    scope: Literal["tenant", "global"] = "tenant"
    ttl_s: PositiveFloat = 86400.0
    max_bytes: PositiveInt = 536870912
    max_entry_bytes: PositiveInt = 67108864
    lock_timeout_s: PositiveFloat = 120.0
    endpoints: list[Endpoint] = msgspec.field(default_factory=lambda: list(DEFAULT_CACHE_ENDPOINTS))
    key_prefix: str = "gk:cache"
    redis_timeout_s: PositiveFloat = 0.1
    redis_retry_s: NonNegativeFloat = 2.0


class CacheMeta:
    """What the cache knows about one flow: ``flow.scratch["cache"]``.

    `role` is "hit", "leader" (first of a single flight) or "solo" (forwarded on its own); a
    ``no-store`` request gets no CacheMeta at all. On a hit, `upstream_request_id`, `model`, `created` and `age_s` describe
    the stored answer. `detached` is a future set when a leader's client left while followers
    waited: it resolves to the upstream `usage` (or None) once the background call finishes,
    for a plugin that wants to meter what the upstream charged.
    """

    __slots__ = ("key", "storage_key", "role", "ttl_s", "flight", "upstream_request_id", "model", "created",
                 "age_s", "detached", "forward_task", "pump", "parts")

    def __init__(self, key: str, storage_key: str, ttl_s: float) -> None:
        self.key = key
        self.storage_key = storage_key
        self.role = "solo"
        self.ttl_s = ttl_s
        self.flight: Flight | None = None
        self.upstream_request_id: str | None = None
        self.model: str | None = None
        self.created: float | None = None
        self.age_s: int | None = None
        self.detached: asyncio.Future[dict[str, Any] | None] | None = None
        self.forward_task: asyncio.Task[GatewayResponse | None] | None = None
        self.pump: UpstreamPump | None = None
        self.parts: list[bytes] = []

    @property
    def hit(self) -> bool:
        return self.role == "hit"


class Stats:
    __slots__ = ("hits", "misses", "bypasses", "stores")

    def __init__(self) -> None:
        self.hits = self.misses = self.bypasses = self.stores = 0


class Plugin:
    """Answer repeated requests from the cache; coalesce identical ones in flight."""

    name = "cache"
    config_section = "cache"
    Config = CacheConfig

    def __init__(self, config: Config, settings: CacheConfig) -> None:
        self.settings = settings
        register_url_secrets(settings.redis_url)
        self.routes = frozenset(settings.endpoints)
        self.stats = Stats()
        self.board = FlightBoard()
        self.store: MemoryStore | RedisStore = self._make_store(settings)
        self.gateway: Gateway | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._global_scope = settings.scope == "global"
        self._plain_controls = RequestControls(False, False, settings.ttl_s)  # a request with no cache headers
        self._key_prefixes: BoundedMemo[tuple[str, str, str | None], bytes] = BoundedMemo(_KEY_PREFIX_MEMO)
        self._forwarders_seen: tuple[Callable[[Flow], Any], ...] | None = None
        self._forwarders_after_me: tuple[Callable[[Flow], Any], ...] = ()

    @staticmethod
    def _make_store(settings: CacheConfig) -> MemoryStore | RedisStore:
        if settings.backend == "redis":
            return RedisStore(settings.redis_url, settings.key_prefix, settings.redis_timeout_s, settings.redis_retry_s)
        return MemoryStore(settings.max_bytes)

    def describe(self) -> str:
        return f"backend={self.settings.backend} scope={self.settings.scope} endpoints={','.join(sorted(self.routes))}"

    # ------------------------------------------------------------ lifecycle

    @hookimpl
    async def startup(self, gateway: Gateway) -> None:
        """Connect the backend (a Redis that is down only logs) and export the stats."""
        self.gateway = gateway
        await self.store.start()
        gateway.metrics.register(CacheCollector(self))

    @hookimpl
    async def shutdown(self) -> None:
        """Let background stores and detached upstream calls finish, then close Redis."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=_SHUTDOWN_WAIT_S)
        await self.store.close()

    @hookimpl
    async def ready_check(self) -> dict[str, Any]:
        """The cache never makes the gateway unready: a Redis that is down means misses."""
        report: dict[str, Any] = {"ready": True, "backend": self.settings.backend, **self.snapshot()}
        if isinstance(self.store, RedisStore):
            report["redis"] = "up" if await self.store.ping() else "down"
        return report

    @hookimpl
    def register_routes(self) -> list[web.RouteDef]:
        """``DELETE /admin/cache[?tenant=T]``: purge every entry, or one tenant's."""
        return [web.delete("/admin/cache", self.purge)]

    async def purge(self, request: web.Request) -> web.Response:
        tenant = request.query.get("tenant")
        prefix = "" if tenant is None else tenant_tag(tenant) + ":"
        try:
            deleted = await self.store.purge(prefix)
        except Exception as error:  # Redis down or failing mid-scan
            log.warning("cache purge failed", error=f"{type(error).__name__}: {error}")
            raise GatewayError(503, "The cache backend is unavailable; nothing was purged.",
                               code="cache_unavailable") from None
        log.info("cache purged", tenant=tenant, deleted=deleted)
        return web.json_response({"deleted": deleted})

    def snapshot(self) -> dict[str, Any]:
        """The counters behind /metrics and /ready."""
        return {
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "bypasses": self.stats.bypasses,
            "stores": self.stats.stores,
            "coalesced": self.board.coalesced,
            "in_flight": len(self.board.flights),
            **self.store.stats(),
        }

    # ------------------------------------------------------------ lookup

    @hookimpl
    def cache_lookup(self, flow: Flow) -> GatewayResponse | Awaitable[GatewayResponse | None] | None:
        """A stored (or just-fetched, for followers) answer, or None to forward. Stops at first non-None result."""
        # Not `async def`: with the memory backend a hit, and the miss that opens a flight, need no
        # await; the dispatcher awaits the coroutine returned for the rest (Redis, a flight to
        # follow, a body hashed in a thread).
        if flow.method != "POST" or flow.route not in self.routes or flow.upload is not None:
            # Not a cacheable route (no x-gatekeeper-cache header at all), or an upload whose
            # body streams upstream unread, which no key could name.
            return None
        headers = flow.headers
        if "cache-control" in headers or "x-gatekeeper-cache-ttl" in headers:
            controls = request_controls(headers, self.settings.ttl_s)
        else:
            controls = self._plain_controls
        canonical = flow.canonical
        if controls.no_store or canonical is None:
            if controls.no_store:
                self.stats.bypasses += 1
                flow.cache_status = "BYPASS"
            else:  # nothing to key on (not a JSON object): forwarded, never stored
                self.stats.misses += 1
                flow.cache_status = "MISS"
            return None
        scope_value = None if self._global_scope else (flow.principal.tenant if flow.principal else "")
        prefix = self._key_prefix(flow.method, flow.path, scope_value)
        if len(canonical) > _HASH_IN_THREAD_BYTES:
            return self._lookup_hashed_in_thread(flow, prefix, canonical, scope_value, controls)
        return self._lookup(flow, hashlib.sha256(prefix + canonical).hexdigest(), scope_value, controls)

    def _key_prefix(self, method: str, path: str, scope_value: str | None) -> bytes:
        """What the key hashes before `flow.canonical`: method, path and scope, one per line."""
        memo_key = (method, path, scope_value)
        prefix = self._key_prefixes.get(memo_key)
        if prefix is None:
            prefix = self._key_prefixes.remember(
                memo_key, f"{method}\n{path}\n{'*' if scope_value is None else 't:' + scope_value}\n".encode())
        return prefix

    async def _lookup_hashed_in_thread(self, flow: Flow, prefix: bytes, canonical: bytes, scope_value: str | None,
                                       controls: RequestControls) -> GatewayResponse | None:
        key = await asyncio.to_thread(lambda: hashlib.sha256(prefix + canonical).hexdigest())
        result = self._lookup(flow, key, scope_value, controls)
        return await result if inspect.isawaitable(result) else result

    def _lookup(self, flow: Flow, key: str, scope_value: str | None,
                controls: RequestControls) -> GatewayResponse | Awaitable[GatewayResponse | None] | None:
        flow.cache_key = key
        meta = CacheMeta(key, tenant_tag(scope_value) + ":" + key, controls.ttl_s)
        flow.scratch["cache"] = meta
        if controls.no_cache:
            self.stats.bypasses += 1
            flow.cache_status = "BYPASS"
            flow.collect_response_body = True
            if self.board.get(key) is None:
                if isinstance(self.store, RedisStore):
                    return self._lead_bypass(meta)
                self._open_flight(meta)
            return None
        store = self.store
        if isinstance(store, RedisStore) or self.board.get(key) is not None:
            return self._lookup_or_follow(flow, meta)
        entry = store.get_now(meta.storage_key)
        if entry is not None:
            return self._hit(flow, meta, entry)
        self._open_flight(meta)
        return self._miss(flow)

    async def _lead_bypass(self, meta: CacheMeta) -> None:
        await self._lead(meta, wait_for_replicas=False)

    async def _lookup_or_follow(self, flow: Flow, meta: CacheMeta) -> GatewayResponse | None:
        key = meta.key
        deadline = asyncio.get_running_loop().time() + self.settings.lock_timeout_s
        while True:
            flight = self.board.get(key)
            if flight is None:
                entry = await self.store.get(meta.storage_key)
                if entry is not None:
                    return self._hit(flow, meta, entry)
                if self.board.get(key) is None:  # nobody started it while we looked
                    entry = await self._lead(meta, deadline=deadline)
                    return self._hit(flow, meta, entry) if entry is not None else self._miss(flow)
                continue
            result = await self.board.follow(flight, deadline)
            if isinstance(result, Entry):
                self.board.coalesced += 1
                return self._hit(flow, meta, result)
            if result is not FAILED:  # PASS or TIMEOUT: forward on our own
                return self._miss(flow)
            # FAILED: the leader's error is not ours; one of the followers leads next

    def _hit(self, flow: Flow, meta: CacheMeta, entry: Entry) -> GatewayResponse:
        headers = CIMultiDict(entry.headers)
        age = max(0, int(time.time() - entry.created))
        headers["age"] = str(age)
        flow.usage = entry.usage
        flow.annotations = dict(entry.annotations) if entry.annotations else {}
        flow.cache_status = "HIT"
        meta.role = "hit"
        meta.age_s = age
        meta.created = entry.created
        meta.model = entry.model
        meta.upstream_request_id = entry.upstream_request_id
        self.stats.hits += 1
        return GatewayResponse(entry.status, headers, body=entry.body)

    def _miss(self, flow: Flow) -> None:
        self.stats.misses += 1
        flow.cache_status = "MISS"
        flow.collect_response_body = True
        return None

    def _open_flight(self, meta: CacheMeta) -> Flight:
        flight = self.board.open(meta.key)
        meta.flight = flight
        meta.role = "leader"
        return flight

    async def _lead(self, meta: CacheMeta, *, deadline: float = 0.0, wait_for_replicas: bool = True) -> Entry | None:
        """Open this key's flight; with Redis, take the cross-replica lock or wait for its holder.

        Returns an Entry when another replica's leader stored it meanwhile.
        """
        flight = self._open_flight(meta)
        if not isinstance(self.store, RedisStore):
            return None
        try:
            entry = await self._lead_across_replicas(flight, meta, deadline, wait_for_replicas)
        except BaseException:
            self._end_flight(flight, FAILED)
            raise
        if entry is not None:
            meta.flight = None
            self.board.land(flight, entry)
        return entry

    async def _lead_across_replicas(self, flight: Flight, meta: CacheMeta, deadline: float, wait: bool) -> Entry | None:
        assert isinstance(self.store, RedisStore)
        loop = asyncio.get_running_loop()
        token = secrets.token_hex(16)
        while True:
            taken = await self.store.try_lock(meta.key, token, self.settings.lock_timeout_s)
            if taken:
                flight.lock_token = token
            if taken is not False or not wait:
                return None  # we lead (with the lock, or without when Redis is down)
            delay = _POLL_FIRST_S
            while True:  # another replica leads: wait for its entry, or for its lock to go
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 1.5, _POLL_MAX_S)
                seen = await self.store.peek(meta.storage_key, meta.key)
                if seen is None:
                    return None
                entry_exists, lock_exists = seen
                if entry_exists and (entry := await self.store.get(meta.storage_key)) is not None:
                    return entry
                if not lock_exists:
                    break  # its leader failed: try to take over

    # ------------------------------------------------------------ the leader's upstream call

    @hookimpl
    def forward_request(self, flow: Flow) -> Awaitable[GatewayResponse | None] | None:
        """For a leader, run the forwarders after this one in a task of its own. Stops at first non-None result.

        The pipeline only waits for that task's answer, so that a leader whose client
        disconnects can still finish the call for its followers (`exchange_error` decides);
        other flows are left to the forwarder.
        """
        meta = flow.scratch.get("cache")
        if not isinstance(meta, CacheMeta) or meta.flight is None:
            return None
        return self._forward_in_task(flow, meta)

    async def _forward_in_task(self, flow: Flow, meta: CacheMeta) -> GatewayResponse | None:
        # The task hands its result to `answer` itself: asyncio.shield would wake this flow one
        # turn of the loop later, through a done callback. A cancelled flow cancels `answer` only.
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[GatewayResponse | None] = loop.create_future()
        meta.forward_task = loop.create_task(self._forward_after_me(flow, answer))
        return await answer

    async def _forward_after_me(self, flow: Flow, answer: asyncio.Future[GatewayResponse | None]) -> GatewayResponse | None:
        try:
            result = None
            for call in self._later_forwarders():
                result = call(flow)
                if inspect.isawaitable(result):
                    result = await result
                if result is not None:
                    break
        except BaseException as error:
            if not answer.done():
                if isinstance(error, asyncio.CancelledError):
                    answer.cancel()
                else:
                    answer.set_exception(error)
            task = asyncio.current_task()
            if task is not None:  # the flow got the error through `answer`: the task's copy is not news
                task.add_done_callback(_retrieve_error)
            raise
        if not answer.done():
            answer.set_result(result)
        return result

    def _later_forwarders(self) -> tuple[Callable[[Flow], Any], ...]:
        """The `forward_request` impls called after this one, recomputed when the plugins change."""
        assert self.gateway is not None
        callers = self.gateway.hooks.flow_callers("forward_request")
        if callers is not self._forwarders_seen:
            position = callers.index(self.forward_request)
            self._forwarders_after_me = callers[position + 1:]
            self._forwarders_seen = callers
        return self._forwarders_after_me

    @hookimpl
    def wrap_response_stream(self, flow: Flow, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes] | None:
        """A leader's streamed body is read by a pump task, so a leaving client can hand it over."""
        meta = flow.scratch.get("cache")
        if not isinstance(meta, CacheMeta) or meta.flight is None or flow.response is None or flow.response.chunks is None:
            return None
        return self._pumped(meta, chunks)

    async def _pumped(self, meta: CacheMeta, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        meta.pump = UpstreamPump(chunks)
        while (chunk := await meta.pump.next()) is not None:
            meta.parts.append(chunk)
            yield chunk

    # ------------------------------------------------------------ store

    @hookimpl(trylast=True)
    def exchange_complete(self, flow: Flow) -> None:
        """Store a complete 200 answer (with `flow.usage` and `flow.annotations`) and wake the followers."""
        meta = flow.scratch.get("cache")
        if not isinstance(meta, CacheMeta) or meta.role == "hit":
            return
        # The chunks kept in case the client left are not needed once it has its answer; the flow
        # may live on a while (the annotations pending), and a large answer's chunks with it.
        meta.parts = []
        if flow.annotations_pending:
            # The client has its answer; the entry (and the followers) wait for the annotations.
            self._spawn(self._store_when_annotated(flow, meta))
            return
        self._store_complete(flow, meta)

    async def _store_when_annotated(self, flow: Flow, meta: CacheMeta) -> None:
        try:
            await flow.annotations_ready()
        except BaseException:  # cancelled: an entry without its annotations would recompute them on every hit
            if meta.flight is not None:
                self._end_flight(meta.flight, FAILED)
            raise
        self._store_complete(flow, meta)

    def _store_complete(self, flow: Flow, meta: CacheMeta) -> None:
        response = flow.response
        body = flow.response_body
        entry = None
        if flow.status == 200 and flow.outcome == Outcome.OK and body is not None and response is not None:
            entry = self._entry(flow, response.status, response.headers, body, flow.usage, flow.annotations)
        if entry is None:
            if meta.flight is not None:
                self._end_flight(meta.flight, PASS if flow.status == 200 else FAILED)
            return
        self._store(meta, entry, self._ttl(flow.route, meta.ttl_s, entry.body, entry.model))

    def _entry(self, flow: Flow, status: int, headers: CIMultiDict[str], body: bytes,
               usage: dict[str, Any] | None, annotations: dict[str, Any]) -> Entry | None:
        """The entry for an answer followers may share; None when the upstream said ``no-store``
        or the 200 is no answer to keep (`worth_keeping`): then each follower asks for itself."""
        if upstream_forbids_store(headers):
            return None
        if not worth_keeping(headers, body):
            log.warning("not caching a 200 that is no answer: an HTML page, or JSON that is not one object",
                        request_id=flow.request_id, route=flow.route, content_type=headers.get("content-type"),
                        bytes=len(body))
            return None
        normalized = flow.scratch.get("normalize")
        model = normalized.get("model") if isinstance(normalized, dict) else None
        return Entry(
            status=status,
            headers=replayed_headers(headers, flow.upstream_request_id),
            body=body,
            created=time.time(),
            usage=usage,
            annotations=dict(annotations),
            model=model if isinstance(model, str) else flow.model,
            upstream_request_id=flow.upstream_request_id,
        )

    def _ttl(self, route: str, ttl_s: float, body: bytes, model: str | None = None) -> float:
        # GPT image models only ever answer with b64_json (contract section 11): no need to scan
        # their 1-50 MB bodies for a `url` key (half a millisecond per 1.5 MB).
        if model is not None and model.startswith(("gpt-image", "chatgpt-image")):
            return ttl_s
        if route in IMAGE_ROUTES and has_image_url(body):
            return min(ttl_s, URL_TTL_CAP_S)
        return ttl_s

    def _store(self, meta: CacheMeta, entry: Entry, ttl_s: float) -> None:
        keep = ttl_s > 0 and len(entry.body) <= self.settings.max_entry_bytes
        flight = meta.flight
        store = self.store
        if not isinstance(store, RedisStore):
            if keep and store.put_now(meta.storage_key, entry, ttl_s):
                self.stats.stores += 1
            if flight is not None:
                self._end_flight(flight, entry)
            return
        # Followers are answered now; the flight stays on the board until Redis has the entry,
        # so requests arriving meanwhile join it instead of missing.
        if flight is not None:
            self.board.land(flight, entry, retire=False)
        if keep or flight is not None:
            self._spawn(self._store_shared(meta.storage_key, entry, ttl_s if keep else 0.0, flight))

    async def _store_shared(self, storage_key: str, entry: Entry, ttl_s: float, flight: Flight | None) -> None:
        try:
            if ttl_s > 0:
                try:
                    stored = await self.store.put(storage_key, entry, ttl_s)
                except (TypeError, msgspec.EncodeError) as error:  # an annotation msgpack can't carry
                    log.warning("cache entry not stored", error=str(error))
                    stored = False
                if stored:
                    self.stats.stores += 1
        finally:
            if flight is not None:
                self._end_flight(flight, entry)

    def _end_flight(self, flight: Flight, result: Any) -> None:
        self.board.land(flight, result)
        if flight.lock_token is not None and isinstance(self.store, RedisStore):
            token, flight.lock_token = flight.lock_token, None
            self._spawn(self.store.unlock(flight.key, token))

    # ------------------------------------------------------------ errors and the leader leaving

    @hookimpl
    def exchange_error(self, flow: Flow) -> None:
        """Never store; a leader's followers re-elect, unless its client left and they can be served."""
        meta = flow.scratch.get("cache")
        if not isinstance(meta, CacheMeta) or meta.flight is None:
            return
        detachable = meta.pump is not None or meta.forward_task is not None
        if flow.outcome == Outcome.CLIENT_ABORT and meta.flight.followers > 0 and detachable:
            self._detach(flow, meta)
            return
        if meta.pump is not None:
            meta.pump.cancel()
        task = meta.forward_task
        if task is not None:
            if not task.done():
                task.cancel()
            elif not task.cancelled() and task.exception() is None:
                response = task.result()
                if response is not None and response is not flow.response and response.release is not None:
                    response.release()  # answered just as the client left; nobody will read it
        self._end_flight(meta.flight, FAILED)

    def _detach(self, flow: Flow, meta: CacheMeta) -> None:
        """Take the upstream call over from the pipeline: finish, store and serve it in the background."""
        meta.detached = asyncio.get_running_loop().create_future()
        release = None
        if flow.response is not None:
            release, flow.response.release = flow.response.release, None  # the pipeline must not close it
        log.info("leader's client left; finishing the upstream call for its followers",
                 request_id=flow.request_id, followers=meta.flight.followers if meta.flight else 0)
        self._spawn(self._finish_detached(flow, meta, release))

    async def _finish_detached(self, flow: Flow, meta: CacheMeta, release: Any) -> None:
        assert meta.flight is not None and meta.detached is not None
        result: Any = FAILED
        usage = None
        try:
            if meta.pump is not None:
                assert flow.response is not None
                response = flow.response
                parts = meta.parts
                await meta.pump.drain(parts)
            else:
                response = flow.response or (await meta.forward_task if meta.forward_task else None)
                if response is None:
                    raise RuntimeError("no upstream response to finish")
                release = release or response.release
                if response.body is not None:
                    parts = [response.body]
                else:
                    parts = [chunk async for chunk in response.chunks] if response.chunks is not None else []
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            if response.status == 200:
                usage = usage_from_body(body, response.is_event_stream)
                entry = self._entry(flow, response.status, response.headers, body, usage, {})
                if entry is None:
                    result = PASS
                else:
                    result = entry  # the followers get it even if it can't be kept
                    ttl_s = self._ttl(flow.route, meta.ttl_s, body, entry.model)
                    if ttl_s > 0 and len(body) <= self.settings.max_entry_bytes:
                        if await self.store.put(meta.storage_key, entry, ttl_s):
                            self.stats.stores += 1
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning("detached upstream call failed", request_id=flow.request_id,
                        error=f"{type(error).__name__}: {error}")
        finally:
            if release is not None:
                release()
            self._end_flight(meta.flight, result)
            if not meta.detached.done():
                meta.detached.set_result(usage)

    # ------------------------------------------------------------ background work

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("cache background task failed", error=repr(task.exception()))


def _retrieve_error(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
