"""Every hook a gatekeeper plugin can implement. Each docstring is that hook's contract.

Hooks may be plain functions or ``async def``; the gateway awaits whatever they return, in
pluggy's order (``tryfirst`` impls first, ``trylast`` last, otherwise last registered first).
An impl may accept fewer arguments than its spec lists.

A request meets the stages in this order::

    authenticate -> normalize_request -> check_request -> cache_lookup -> before_forward
        -> forward_request -> wrap_response_stream -> exchange_complete | exchange_error

Any stage may end the request early by setting ``flow.response`` or by raising
``gatekeeper.errors.GatewayError``. Every flow ends in exactly one ``exchange_complete`` or
``exchange_error`` call, client disconnects included.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from aiohttp import web

    from gatekeeper.app import Gateway
    from gatekeeper.config import Config
    from gatekeeper.flow import Flow, GatewayResponse, Principal

__all__ = [
    "hookspec",
    "hookimpl",
    "startup",
    "shutdown",
    "register_routes",
    "register_commands",
    "ready_check",
    "reload_config",
    "authenticate",
    "normalize_request",
    "check_request",
    "cache_lookup",
    "before_forward",
    "forward_request",
    "wrap_response_stream",
    "exchange_complete",
    "exchange_error",
]

hookspec = pluggy.HookspecMarker("gatekeeper")
hookimpl = pluggy.HookimplMarker("gatekeeper")


# ---------------------------------------------------------------- lifecycle


@hookspec
def startup(gateway: Gateway) -> None:
    """Open what the plugin needs (connections, files, background tasks) before the first request.

    Called once when the server starts, in hook order. ``/ready`` answers 200 only after every
    impl has returned. Raising stops the start: `ConfigError` as a config error, anything else as
    a `StartupError` naming the plugin, after the plugins started so far (this one included) have
    had their `shutdown`.
    """


@hookspec
def shutdown(gateway: Gateway) -> None:
    """Flush and close what `startup` opened, after in-flight requests have drained.

    Called once on graceful shutdown (SIGTERM, SIGINT), in hook order; every impl runs, even
    after another raised (that is logged). Must not lose data the plugin has accepted (queued
    usage rows, audit records).
    """


@hookspec
def register_routes(gateway: Gateway) -> list[web.RouteDef] | None:
    """Return extra aiohttp routes, for example ``web.get("/admin/usage", handler)``.

    Routes under ``/admin/`` are served only to callers whose principal ``is_admin``; the core
    checks that with the `authenticate` hook before the handler runs. Called once at app build.
    """


@hookspec
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add sub-commands to the ``gatekeeper`` CLI with ``subparsers.add_parser(...)``.

    Set ``func=callable(args) -> int`` as the parser's default; its return value is the exit code.
    """


@hookspec
def ready_check(gateway: Gateway) -> dict[str, Any] | None:
    """Report this plugin's health for ``GET /ready``: a dict with at least ``"ready": bool``.

    Anything else in the dict (circuit-breaker state, backlog sizes) is shown as is. Return None
    when there is nothing to report.
    """


@hookspec
def reload_config(gateway: Gateway, config: Config) -> None:
    """Take up a re-read config (on SIGHUP) without dropping requests in flight.

    ``config`` has been validated already; plugins pick out what they can change live (client
    keys, prices, budgets) and keep the rest. ``gateway.config`` still holds the old config.
    """


# ---------------------------------------------------------------- request stages


@hookspec(firstresult=True)
def authenticate(flow: Flow) -> Principal | None:
    """Decide who is calling and return their `Principal`; refuse by raising `GatewayError` (401).

    Called first for every ``/v1`` and ``/admin`` request. Stops at first non-None result.
    """


@hookspec
def normalize_request(flow: Flow) -> None:
    """Build the request's canonical form in ``flow.canonical`` (bytes), used for the cache key.

    Equivalent requests (key order, whitespace, defaults made explicit) must yield the same bytes.
    May rewrite ``flow.body`` only when configured to; by default the upstream gets the client's bytes.
    """


@hookspec
def check_request(flow: Flow) -> None:
    """Enforce policy before any cache or upstream work: raise `GatewayError` to refuse.

    Model allow-lists, rate limits, budgets and prompt policies live here. Every impl runs.
    """


@hookspec(firstresult=True)
def cache_lookup(flow: Flow) -> GatewayResponse | None:
    """Return a stored response for this flow, or None on a miss.

    Set ``flow.cache_status`` ("HIT", "MISS", "BYPASS"). On a miss the flow is forwarded and the
    cache may store the response in `exchange_complete`. Stops at first non-None result.
    """


@hookspec
def before_forward(flow: Flow) -> None:
    """Last check before the upstream is called, on a cache miss only: raise `GatewayError` to refuse.

    Budgets belong here: a cache hit costs nothing and never reaches this stage. Every impl runs;
    an impl that reserves something releases it in `exchange_complete` / `exchange_error`.
    """


@hookspec(firstresult=True)
def forward_request(flow: Flow) -> GatewayResponse | None:
    """Send the request upstream and return its response, headers read and body still streaming.

    Raise `GatewayError` (502, 504 ...) when no upstream answers. The built-in forwarder is
    ``trylast``, so a plugin can take over. Stops at first non-None result.
    """


@hookspec
def wrap_response_stream(flow: Flow, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes] | None:
    """Observe the response body as it passes: return an iterator that yields ``chunks`` unchanged.

    Each impl wraps the previous one's iterator; return None to not look at this response. Used to
    read usage from SSE events without buffering the stream. Observe; do not rewrite.
    """


@hookspec
def exchange_complete(flow: Flow) -> None:
    """The response has been produced in full: record it (cache store, metering, audit).

    Called once per flow after the last body byte has passed `wrap_response_stream`, just before
    that byte is released to the client, so a durable record can precede the response. Keep it fast.
    Built-in order: metering (``tryfirst``: sets ``flow.usage`` and cost), audit (may refuse with
    503 by raising `GatewayError`, which stops the remaining impls), cache (``trylast``: stores the
    response with ``flow.usage`` and ``flow.annotations``).

    Work the client need not wait for (hashing a large body's images) goes to a task registered
    with ``flow.annotate_later``; the response is released meanwhile, and the cache stores the
    entry once ``flow.annotations_ready()`` returns.
    """


@hookspec
def exchange_error(flow: Flow, error: BaseException) -> None:
    """The flow ended without a complete response: refused, failed upstream, truncated or aborted.

    Called once per flow instead of `exchange_complete`. ``flow.outcome`` says which
    (``rejected``, ``auth_fail``, ``upstream_error``, ``truncated``, ``client_abort``).
    """
