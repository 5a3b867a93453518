"""The built-in forwarder: sends a flow upstream, retries and fails over, streams the answer back.

It is ``trylast`` on `forward_request`, so any plugin that returns a response first takes over.
One pooled ``ClientSession`` serves every request. The upstream key replaces whatever
credentials the client sent; hop-by-hop headers are dropped both ways; bodies stream through
untouched, and small ones are read whole so the pipeline can answer in one write.

Faults (docs/resilience.md): connection failures and 429/500/502/503/504 are retried, with
failover across the upstreams that serve the model and a circuit breaker per upstream, until
``max_retries`` is used up, all before anything reaches the client. A request that may already
have reached the upstream (a stall or a drop after sending) is never sent again unless it is a
GET or the upstream has ``retry_after_send = true``: a generation sent twice is billed twice.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict

from gatekeeper import hookimpl
from gatekeeper.config import Config
from gatekeeper.errors import GatewayError, error_body
from gatekeeper.flow import Flow, GatewayResponse, Outcome
from gatekeeper.logs import get_logger, register_secret
from gatekeeper_plugins.forward_retry import RETRYABLE_STATUSES, SAFE_METHODS, backoff_s, retry_after_s
from gatekeeper_plugins.forward_routing import Router, Upstream, UpstreamCollector

log = get_logger("gatekeeper.forward")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "proxy-connection",
})
# Request headers the client never gets to pass upstream: credentials are the gateway's own, the
# body is re-framed by the client session, aiohttp's server has already decoded a compressed body
# (Content-Encoding), and the gateway answered any Expect itself.
DROP_REQUEST = HOP_BY_HOP | {
    "host", "content-length", "authorization", "openai-organization", "openai-project", "accept-encoding",
    "cookie", "x-gatekeeper-cache-ttl", "content-encoding", "expect",
}
# The gateway answers browsers itself ([server] cors_allow_origins): the upstream's CORS headers
# would otherwise reach them, through misses and cached entries, whatever that setting says.
DROP_RESPONSE = HOP_BY_HOP | {"date", "server", "set-cookie", "access-control-allow-origin",
                              "access-control-allow-credentials", "access-control-expose-headers",
                              "access-control-allow-methods", "access-control-allow-headers", "access-control-max-age"}
SMALL_BODY_BYTES = 256 * 1024  # other (non-JSON, non-SSE) answers up to this size are sent in one write
ERROR_BODY_BYTES = 64 * 1024  # a retryable error body longer than this is not kept for relaying
# How much of an answer may wait unread before the upstream socket is paused (aiohttp's default is
# 64 KiB: a 1.5 MB image answer paused and resumed the socket every ~100 KB it read, which cost
# about 8% of a large miss's CPU and 0.5 ms of its latency). A slow client still holds back the
# upstream: at most this much (times two, aiohttp's high-water mark) waits per request.
UPSTREAM_READ_BUFFER_BYTES = 1024 * 1024


def strip_headers(headers: Any, drop: frozenset[str] | set[str]) -> CIMultiDict[str]:
    """Copy headers without the hop-by-hop ones, including those named in `Connection`."""
    # Copy all, then delete the few present: a handful of C calls instead of a Python loop
    # over every header (the order of the rest is kept).
    out: CIMultiDict[str] = CIMultiDict(headers)
    for name in headers.getall("connection", ()):
        for token in name.split(","):
            out.popall(token.strip(), None)
    for name in drop:
        if name in out:
            del out[name]
    return out


@dataclass(slots=True)
class ErrorReply:
    """A retryable error answer from an upstream, read whole so it can be relayed as is."""

    status: int
    headers: CIMultiDict[str]
    body: bytes


@dataclass(slots=True)
class Failure:
    """Why one attempt did not produce a response to return.

    ``sent`` is True when the upstream may have received the request (so it may bill for it);
    ``reply`` is set when it answered with a retryable status.
    """

    kind: str  # "status", "connect_error", "proxy_error", "timeout", "disconnect"
    sent: bool
    detail: str
    reply: ErrorReply | None = None


class Plugin:
    """Forward flows to ``[upstream]`` or the ``[upstreams.NAME]`` that serve the model."""

    name = "forward"

    def __init__(self, config: Config, settings: None) -> None:
        self.config = config
        self.router = Router(config.all_upstreams())
        self.session: aiohttp.ClientSession | None = None

    def describe(self) -> str:
        return "forwards to " + ", ".join(f"{u.name}={u.base_url}" + (f" via proxy {u.proxy}" if u.proxy else "")
                                          for u in self.router.upstreams)

    # ------------------------------------------------------------ lifecycle

    @hookimpl
    async def startup(self, gateway: Any) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            read_bufsize=UPSTREAM_READ_BUFFER_BYTES,
        )
        gateway.metrics.register(UpstreamCollector(lambda: self.router))

    @hookimpl
    async def shutdown(self) -> None:
        if self.session is not None:
            await self.session.close()

    @hookimpl
    def ready_check(self) -> dict[str, Any]:
        """Ready while at least one upstream's breaker lets requests through."""
        upstreams = self.router.upstreams
        return {
            "ready": any(u.breaker.available() for u in upstreams),
            "upstreams": {u.name: u.breaker.report() for u in upstreams},
        }

    @hookimpl
    def reload_config(self, config: Config) -> None:
        for secret in config.secrets():
            register_secret(secret)
        self.router = Router(config.all_upstreams(), previous=self.router)

    # ------------------------------------------------------------ forwarding

    def upstream_headers(self, flow: Flow, upstream: Upstream) -> CIMultiDict[str]:
        headers = strip_headers(flow.headers, DROP_REQUEST)
        config = upstream.config
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        if config.organization:
            headers["OpenAI-Organization"] = config.organization
        if config.project:
            headers["OpenAI-Project"] = config.project
        # Plain bytes from upstream, so usage can be read and cached bodies are what clients get.
        headers["Accept-Encoding"] = "identity"
        if upstream.proxy_headers is not None and not upstream.tls:
            # aiohttp sends proxy_headers only with a CONNECT, which a plain http:// upstream doesn't get.
            headers.update(upstream.proxy_headers)
        return headers

    @hookimpl(trylast=True)
    async def forward_request(self, flow: Flow) -> GatewayResponse:
        """Try the flow's upstreams until one answers, within the retry budget and the deadline."""
        assert self.session is not None, "forward plugin used before startup"
        candidates = self.router.candidates(flow.model, flow.upstream_name)
        primary = candidates[0].config
        # Every candidate gets its turn (failover) even when max_retries allows fewer attempts.
        budget = max(1 + primary.max_retries, len(candidates))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + primary.total_timeout_s
        record: dict[str, Any] = {"upstreams": [], "last_error": None}
        flow.scratch["forward"] = record
        tries: dict[str, int] = {}  # attempts per upstream in this flow
        asked_delay: dict[str, float] = {}  # the retry-after of each upstream's last answer
        excluded: set[str] = set()  # upstreams that asked for a longer wait than retry_max_delay_s
        last_reply: ErrorReply | None = None
        failure: Failure | None = None
        unsafe_to_resend = False
        cursor = 0
        for _ in range(budget):
            upstream, cursor = self._next_upstream(candidates, cursor, excluded)
            if upstream is None:  # every breaker is open, or every upstream asked for a long wait
                break
            config = upstream.config
            delay = 0.0
            if upstream.name in tries:  # failing over to a fresh upstream goes at once
                delay = asked_delay.get(upstream.name)
                if delay is None:
                    delay = backoff_s(tries[upstream.name], config.retry_backoff_s, config.retry_max_delay_s)
            if loop.time() + delay >= deadline:
                break
            probe = upstream.breaker.acquire()
            verdict_given = False
            try:
                if delay:
                    await asyncio.sleep(delay)
                tries[upstream.name] = tries.get(upstream.name, 0) + 1
                flow.attempts += 1
                record["upstreams"].append(upstream.name)
                outcome = await self._attempt(flow, upstream, deadline - loop.time(), probe)
                verdict_given = True
            finally:
                if not verdict_given:
                    upstream.breaker.abandoned(probe)
            if isinstance(outcome, GatewayResponse):
                flow.upstream_name = upstream.name
                return outcome
            failure = outcome
            record["last_error"] = f"{upstream.name}: {failure.detail}"
            if flow.upload is not None and flow.upload.started:
                # Its body went upstream as it arrived and no copy is kept: this attempt was the
                # only one. The upstream's own error (a 429, a 500) is relayed for the client to judge.
                last_reply = failure.reply or last_reply
                break
            log.warning("upstream attempt failed", request_id=flow.request_id, upstream=upstream.name,
                        kind=failure.kind, detail=failure.detail, attempt=flow.attempts)
            if failure.reply is not None:
                last_reply = failure.reply
                wait = retry_after_s(failure.reply.headers)
                if wait is not None and wait > config.retry_max_delay_s:
                    excluded.add(upstream.name)
                elif wait is not None:
                    asked_delay[upstream.name] = wait
                else:
                    asked_delay.pop(upstream.name, None)
            elif failure.sent and not (flow.method in SAFE_METHODS or config.retry_after_send):
                unsafe_to_resend = True  # it may be generating already: a second send (anywhere) bills twice
                break
        return self._give_up(flow, candidates, last_reply, failure, unsafe_to_resend)

    def _next_upstream(self, candidates: list[Upstream], cursor: int,
                       excluded: set[str]) -> tuple[Upstream | None, int]:
        """The next usable candidate at or after `cursor` (cycling), and the cursor after it."""
        count = len(candidates)
        for step in range(count):
            index = (cursor + step) % count
            upstream = candidates[index]
            if upstream.name not in excluded and upstream.breaker.available():
                return upstream, index + 1
        return None, cursor

    async def _attempt(self, flow: Flow, upstream: Upstream, remaining_s: float,
                       probe: bool) -> GatewayResponse | Failure:
        """One request to one upstream; gives the breaker its verdict."""
        assert self.session is not None
        config = upstream.config
        url = upstream.base_url + "/" + flow.route
        if flow.query_string:
            url += "?" + flow.query_string
        timeout = aiohttp.ClientTimeout(total=min(config.total_timeout_s, remaining_s),
                                        connect=config.connect_timeout_s, sock_read=config.read_timeout_s)
        headers = self.upstream_headers(flow, upstream)
        upload = flow.upload
        if upload is not None and flow.request.content_length is not None and "Content-Encoding" not in flow.headers:
            # The length as the client declared it (aiohttp would otherwise re-chunk the stream);
            # not for a compressed body, which reaches the upstream decoded.
            headers["Content-Length"] = str(flow.request.content_length)
        started = time.perf_counter()
        try:
            response = await self.session.request(
                flow.method, url, data=upload.chunks() if upload is not None else flow.body or None, headers=headers,
                timeout=timeout, allow_redirects=False, proxy=upstream.proxy, proxy_headers=upstream.proxy_headers,
            )
            if response.status == 407 and upstream.proxy is not None:
                # The egress proxy's answer, not the upstream's (an http:// upstream gets no CONNECT
                # that would fail): relayed, an app would take it for OpenAI's own.
                response.close()
                refused = Failure("proxy_error", False, "the proxy answered HTTP 407 Proxy Authentication Required")
                return _failed(upstream, probe, refused)
            if response.status in RETRYABLE_STATUSES:
                failure = Failure("status", True, f"HTTP {response.status}", await _read_error_reply(response))
                return _failed(upstream, probe, failure, f"status_{response.status}")
            flow.upstream_latency_s = time.perf_counter() - started
            result = await self.to_gateway_response(flow, response, upstream)
        except Exception as error:  # noqa: BLE001 - every transport failure becomes a Failure
            if upload is not None and upload.error is not None:
                raise upload.error from None  # the client's body failed, not the upstream (no verdict given)
            failure = _transport_failure(error)
            if failure is None:
                raise
            return _failed(upstream, probe, failure)
        upstream.results["ok"] += 1
        upstream.breaker.succeeded(probe)
        return result

    async def to_gateway_response(self, flow: Flow, response: aiohttp.ClientResponse,
                                  upstream: Upstream) -> GatewayResponse:
        """Wrap the upstream's answer: small bodies are read whole, large ones and SSE stream through.

        Large JSON bodies (1-50 MB of base64) stream as they arrive unless `buffer_response_bytes`
        asks for them to be read whole first: then a break part-way still ends in a clean error
        that tells the SDK not to resend, instead of a cut the SDK would retry (and pay for twice).
        """
        headers = strip_headers(response.headers, DROP_RESPONSE)
        flow.upstream_request_id = response.headers.get("x-request-id")
        flow.openai_organization = response.headers.get("openai-organization")
        flow.openai_project = response.headers.get("openai-project")
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        event_stream = media_type == "text/event-stream"
        length = response.content_length
        limit = 0
        if not event_stream:
            if length is not None and length <= SMALL_BODY_BYTES:
                limit = SMALL_BODY_BYTES  # small enough for one write
            if media_type.endswith("json"):
                limit = max(limit, upstream.config.buffer_response_bytes)
        if not limit or (length is not None and length > limit):
            unjoined = length is not None and not event_stream
            return GatewayResponse(response.status, headers, chunks=_body_chunks(response, upstream, unjoined=unjoined),
                                   release=response.close)
        try:
            if length is not None:
                return GatewayResponse(response.status, headers, body=await response.read())
            parts: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_any():
                parts.append(chunk)
                size += len(chunk)
                if size > limit:  # no content-length, and longer than the limit: stream the rest
                    return GatewayResponse(response.status, headers, chunks=_body_chunks(response, upstream, parts),
                                           release=response.close)
        except BaseException:
            response.close()
            raise
        return GatewayResponse(response.status, headers, body=parts[0] if len(parts) == 1 else b"".join(parts))

    def _give_up(self, flow: Flow, candidates: list[Upstream], reply: ErrorReply | None,
                 failure: Failure | None, unsafe_to_resend: bool) -> GatewayResponse:
        """The answer when no attempt succeeded: the upstream's own last error, or the gateway's.

        ``x-should-retry: false`` once the gateway has made more than one attempt (the SDK's
        retries would only multiply upstream calls) and whenever a re-send could bill twice;
        otherwise the SDK's own retry logic decides.
        """
        tried = flow.scratch["forward"]["upstreams"]
        if tried:
            flow.upstream_name = tried[-1]  # for the audit record: where the last attempt went
        final = flow.attempts > 1 or unsafe_to_resend
        if failure is None:  # nothing was sent: every breaker is open
            wait = min(u.breaker.retry_in_s() for u in candidates)
            raise GatewayError(503, "Every upstream for this request is cooling down after repeated failures; "
                                    "retry later.", code="upstream_unavailable", outcome=Outcome.UPSTREAM_ERROR,
                               headers={"retry-after": str(max(1, math.ceil(wait))), "x-should-retry": "true"})
        if reply is not None:
            headers = strip_headers(reply.headers, DROP_RESPONSE)
            if final:
                headers["x-should-retry"] = "false"
            else:
                headers.setdefault("x-should-retry", "true")
            if reply.status in (429, 503) and "retry-after" not in headers:
                headers["retry-after"] = "1"
            flow.upstream_request_id = reply.headers.get("x-request-id")
            return GatewayResponse(reply.status, headers, body=reply.body)
        should_retry = {"x-should-retry": "false" if final else "true"}
        if failure.kind == "timeout":
            raise GatewayError(504, "The upstream did not answer within the gateway's timeout.",
                               code="upstream_timeout", outcome=Outcome.UPSTREAM_ERROR, headers=should_retry)
        if failure.kind == "connect_error":
            raise GatewayError(502, "The gateway could not reach the upstream.", code="upstream_unreachable",
                               outcome=Outcome.UPSTREAM_ERROR, headers=should_retry)
        if failure.kind == "proxy_error":
            raise GatewayError(502, "The gateway's egress proxy refused the connection to the upstream.",
                               code="upstream_proxy_error", outcome=Outcome.UPSTREAM_ERROR, headers=should_retry)
        raise GatewayError(502, "The upstream connection broke before it sent a complete answer.",
                           code="upstream_disconnected", outcome=Outcome.UPSTREAM_ERROR, headers=should_retry)


def _failed(upstream: Upstream, probe: bool, failure: Failure, result: str | None = None) -> Failure:
    """Count a failed attempt (under `result`, else its kind) and give the breaker its verdict."""
    upstream.results[result or failure.kind] += 1
    upstream.breaker.failed(probe)
    return failure


def _transport_failure(error: BaseException) -> Failure | None:
    """Classify a client-side exception; None for anything that is not a transport failure."""
    detail = f"{type(error).__name__}: {error}"[:300]
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return Failure("timeout", False, detail)  # the connection never opened: nothing was sent
    if isinstance(error, aiohttp.ClientConnectorError):
        return Failure("connect_error", False, detail)
    if isinstance(error, aiohttp.ClientHttpProxyError):  # the proxy refused the CONNECT: nothing was sent
        return Failure("proxy_error", False, detail)
    if isinstance(error, asyncio.TimeoutError):  # sock_read, or the total deadline, after sending
        return Failure("timeout", True, detail)
    if isinstance(error, aiohttp.ClientError):
        return Failure("disconnect", True, detail)
    return None


async def _read_error_reply(response: aiohttp.ClientResponse) -> ErrorReply:
    """Read a retryable error answer whole and hand the connection back (or close it)."""
    headers = CIMultiDict(response.headers)
    body: bytes | None = None
    try:
        if response.content_length is None or response.content_length <= ERROR_BODY_BYTES:
            parts: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_any():
                size += len(chunk)
                if size > ERROR_BODY_BYTES:
                    break
                parts.append(chunk)
            else:
                body = b"".join(parts)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        body = None
    finally:
        if body is None:
            response.close()
        else:
            response.release()
    if body is None:
        body = error_body(f"The upstream answered HTTP {response.status}.",
                          type="server_error" if response.status >= 500 else "rate_limit_exceeded")
        headers["content-type"] = "application/json"
        headers.popall("content-length", None)
    return ErrorReply(response.status, headers, body)


async def _body_chunks(response: aiohttp.ClientResponse, upstream: Upstream,
                       already_read: list[bytes] | None = None, unjoined: bool = False) -> AsyncIterator[bytes]:
    """The upstream body as it arrives; the connection goes back to the pool only when read in full.

    `unjoined` (a large body framed by content-length, not SSE): each socket read is passed on
    as it came. Under load several wait in the buffer, and `iter_any` would first copy them into
    one: for 1.5 MB of base64, a copy that costs more than the writes it saves. SSE and chunked
    bodies (whose pieces can be tiny) go as `iter_any` reads them.
    """
    for chunk in already_read or ():
        yield chunk
    try:
        if unjoined:
            async for chunk, _ in response.content.iter_chunks():
                if chunk:
                    yield chunk
        else:
            async for chunk in response.content.iter_any():
                yield chunk
    except (aiohttp.ClientError, asyncio.TimeoutError):
        # A break mid-body counts against the upstream; the pipeline ends the flow as truncated.
        upstream.results["disconnect"] += 1
        upstream.breaker.failed(False)
        raise
    response.release()
