"""CORS for browser apps on ``/v1``: ``[server] cors_allow_origins``.

api.openai.com answers browsers (``Access-Control-Allow-Origin: *``, preflights without a key),
so an app in a browser that only changes ``base_url`` needs the gateway to do the same. The
gateway owns these headers: the upstream's are dropped (`forward.DROP_RESPONSE`), and with the
setting empty (the default) no response carries any. Only ``/v1`` gets them: ``/metrics``,
``/ready`` and ``/admin`` stay unreadable to pages from elsewhere, so a browser on the inside
cannot be used to read an internal gateway's metrics. Keys are bearer tokens, never cookies, so
allowing every origin gives a page nothing it doesn't already hold.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

__all__ = ["Cors"]

PREFLIGHT_MAX_AGE_S = 600


class Cors:
    def __init__(self, origins: Sequence[str]) -> None:
        self.any_origin = "*" in origins
        self.origins = frozenset(origin.rstrip("/") for origin in origins)

    def allow_origin(self, origin: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for a request from `origin`, or None."""
        if origin is None:
            return None
        if self.any_origin:
            return "*"
        return origin if origin in self.origins else None

    @staticmethod
    def is_preflight(request: web.Request) -> bool:
        return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers

    def preflight(self, request: web.Request) -> web.Response:
        """The answer to a browser's preflight: no key needed (browsers never send one), nothing
        forwarded, metered or audited. A disallowed origin gets no CORS headers, which the
        browser takes as a refusal."""
        allowed = self.allow_origin(request.headers.get("Origin"))
        response = web.Response(status=204)
        if allowed is not None:
            headers = response.headers
            headers["Access-Control-Allow-Origin"] = allowed
            headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            requested = request.headers.get("Access-Control-Request-Headers")
            if requested:  # the SDKs send x-stainless-* and more: reflect what the browser asks for
                headers["Access-Control-Allow-Headers"] = requested
            headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE_S)
        if not self.any_origin:
            _vary_on_origin(response)
        return response

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every ``/v1`` response (streams too: this runs before their head is sent)."""
        if not request.path.startswith("/v1"):
            return
        allowed = self.allow_origin(request.headers.get("Origin"))
        if allowed is not None:
            response.headers["Access-Control-Allow-Origin"] = allowed
            response.headers["Access-Control-Expose-Headers"] = "*"  # x-request-id, retry-after, ...
        if not self.any_origin:
            _vary_on_origin(response)


def _vary_on_origin(response: web.StreamResponse) -> None:
    """The answer depends on the Origin sent: shared caches must keep one per origin."""
    vary = response.headers.get("Vary")
    if vary is None:
        response.headers["Vary"] = "Origin"
    elif "origin" not in vary.lower():
        response.headers["Vary"] = vary + ", Origin"
