"""The gateway application: routing, the request pipeline and the operational endpoints.

`make_app(config)` builds an aiohttp application with its own plugin manager. Every request
under ``/v1`` becomes a `Flow` that runs the hook stages (see `gatekeeper.hookspecs`), and the
response, from a plugin, the cache or the upstream, is relayed through one code path so that
observers, metering and audit see hits and misses alike.
"""

from __future__ import annotations

import asyncio
import inspect
import posixpath
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import unquote

import msgspec
from aiohttp import HttpVersion11, web
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gatekeeper.access_log import AccessLine, AccessLog
from gatekeeper.config import Config, ConfigError
from gatekeeper.cors import Cors
from gatekeeper.errors import GatewayError, StartupError
from gatekeeper.flow import Flow, GatewayResponse, Outcome, Principal, new_request_id
from gatekeeper.forwarded import client_address, parse_networks
from gatekeeper.logs import get_logger, register_secret
from gatekeeper.memo import BoundedMemo
from gatekeeper.plugins import PluginSet, build_hooks
from gatekeeper.route_metrics import RouteCounts
from gatekeeper.uploads import Upload, upload_path_pattern

__all__ = ["Gateway", "GATEWAY", "PRINCIPAL", "make_app", "normalize_path"]

log = get_logger("gatekeeper")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_encode_json = msgspec.json.Encoder().encode


_UNSAFE_PATH = re.compile(r"[%?#\\\x00-\x1f\x7f]")
_UNSAFE = "\x00unsafe"  # what the path memo holds for a path refused with invalid_path
_PATH_MEMO_SIZE = 1024


def normalize_path(raw_path: str) -> str:
    """The one path every decision uses: decoded, dot segments resolved, slashes merged.

    ``/v1/../admin``, ``/v1/%2e%2e/admin`` and ``//admin`` all become ``/admin``, so routing and
    authorization can never disagree about which route a request is for.
    """
    path = unquote(raw_path.partition("?")[0])
    normalized = posixpath.normpath("/" + path.lstrip("/"))
    if normalized.startswith("//"):
        normalized = "/" + normalized.lstrip("/")
    return normalized


# The admin principal on requests to plugin routes under /admin/.
PRINCIPAL = web.RequestKey("principal", Principal)


_WRAP_ARGS = ("flow", "chunks")


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


class Gateway:
    """One running gateway: config, plugins, metrics registry and request counters."""

    def __init__(self, config: Config, plugin_set: PluginSet, app: web.Application) -> None:
        self.config = config
        self.plugins = plugin_set
        self.hooks = plugin_set.hooks
        self.app = app
        self.metrics = CollectorRegistry(auto_describe=True)
        self.route_counts = RouteCounts()
        self.metrics.register(self.route_counts)
        # The core's, not a plugin's: it stays when metering is blocked or replaced.
        Gauge("gatekeeper_in_flight_requests", "Requests being served right now.",
              registry=self.metrics).set_function(lambda: self.in_flight)
        self.started = False
        self.in_flight = 0
        self.draining = False
        self.admin_routes: dict[tuple[str, str], Handler] = {}
        self._paths: BoundedMemo[str, str] = BoundedMemo(_PATH_MEMO_SIZE)  # raw path -> normalized (or _UNSAFE)
        self._max_body = config.server.max_body_bytes
        self._max_upload = config.server.max_upload_bytes
        self._upload_paths = upload_path_pattern(config.server.upload_paths)
        self._max_concurrency = config.server.max_concurrency
        server = config.server
        use_json = server.log_format == "json" or (server.log_format == "auto" and not sys.stderr.isatty())
        self.access_log = AccessLog(json_lines=use_json) if server.access_log else None
        self._trusted_proxies = parse_networks(server.trusted_proxies)
        self.cors = Cors(server.cors_allow_origins) if server.cors_allow_origins else None
        for secret in config.secrets():
            register_secret(secret)

    # ------------------------------------------------------------ lifecycle

    async def start(self, _app: web.Application | None = None) -> None:
        """Run every `startup` hook; the first that fails stops the start with a `StartupError`,
        after the plugins it reached (itself included) have had their `shutdown` hook."""
        reached: list[object] = []
        for function, argnames in self.hooks.impls("startup"):
            reached.append(_owner(function))
            try:
                await _call_impl(function, argnames, {"gateway": self})
            except ConfigError:  # a setting only the plugin could judge: a config error like the others
                await self._shut_down(reached)
                raise
            except Exception as error:
                await self._shut_down(reached)
                raise StartupError(self._plugin_name(function), error) from error
        self.started = True
        log.info("gateway started", plugins=[p.name for p in self.plugins.loaded])

    async def _shut_down(self, plugins: list[object]) -> None:
        """Best effort, after a failed start: close what the started plugins opened (sessions,
        pools, files), so the process ends without leaks or warnings about them."""
        for function, argnames in self.hooks.impls("shutdown"):
            if _owner(function) not in plugins:
                continue
            try:
                await _call_impl(function, argnames, {"gateway": self})
            except Exception as error:  # it may never have finished starting
                log.debug("shutdown after a failed start", error=repr(error))

    async def stop(self, _app: web.Application | None = None) -> None:
        """Run every `shutdown` hook, each whatever the others did: one plugin's failure must not
        cost the audit its last records or metering its last rows."""
        self.started = False
        await self._call_each("shutdown", {"gateway": self}, "a plugin failed to shut down")
        if self.access_log is not None:
            self.access_log.flush()

    async def reload(self, config: Config) -> None:
        """Hand a new, valid config to every `reload_config` hook; one that raises keeps its old
        settings and is logged, and the others still take theirs."""
        await self._call_each("reload_config", {"gateway": self, "config": config},
                              "a plugin failed to reload its config")

    async def _call_each(self, hook: str, arguments: dict[str, Any], failure: str) -> None:
        for function, argnames in self.hooks.impls(hook):
            try:
                await _call_impl(function, argnames, arguments)
            except Exception:
                log.exception(failure, plugin=self._plugin_name(function))

    def _plugin_name(self, function: Callable[..., Any]) -> str:
        """The registered name of the plugin a hook implementation belongs to."""
        return self.hooks.pm.get_name(_owner(function)) or function.__module__

    def mount_routes(self) -> None:
        for routes in self.hooks.call_sync("register_routes", gateway=self):
            for route in routes:
                path = normalize_path(route.path)
                self.admin_routes[(route.method.upper(), path)] = route.handler  # type: ignore[attr-defined]

    # ------------------------------------------------------------ routing

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._trusted_proxies:
            request = self._as_from_client(request)
        path = self._paths.get(request.raw_path)
        if path is None:
            path = self._normalized_path(request.raw_path)
        if path is _UNSAFE:
            # Still encoded after one decode (%252e), or a decoded ?/#: the upstream URL would be
            # decoded again and could leave /v1. Nothing legitimate needs that.
            return self.error_response(GatewayError(400, "Invalid characters in the request path.", code="invalid_path"))
        if path.startswith("/v1/") or path == "/v1":
            if self.cors is not None and self.cors.is_preflight(request):
                return self.cors.preflight(request)
            return await self.run_pipeline(request, path)
        if path == "/health":
            return web.json_response({"status": "ok"})
        if path == "/ready":
            return await self.ready(request)
        if path == "/metrics":
            return web.Response(body=generate_latest(self.metrics), headers={"content-type": CONTENT_TYPE_LATEST})
        handler = self.admin_routes.get((request.method, path))
        if handler is not None or path.startswith("/admin/") or path == "/admin":
            return await self.run_admin(request, path, handler)
        return self.error_response(GatewayError(404, f"Unknown route {request.method} {path}.", code="unknown_url"))

    async def expect_continue(self, request: web.Request) -> None:
        """``Expect: 100-continue`` as nginx answers it, but no ``100 Continue`` for a body the
        pipeline will refuse unread (over `max_body_bytes`, or `max_upload_bytes` for an upload,
        or at the concurrency limit): the client gets the refusal without sending the body.
        Other expectations are ignored, as nginx ignores them, rather than answered with
        aiohttp's plain-text 417."""
        if request.version != HttpVersion11 or request.headers.get("Expect", "").lower() != "100-continue":
            return
        path = self._paths.get(request.raw_path) or self._normalized_path(request.raw_path)
        limit = self._max_upload if self._is_upload(request.method, path) else self._max_body
        if request.content_length is not None and request.content_length > limit:
            return
        if self._max_concurrency and self.in_flight >= self._max_concurrency:
            return
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's own handler: the answer proper has not begun

    def _as_from_client(self, request: web.Request) -> web.Request:
        """`request` with the client's address as `remote` when a trusted proxy relayed it, so the
        flow, the audit record and every plugin see the client, not the load balancer."""
        client = client_address(request.remote, request.headers.getall("X-Forwarded-For", ()), self._trusted_proxies)
        return request if client == request.remote else request.clone(remote=client)

    def _normalized_path(self, raw_path: str) -> str:
        """`normalize_path`, or `_UNSAFE`; remembered for the few distinct paths clients send."""
        path = normalize_path(raw_path)
        if _UNSAFE_PATH.search(path):
            path = _UNSAFE
        return self._paths.remember(raw_path, path)

    async def ready(self, _request: web.Request) -> web.Response:
        checks: dict[str, Any] = {}
        for impl in self.hooks.pm.hook.ready_check.get_hookimpls():
            report = await _call_impl(impl.function, impl.argnames, {"gateway": self})
            if report is not None:
                checks[impl.plugin_name] = report
        ready = self.started and not self.draining and all(c.get("ready", True) for c in checks.values())
        body = {"ready": ready, "started": self.started, "draining": self.draining, "plugins": checks}
        return web.json_response(body, status=200 if ready else 503)

    def error_response(self, error: GatewayError, request_id: str | None = None) -> web.Response:
        response = GatewayResponse.from_error(error, request_id or new_request_id())
        return web.Response(status=response.status, headers=response.headers, body=response.body)

    async def run_admin(self, request: web.Request, path: str, handler: Handler | None) -> web.StreamResponse:
        """Admin routes answer only to a principal that `authenticate` marks as admin."""
        flow = Flow(request, new_request_id(), path, b"")
        try:
            principal = await self.hooks.call_first("authenticate", flow=flow)
            if principal is None or not principal.is_admin:
                raise GatewayError(401 if principal is None else 403, "An admin key is required for this route.",
                                   code="invalid_api_key" if principal is None else "admin_required", outcome=Outcome.AUTH_FAIL)
            if handler is None:
                raise GatewayError(404, f"Unknown route {request.method} {path}.", code="unknown_url")
            request[PRINCIPAL] = principal
            response = await handler(request)
        except GatewayError as error:
            return self.error_response(error, flow.request_id)
        if not response.prepared:  # a route that streamed its answer has sent its headers already
            response.headers.setdefault("x-request-id", flow.request_id)
        return response

    # ------------------------------------------------------------ the pipeline

    async def run_pipeline(self, request: web.Request, path: str) -> web.StreamResponse:
        request_id = new_request_id()
        refusal: GatewayError | None = None
        upload = self._is_upload(request.method, path)
        limit = self._max_upload if upload else self._max_body
        if self._max_concurrency and self.in_flight >= self._max_concurrency:
            refusal = GatewayError(503, "The gateway is at its concurrency limit; retry shortly.", code="overloaded",
                                   headers={"retry-after": "1"})
        elif request.content_length is not None and request.content_length > limit:
            refusal = self._too_large(limit)
        elif request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket":
            # Forwarded as plain HTTP (Upgrade is hop-by-hop), it would fail upstream in some
            # other way: say plainly that no WebSocket (the Realtime API) is relayed.
            refusal = GatewayError(501, "This gateway does not relay WebSocket connections, so the Realtime API is "
                                   "not available through it.", code="websocket_unsupported")
        if refusal is not None:
            # Refused before the body is read, yet still a flow: the audit, the metrics and the
            # access log see every refusal.
            refused = Flow(request, request_id, path, b"")
            try:
                return await self._refuse(refused, refusal)
            finally:
                self._request_done(refused)
        self.in_flight += 1
        flow: Flow | None = None
        try:
            if upload:
                flow = Flow(request, request_id, path, b"")
                flow.upload = Upload(request.content, self._max_upload, self.config.server.body_timeout_s)
                return await self._run_stages(flow)
            try:
                body = await self._read_body(request) if request.body_exists else b""
            except GatewayError as error:
                flow = Flow(request, request_id, path, b"")
                return await self._refuse(flow, error)
            flow = Flow(request, request_id, path, body)
            return await self._run_stages(flow)
        finally:
            self.in_flight -= 1
            if flow is not None:
                self._request_done(flow)

    def _is_upload(self, method: str, path: str) -> bool:
        """A body that streams upstream as it arrives (`[server] upload_paths`), bounded by `max_upload_bytes`."""
        return self._upload_paths is not None and method == "POST" and self._upload_paths.match(path) is not None

    def _too_large(self, limit: int) -> GatewayError:
        return GatewayError(413, f"Request body is larger than the gateway's limit of {limit} bytes.",
                            code="request_too_large")

    async def _read_body(self, request: web.Request) -> bytes:
        content = request.content
        if content.is_eof():
            # The whole body came with the head (any small request): take it in one piece, with no
            # await, timer or bytearray copy. `request.read()` still answers for a plugin calling it.
            try:
                body = content.read_nowait()
            except RequestPayloadError:
                raise _malformed_body() from None
            if len(body) > self._max_body:
                raise self._too_large(self._max_body)
            request._read_bytes = body
            return body
        try:
            async with asyncio.timeout(self.config.server.body_timeout_s):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise self._too_large(self._max_body) from None
        except RequestPayloadError:  # a broken chunked encoding, a compressed body that won't decompress
            raise _malformed_body() from None
        except TimeoutError:
            raise GatewayError(408, "Timed out reading the request body.", code="request_timeout") from None

    async def _run_stages(self, flow: Flow) -> web.StreamResponse:
        hooks = self.hooks
        try:
            try:
                flow.principal = await hooks.flow_first("authenticate", flow)
                if flow.response is None:
                    await hooks.flow_all("normalize_request", flow)
                if flow.response is None:
                    await hooks.flow_all("check_request", flow)
                if flow.response is None:
                    flow.response = await hooks.flow_first("cache_lookup", flow)
                    if flow.response is not None:
                        flow.outcome = Outcome.CACHE_HIT
                if flow.response is None:
                    await hooks.flow_all("before_forward", flow)
                if flow.response is None:
                    flow.response = await hooks.flow_first("forward_request", flow)
                    if flow.response is None:
                        raise GatewayError(502, "No plugin forwarded the request upstream.", outcome=Outcome.UPSTREAM_ERROR)
            except GatewayError as error:
                return await self._refuse(flow, error)
            return await self._relay(flow)
        except asyncio.CancelledError:
            # The client went away (aiohttp cancels the handler): the flow still gets its one end call.
            if flow.outcome not in (Outcome.CLIENT_ABORT,) and not flow.scratch.get("_ended"):
                flow.outcome = Outcome.CLIENT_ABORT
                await self._end_with_error(flow, ConnectionResetError("client disconnected"))
            raise
        except Exception as error:  # a plugin bug: answer 500, log the traceback, never show it
            log.exception("pipeline error", request_id=flow.request_id, path=flow.path)
            if flow.scratch.get("_ended"):
                raise
            gateway_error = GatewayError(500, "The gateway had an error while processing your request.",
                                         type="server_error", code="gateway_error", outcome=Outcome.UPSTREAM_ERROR)
            gateway_error.__cause__ = error
            return await self._refuse(flow, gateway_error)
        finally:
            response = flow.response
            if response is not None and response.release is not None:
                response.release()

    async def _refuse(self, flow: Flow, error: GatewayError) -> web.Response:
        flow.outcome = flow.outcome if flow.outcome in (Outcome.CLIENT_ABORT, Outcome.TRUNCATED) else error.outcome
        if flow.response is not None and flow.response.release is not None:
            flow.response.release()
        flow.response = GatewayResponse.from_error(error, flow.request_id)
        flow.status = error.status
        self._finish_headers(flow, flow.response.headers)
        await self._end_with_error(flow, error)
        return web.Response(status=error.status, headers=flow.response.headers, body=flow.response.body)

    def _finish_headers(self, flow: Flow, headers: CIMultiDict[str]) -> None:
        headers.setdefault("x-request-id", flow.request_id)
        headers["x-gatekeeper-request-id"] = flow.request_id
        if flow.cache_status is not None:
            headers["x-gatekeeper-cache"] = flow.cache_status

    async def _end_with_error(self, flow: Flow, error: BaseException) -> None:
        if flow.scratch.get("_ended"):
            return
        flow.scratch["_ended"] = True
        flow.error = error
        flow.time_end = time.time()
        for function, argnames in self.hooks.impls("exchange_error"):
            try:
                await _call_impl(function, argnames, {"flow": flow, "error": error})
            except Exception:
                log.exception("exchange_error hook failed", request_id=flow.request_id)

    async def _complete(self, flow: Flow) -> GatewayError | None:
        """Run exchange_complete; a GatewayError from it (audit can't write) fails the flow."""
        flow.time_end = time.time()
        if flow.outcome is None:
            flow.outcome = Outcome.OK if (flow.status or 0) < 400 else (
                Outcome.UPSTREAM_ERROR if flow.upstream_request_id or flow.attempts else Outcome.REJECTED)
        try:
            # A plugin that fails here is logged and the rest still run: one plugin's bug must
            # not cost the request its audit record or its cache entry.
            await self.hooks.flow_each("exchange_complete", flow, GatewayError, self._complete_failed)
        except GatewayError as error:
            flow.outcome = error.outcome
            await self._end_with_error(flow, error)
            return error
        flow.scratch["_ended"] = True
        return None

    def _complete_failed(self, flow: Flow, function: Callable[..., Any]) -> None:
        log.exception("exchange_complete hook failed", request_id=flow.request_id, plugin=self._plugin_name(function))

    async def _relay(self, flow: Flow) -> web.StreamResponse:
        """Send flow.response to the client, through the observers, then end the flow."""
        response = flow.response
        assert response is not None
        flow.status = response.status
        headers = response.headers
        self._finish_headers(flow, headers)

        chunks: AsyncIterator[bytes] | None = response.chunks
        observed = False
        observers = self.hooks.callers("wrap_response_stream", _WRAP_ARGS)
        if observers:
            source = chunks if chunks is not None else _once(response.body or b"")
            wrapped = source
            for observe in observers:
                result = observe(flow, wrapped)
                if result is not None:
                    wrapped = result
            if wrapped is not source:
                chunks, observed = wrapped, True

        if chunks is None or (response.body is not None and not observed):
            # The whole body is in memory (cache hit, small upstream reply): one write.
            body = response.body or b""
            if flow.collect_response_body:
                flow.response_body = body
            failure = await self._complete(flow)
            if failure is not None:
                return self._failed_response(flow, failure)
            flow.bytes_sent = len(body)
            return web.Response(status=response.status, headers=headers, body=body)
        return await self._stream(flow, chunks, headers)

    def _failed_response(self, flow: Flow, error: GatewayError) -> web.Response:
        failed = GatewayResponse.from_error(error, flow.request_id)
        flow.status = error.status
        self._finish_headers(flow, failed.headers)  # x-gatekeeper-request-id, like every other answer
        return web.Response(status=error.status, headers=failed.headers, body=failed.body)

    async def _stream(self, flow: Flow, chunks: AsyncIterator[bytes], headers: CIMultiDict[str]) -> web.StreamResponse:
        request = flow.request
        stream = web.StreamResponse(status=flow.status or 200, headers=headers)
        collected: list[bytes] | None = [] if flow.collect_response_body else None
        held: bytes | None = None  # one chunk is held back so exchange_complete runs before the end is released
        iterator = chunks.__aiter__()
        try:
            await stream.prepare(request)
        except (ConnectionError, RuntimeError) as error:
            flow.outcome = Outcome.CLIENT_ABORT
            await self._end_with_error(flow, error)
            return stream
        while True:
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                break
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the upstream broke mid-body: the client must see a broken stream too
                if held is not None:
                    await self._write(stream, flow, held)
                flow.outcome = Outcome.TRUNCATED
                await self._end_with_error(flow, error)
                await _abort(request)
                return stream
            if collected is not None:
                collected.append(chunk)
            if held is not None and not await self._write(stream, flow, held):
                flow.outcome = Outcome.CLIENT_ABORT
                await self._end_with_error(flow, ConnectionResetError("client disconnected"))
                return stream
            held = chunk
        if collected is not None:
            flow.response_body = collected[0] if len(collected) == 1 else b"".join(collected)
            collected = None  # the chunks are joined: not held while the last write waits for the client
        failure = await self._complete(flow)
        if failure is not None:
            await _abort(request)  # headers are gone: the only honest signal left is a broken stream
            return stream
        if held is not None:
            await self._write(stream, flow, held)
        try:
            await stream.write_eof()
        except ConnectionError:
            pass
        return stream

    async def _write(self, stream: web.StreamResponse, flow: Flow, chunk: bytes) -> bool:
        try:
            await stream.write(chunk)
        except ConnectionError:
            return False
        flow.bytes_sent += len(chunk)
        return True

    def _request_done(self, flow: Flow) -> None:
        """Count the request for /metrics and write its access-log line."""
        self.route_counts.count(flow.route, flow.status)
        if self.access_log is None:
            return
        principal = flow.principal
        self.access_log.record(AccessLine(
            request_id=flow.request_id,
            method=flow.method,
            path=flow.path,
            status=flow.status,
            ms=round(flow.elapsed_ms, 2),
            tenant=principal.tenant if principal else None,
            key_id=principal.key_id if principal else None,
            model=_logged_model(flow),
            cache=flow.cache_status,
            outcome=flow.outcome,
            upstream_request_id=flow.upstream_request_id,
        ))


async def _call_impl(function: Callable[..., Any], argnames: Sequence[str], arguments: dict[str, Any]) -> Any:
    """One hook impl, given the arguments it names (pluggy lets it take fewer than the spec); its
    result, awaited when it is awaitable."""
    result = function(*[arguments[name] for name in argnames])
    return await result if inspect.isawaitable(result) else result


def _owner(function: Callable[..., Any]) -> object:
    """The plugin a hook implementation belongs to: its instance, or its module."""
    owner = getattr(function, "__self__", None)
    return owner if owner is not None else sys.modules.get(function.__module__)


def _malformed_body() -> GatewayError:
    return GatewayError(400, "The request body could not be read: its chunked encoding or its Content-Encoding "
                        "is broken.", code="invalid_request_body")


def _logged_model(flow: Flow) -> str | None:
    """The model as sent when a plugin has read it, else the normalized request's (defaults applied)."""
    model = flow.scratch.get("model")
    if model is None:
        normalized = flow.scratch.get("normalize")
        model = normalized.get("model") if normalized is not None else None
    return model if isinstance(model, str) else None


async def _abort(request: web.Request, flush_wait_s: float = 1.0) -> None:
    """End the client's connection without the final chunk, so its SDK raises.

    What was already written is flushed first (bounded), so the client keeps every event it was
    sent; only then is the socket closed, before aiohttp could write a clean end.
    """
    transport = request.transport
    if transport is None:
        return
    deadline = time.monotonic() + flush_wait_s
    while transport.get_write_buffer_size() and not transport.is_closing() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    transport.abort()


GATEWAY = web.AppKey("gateway", Gateway)


def make_app(config: Config, extra_plugins: list[Any] | None = None) -> web.Application:
    """Build the aiohttp application for `config` (plus plugins registered just for tests)."""
    plugin_set = build_hooks(config, extra_plugins)
    app = web.Application(client_max_size=config.server.max_body_bytes)
    gateway = Gateway(config, plugin_set, app)
    app[GATEWAY] = gateway
    gateway.mount_routes()
    app.router.add_route("*", "/{tail:.*}", gateway.handle, expect_handler=gateway.expect_continue)
    app.on_startup.append(gateway.start)
    app.on_cleanup.append(gateway.stop)
    if gateway.cors is not None:  # a signal per response: only when asked for
        app.on_response_prepare.append(gateway.cors.on_response_prepare)
    return app
