"""The flow: one mutable object per request that travels through every stage.

Stages read what earlier stages left on it and add their own part: `authenticate` sets the
`principal`, `normalize_request` the `canonical` form, `cache_lookup` the `cache_key` and
`cache_status`, the forwarder the upstream ids, metering the `usage` and cost, and so on.
A stage ends the request early by setting `flow.response` (as mitmproxy's flows do).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import msgspec
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gatekeeper.errors import MALFORMED_JSON, GatewayError
from gatekeeper.uploads import Upload

__all__ = ["Flow", "GatewayResponse", "Principal", "Outcome", "new_request_id"]

_decode_json = msgspec.json.Decoder().decode
_encode_json = msgspec.json.Encoder().encode

# Request ids: a random per-process prefix and a counter. Unique across replicas and restarts
# without a syscall per request.
_REQUEST_ID_PREFIX = "req_gk_" + os.urandom(6).hex()
_request_counter = itertools.count(1)


def new_request_id() -> str:
    """A new gateway request id (``req_gk_...``), for a flow or for an answer made without one."""
    return f"{_REQUEST_ID_PREFIX}{next(_request_counter):012x}"


class Outcome:
    """The audit outcomes a flow can end with (pinned field values)."""

    OK = "ok"
    CACHE_HIT = "cache_hit"
    REJECTED = "rejected"
    AUTH_FAIL = "auth_fail"
    UPSTREAM_ERROR = "upstream_error"
    TRUNCATED = "truncated"
    CLIENT_ABORT = "client_abort"


class Principal(msgspec.Struct, frozen=True):
    """Who is calling: set by `authenticate`, read by every later stage.

    `key_id` is a stable name for the client key, never the secret. `labels` carries free-form
    attributes such as `department` into metering and audit.
    """

    key_id: str
    tenant: str
    labels: dict[str, str] = {}
    models: tuple[str, ...] | None = None
    is_admin: bool = False


class GatewayResponse:
    """A response on its way to the client: from the cache, the upstream or a plugin.

    Exactly one of `body` (the whole body, already in memory) and `chunks` (an async iterator
    that streams it) is set. `release` is called once the response is finished with, to hand an
    upstream connection back to its pool.
    """

    __slots__ = ("status", "headers", "body", "chunks", "release")

    def __init__(
        self,
        status: int,
        headers: CIMultiDict[str] | dict[str, str] | None = None,
        *,
        body: bytes | None = None,
        chunks: AsyncIterator[bytes] | None = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        self.status = status
        self.headers: CIMultiDict[str] = headers if isinstance(headers, CIMultiDict) else CIMultiDict(headers or {})
        self.body = body
        self.chunks = chunks
        self.release = release

    @classmethod
    def from_error(cls, error: GatewayError, request_id: str) -> "GatewayResponse":
        headers = CIMultiDict(error.headers)
        headers["content-type"] = "application/json"
        headers["x-request-id"] = request_id
        return cls(error.status, headers, body=error.body())

    @property
    def is_event_stream(self) -> bool:
        return self.headers.get("content-type", "").startswith("text/event-stream")


class Flow:
    """Everything the gateway knows about one request, from arrival to the last byte."""

    __slots__ = (
        "request", "request_id", "method", "path", "route", "query_string", "headers", "body",
        "client_ip", "time_start", "started", "time_end", "_json", "_content_type", "principal", "canonical",
        "cache_key", "cache_status", "upstream_name", "response", "status", "attempts",
        "upstream_request_id", "openai_organization", "openai_project", "upstream_latency_s",
        "collect_response_body", "response_body", "usage", "annotations", "annotations_pending", "cost_usd", "saved_usd", "outcome",
        "error", "bytes_sent", "scratch", "upload",
    )

    def __init__(self, request: web.Request, request_id: str, path: str, body: bytes) -> None:
        self.request = request
        self.request_id = request_id
        self.method: str = request.method
        self.path = path  # normalised, e.g. "/v1/images/generations"
        self.route = path[4:] if path.startswith("/v1/") else path.lstrip("/")  # "images/generations"
        self.query_string: str = request.query_string
        self.headers: CIMultiDictProxy[str] = request.headers
        self.body = body
        self.client_ip: str | None = request.remote
        self.time_start = time.time()
        self.started = time.perf_counter()
        self.time_end: float | None = None
        self._json: Any = _UNSET
        self._content_type: str | None = None
        self.principal: Principal | None = None
        self.canonical: bytes | None = None
        self.cache_key: str | None = None
        self.cache_status: str | None = None  # "HIT", "MISS", "BYPASS" on cacheable routes
        self.upstream_name: str | None = None  # a plugin may route the flow to a named upstream
        self.response: GatewayResponse | None = None
        self.status: int | None = None
        self.attempts = 0
        self.upstream_request_id: str | None = None
        self.openai_organization: str | None = None
        self.openai_project: str | None = None
        self.upstream_latency_s: float | None = None
        self.collect_response_body = False  # a plugin sets it to get `response_body` at the end
        self.response_body: bytes | None = None
        self.usage: dict[str, Any] | None = None  # the upstream's `usage` object, as sent
        # Facts about the response that plugins derive once on a miss (image hashes, C2PA) and the
        # cache stores with the entry and restores on a hit, so they are never recomputed.
        self.annotations: dict[str, Any] = {}
        # Work still adding to `annotations` after the response was released (see annotate_later).
        self.annotations_pending: list[asyncio.Future[Any]] | None = None
        self.cost_usd: Decimal | None = None
        self.saved_usd: Decimal | None = None
        self.outcome: str | None = None
        self.error: BaseException | None = None
        self.bytes_sent = 0
        self.scratch: dict[str, Any] = {}  # per-plugin state; key it by plugin name
        # A body that streams upstream as it arrives ([server] upload_paths): `body` is then b"".
        self.upload: Upload | None = None

    @property
    def content_type(self) -> str:
        """The request's media type, lower case, without parameters ("multipart/form-data")."""
        content_type = self._content_type
        if content_type is None:
            content_type = self._content_type = self.headers.get("content-type", "").partition(";")[0].strip().lower()
        return content_type

    @property
    def json(self) -> Any:
        """The request body decoded as JSON (once), or None when it is not a JSON request.

        Raises a 400 `GatewayError` for a JSON request whose body does not parse.
        """
        if self._json is _UNSET:
            if self.body and self.content_type in ("application/json", ""):
                try:
                    self._json = _decode_json(self.body)
                except MALFORMED_JSON:
                    self._json = None
                    raise GatewayError(
                        400,
                        "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                        "using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
                    ) from None
            else:
                self._json = None
        return self._json

    @property
    def ended(self) -> bool:
        """Whether the flow's one end has come: every `exchange_complete` impl has run, or
        `exchange_error` has begun. A plugin that reports how a flow ended waits for it."""
        return bool(self.scratch.get("_ended"))

    def replace_json(self, document: Any) -> None:
        """Rewrite a JSON request: `body` becomes `document` encoded, and `json` is `document` itself.

        For plugins that change the request before `normalize_request` (a prompt prefix), so the
        cache key, every later stage and the upstream all see the same rewritten request.
        """
        self.body = _encode_json(document)
        self._json = document
        self.scratch.pop("model", None)

    @property
    def model(self) -> str | None:
        """The requested model, from a JSON body or a multipart `model` field."""
        if "model" in self.scratch:
            return self.scratch["model"]
        model = None
        try:
            body = self.json
        except GatewayError:
            body = None
        if isinstance(body, dict):
            value = body.get("model")
            model = value if isinstance(value, str) else None
        elif self.content_type == "multipart/form-data":
            from gatekeeper.multipart import form_field

            model = form_field(self.headers.get("content-type", ""), self.body, "model")
        self.scratch["model"] = model
        return model

    def annotate_later(self, work: asyncio.Future[Any]) -> None:
        """Register `work` that adds to `annotations` after `exchange_complete` has returned.

        Hashing the images of a 1.5 MB answer takes a millisecond or more; the client need not
        wait for it. Whoever keeps the annotations (the cache, storing the entry) awaits
        `annotations_ready()` instead.
        """
        if self.annotations_pending is None:
            self.annotations_pending = []
        self.annotations_pending.append(work)

    async def annotations_ready(self) -> dict[str, Any]:
        """`annotations`, once all the work registered with `annotate_later` has ended (failed
        work included: its annotations are simply missing)."""
        while self.annotations_pending:
            pending, self.annotations_pending = self.annotations_pending, None
            await asyncio.wait(pending)
        return self.annotations

    @property
    def tenant(self) -> str | None:
        return self.principal.tenant if self.principal else None

    @property
    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0

    def __repr__(self) -> str:
        return f"<Flow {self.request_id} {self.method} {self.path} status={self.status}>"


_UNSET: Any = object()
