"""The built-in forwarder: sends a flow to the upstream and streams the answer back.

It is ``trylast`` on `forward_request`, so any plugin that returns a response first takes over.
One pooled ``ClientSession`` serves every request. The upstream key replaces whatever
credentials the client sent; hop-by-hop headers are dropped both ways; bodies stream through
untouched, and small ones are read whole so the pipeline can answer in one write.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from multidict import CIMultiDict

from gatekeeper import hookimpl
from gatekeeper.config import Config, UpstreamConfig
from gatekeeper.errors import GatewayError
from gatekeeper.flow import Flow, GatewayResponse, Outcome
from gatekeeper.logs import get_logger

log = get_logger("gatekeeper.forward")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "proxy-connection",
})
# Request headers the client never gets to pass upstream: credentials are the gateway's own, and
# the body is re-framed by the client session.
DROP_REQUEST = HOP_BY_HOP | {
    "host", "content-length", "authorization", "openai-organization", "openai-project", "accept-encoding",
    "cookie", "x-gatekeeper-cache-ttl",
}
DROP_RESPONSE = HOP_BY_HOP | {"date", "server", "set-cookie"}
SMALL_BODY_BYTES = 256 * 1024  # answers up to this size are read whole and sent in one write


def strip_headers(headers: Any, drop: frozenset[str] | set[str]) -> CIMultiDict[str]:
    """Copy headers without the hop-by-hop ones, including those named in `Connection`."""
    named = set()
    for value in headers.getall("connection", []):
        named.update(token.strip().lower() for token in value.split(","))
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower not in drop and lower not in named:
            out.add(name, value)
    return out


def model_matches(patterns: list[str], model: str | None) -> bool:
    from fnmatch import fnmatchcase

    if model is None:
        return "*" in patterns
    return any(fnmatchcase(model, pattern) for pattern in patterns)


class Plugin:
    """Forward flows to ``[upstream]`` (or the ``[upstreams.NAME]`` that serves the model)."""

    name = "forward"

    def __init__(self, config: Config, settings: None) -> None:
        self.config = config
        self.upstreams = config.all_upstreams()
        self.session: aiohttp.ClientSession | None = None

    def describe(self) -> str:
        return "forwards to " + ", ".join(f"{name}={u.base_url}" for name, u in self.upstreams.items())

    @hookimpl
    async def startup(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )

    @hookimpl
    async def shutdown(self) -> None:
        if self.session is not None:
            await self.session.close()

    def choose(self, flow: Flow) -> tuple[str, UpstreamConfig]:
        if flow.upstream_name:
            upstream = self.upstreams.get(flow.upstream_name)
            if upstream is None:
                raise GatewayError(502, f"No upstream named {flow.upstream_name!r} is configured.",
                                   code="upstream_not_found", outcome=Outcome.UPSTREAM_ERROR)
            return flow.upstream_name, upstream
        model = flow.model
        candidates = [(name, u) for name, u in self.upstreams.items() if model_matches(u.models, model)]
        if not candidates:
            raise GatewayError(404, f"No upstream serves the model {model!r}.", code="model_not_found", param="model")
        candidates.sort(key=lambda item: -item[1].priority)
        return candidates[0]

    def upstream_headers(self, flow: Flow, upstream: UpstreamConfig) -> CIMultiDict[str]:
        headers = strip_headers(flow.headers, DROP_REQUEST)
        if upstream.api_key:
            headers["Authorization"] = f"Bearer {upstream.api_key}"
        if upstream.organization:
            headers["OpenAI-Organization"] = upstream.organization
        if upstream.project:
            headers["OpenAI-Project"] = upstream.project
        # Plain bytes from upstream, so usage can be read and cached bodies are what clients get.
        headers["Accept-Encoding"] = "identity"
        return headers

    @hookimpl(trylast=True)
    async def forward_request(self, flow: Flow) -> GatewayResponse:
        assert self.session is not None, "forward plugin used before startup"
        name, upstream = self.choose(flow)
        url = upstream.base_url.rstrip("/") + "/" + flow.route
        if flow.query_string:
            url += "?" + flow.query_string
        timeout = aiohttp.ClientTimeout(total=upstream.total_timeout_s, sock_connect=upstream.connect_timeout_s,
                                        sock_read=upstream.read_timeout_s)
        flow.attempts += 1
        flow.scratch["upstream"] = name
        started = time.perf_counter()
        try:
            response = await self.session.request(
                flow.method, url, data=flow.body if flow.body else None,
                headers=self.upstream_headers(flow, upstream), timeout=timeout, allow_redirects=False,
            )
        except asyncio.TimeoutError:
            raise GatewayError(504, f"The upstream did not answer within the gateway's timeout.",
                               code="upstream_timeout", outcome=Outcome.UPSTREAM_ERROR) from None
        except aiohttp.ClientError as error:
            log.warning("upstream unreachable", upstream=name, error=type(error).__name__)
            raise GatewayError(502, "The gateway could not reach the upstream.",
                               code="upstream_unreachable", outcome=Outcome.UPSTREAM_ERROR) from None
        flow.upstream_latency_s = time.perf_counter() - started
        return await self.to_gateway_response(flow, response)

    async def to_gateway_response(self, flow: Flow, response: aiohttp.ClientResponse) -> GatewayResponse:
        headers = strip_headers(response.headers, DROP_RESPONSE)
        flow.upstream_request_id = response.headers.get("x-request-id")
        flow.openai_organization = response.headers.get("openai-organization")
        flow.openai_project = response.headers.get("openai-project")
        length = response.content_length
        if length is not None and length <= SMALL_BODY_BYTES and not headers.get("content-type", "").startswith("text/event-stream"):
            try:
                body = await response.read()
            except asyncio.TimeoutError:
                response.close()
                raise GatewayError(504, "The upstream stopped sending its response.", code="upstream_timeout",
                                   outcome=Outcome.UPSTREAM_ERROR) from None
            except aiohttp.ClientError:
                response.close()
                raise GatewayError(502, "The upstream connection broke while sending its response.",
                                   code="upstream_disconnected", outcome=Outcome.UPSTREAM_ERROR) from None
            return GatewayResponse(response.status, headers, body=body)
        return GatewayResponse(response.status, headers, chunks=_body_chunks(response), release=response.close)


async def _body_chunks(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The upstream body as it arrives; the connection goes back to the pool only when read in full."""
    async for chunk in response.content.iter_any():
        yield chunk
    response.release()
