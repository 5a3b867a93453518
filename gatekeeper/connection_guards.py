"""Connection-level protection against slow and greedy clients, which aiohttp's server lacks.

- Header timeout: a request head (request line and headers) must arrive in full within
  ``[server] header_timeout_s`` of its first byte (or of the connect, for a new connection), so
  slowloris clients that trickle header bytes are cut off. Idle keep-alive connections are the
  keep-alive timeout's business; body reads have their own timeout in the pipeline.
- Bounded write buffering: the transport's high-water mark is ``[server] write_buffer_bytes``.
  Above it aiohttp's writes wait (backpressure reaches the upstream read loop), so a client that
  does not read costs at most that much memory.
- Send timeout: a client whose buffer stays above the mark for ``[server] send_timeout_s``
  (it reads nothing) is disconnected, which cancels its flow and frees its concurrency slot.
- Protocol errors: a request aiohttp cannot parse (a header line too long, a malformed head) and
  a handler that raised are answered like every other refusal, with an OpenAI-shaped error and an
  ``x-request-id`` instead of aiohttp's plain text, and logged as one line (with a traceback only
  for the gateway's own failures). What the client sent is never echoed: it may hold a key.

`GuardedAppRunner` is an ``aiohttp.web.AppRunner`` whose connections are `GuardedRequestHandler`s.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from gatekeeper.errors import GatewayError
from gatekeeper.flow import new_request_id
from gatekeeper.logs import get_logger

__all__ = ["ConnectionGuards", "GuardedAppRunner", "GuardedRequestHandler", "GuardsCollector"]

log = get_logger("gatekeeper.server")


@dataclass
class ConnectionGuards:
    """The limits every connection gets, and how often each one closed a connection."""

    header_timeout_s: float
    send_timeout_s: float
    write_buffer_bytes: int
    closed: Counter[str] = field(default_factory=Counter)  # by reason: header_timeout, send_timeout


class GuardedRequestHandler(RequestHandler):
    """aiohttp's HTTP/1 protocol with a header timeout, a send timeout and a bounded send buffer."""

    __slots__ = ("_guards", "_head_since", "_head_timer", "_send_timer")

    def __init__(self, manager: web.Server, *, guards: ConnectionGuards, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guards = guards
        self._head_since: float | None = None  # when the bytes of a still incomplete request head began
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        high = self._guards.write_buffer_bytes
        transport.set_write_buffer_limits(high=high, low=high // 4)  # type: ignore[attr-defined]
        self._head_started(self._loop.time())

    def connection_lost(self, exc: BaseException | None) -> None:
        self._head_since = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_since is None and data and not self._request_in_progress and not self._messages:
            self._head_started(self._loop.time())  # the first bytes of a new request head
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            self._head_since = None  # the head is complete

    def _head_started(self, now: float) -> None:
        # One timer per connection, not one per request: a timer armed for an earlier head that
        # completed in time finds a later head pending when it fires and re-arms for that head's
        # deadline. Under keep-alive load a timer is armed about once per header timeout.
        self._head_since = now
        if self._head_timer is None:
            self._head_timer = self._loop.call_at(now + self._guards.header_timeout_s, self._check_head)

    def _check_head(self) -> None:
        self._head_timer = None
        since = self._head_since
        if since is None or self.transport is None:
            return
        deadline = since + self._guards.header_timeout_s
        if self._loop.time() < deadline - 0.001:  # timers may fire a clock tick early
            self._head_timer = self._loop.call_at(deadline, self._check_head)
            return
        self._guards.closed["header_timeout"] += 1
        log.debug("closing a connection whose request head did not arrive in time", peer=self.peername)
        self.force_close()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self._loop.call_later(self._guards.send_timeout_s, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timed_out(self) -> None:
        self._send_timer = None
        transport = self.transport
        if transport is None or not self.writing_paused:
            return
        self._guards.closed["send_timeout"] += 1
        log.debug("disconnecting a client that stopped reading", peer=self.peername)
        transport.abort()  # close() would wait for a buffer this client never drains

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # A body that broke (bad chunking, a gzip that won't inflate) was refused by the pipeline;
        # aiohttp, draining the rest of it before reusing the connection, meets the same error
        # again and closes the connection. The refusal is logged already: no traceback for it.
        if isinstance(kw.get("exc_info"), RequestPayloadError):
            return
        super().log_exception(*args, **kw)

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse or hand to the app, OpenAI-shaped."""
        if request.writer.output_size > 0:  # part of an answer is out: all that is left is to close
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        request_id = new_request_id()
        if isinstance(exc, HttpProcessingError):
            problem = _parse_problem(exc)
            error = GatewayError(status if 400 <= status < 500 else 400,
                                 f"The gateway could not parse this HTTP request: {problem}.",
                                 code="invalid_http_request")
            # TLS or a scanner on the plain port is routine on an open network: aiohttp too logs it at debug.
            quiet = isinstance(exc, BadHttpMethod) and self._request_count == 1
            (log.debug if quiet else log.info)("refused a malformed HTTP request", request_id=request_id,
                                               peer=request.remote, problem=type(exc).__name__)
        else:
            error = GatewayError(500, "The gateway had an error while processing your request.",
                                 type="server_error", code="gateway_error")
            log.error("request handler failed", request_id=request_id, path=request.path, exc_info=exc)
        response = web.Response(status=error.status, body=error.body(),
                                headers={"content-type": "application/json", "x-request-id": request_id})
        response.force_close()
        return response


def _parse_problem(error: HttpProcessingError) -> str:
    """What was wrong with a request aiohttp could not parse, in words that quote none of it."""
    if isinstance(error, LineTooLong):
        return f"a request line or header line is longer than {error.args[1]} bytes"
    if isinstance(error, BadHttpMethod):
        return "the method is not a valid HTTP method"
    if isinstance(error, BadStatusLine):
        return "the request line is malformed"
    if isinstance(error, InvalidURLError):
        return "the request target is malformed"
    if isinstance(error, InvalidHeader):
        return "a header is malformed"
    if isinstance(error, PayloadEncodingError):
        return "the body does not match its Content-Length or Transfer-Encoding"
    return "it is malformed"


class _GuardedServer(web.Server):
    def __init__(self, *args: Any, guards: ConnectionGuards, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guards = guards

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, guards=self.guards, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """An AppRunner whose server speaks through `GuardedRequestHandler`."""

    __slots__ = ("guards",)

    def __init__(self, app: web.Application, *, guards: ConnectionGuards, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guards = guards

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # starts the app and collects aiohttp's handler arguments
        return _GuardedServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            guards=self.guards,
            **server._kwargs,
        )


class GuardsCollector(Collector):
    """Connections the guards closed, by reason, read at scrape time."""

    def __init__(self, guards: ConnectionGuards) -> None:
        self.guards = guards

    def collect(self) -> Iterator[CounterMetricFamily]:
        closed = CounterMetricFamily("gatekeeper_connections_closed",
                                     "Client connections closed by the server's guards, by reason.", labels=["reason"])
        for reason in ("header_timeout", "send_timeout"):
            closed.add_metric([reason], self.guards.closed[reason])
        yield closed
