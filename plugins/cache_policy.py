"""What the cache may keep, for how long, and what a request asks of it.

Pure functions over headers and bytes, used by the cache plugin: the request's own controls
(``Cache-Control``, ``x-gatekeeper-cache-ttl``), the upstream's ``no-store``, whether a 200 is an
answer at all (not a relay's HTML page or a JSON document cut short), which response
headers are replayed, the 55-minute cap for DALL·E URLs, and (for answers finished after the
client left) the upstream's `usage` read from the body.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec
from multidict import CIMultiDict, CIMultiDictProxy

from gatekeeper.errors import MALFORMED_JSON, GatewayError, is_json_object

__all__ = [
    "URL_TTL_CAP_S",
    "RequestControls",
    "request_controls",
    "upstream_forbids_store",
    "replayed_headers",
    "has_image_url",
    "usage_from_body",
    "worth_keeping",
]

# DALL·E image URLs die 60 minutes after generation (contract 12): keep them at most 55.
URL_TTL_CAP_S = 55 * 60.0

# Not replayed on a hit: hop-by-hop and per-response headers; the core adds its own x-gatekeeper-*.
_NOT_REPLAYED = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "proxy-connection", "date", "server", "set-cookie", "content-length", "age",
})
_URL_KEY = re.compile(rb'"url"\s*:')  # inside a JSON string a quote is escaped, so this is a key


class RequestControls(msgspec.Struct, frozen=True):
    no_cache: bool  # skip the lookup, forward, store the fresh answer
    no_store: bool  # neither read nor write
    ttl_s: float


def _directives(values: list[str]) -> set[str]:
    return {token.partition("=")[0].strip().lower() for value in values for token in value.split(",")}


def request_controls(headers: CIMultiDictProxy[str] | CIMultiDict[str], default_ttl_s: float) -> RequestControls:
    """The request's cache controls; a malformed ``x-gatekeeper-cache-ttl`` is a 400."""
    cache_control = headers.getall("cache-control", [])
    directives = _directives(cache_control) if cache_control else set()
    ttl_s = default_ttl_s
    raw_ttl = headers.get("x-gatekeeper-cache-ttl")
    if raw_ttl is not None:
        try:
            ttl_s = float(raw_ttl.strip())
        except ValueError:
            ttl_s = -1.0
        if not math.isfinite(ttl_s) or ttl_s < 0:
            raise GatewayError(400, "The x-gatekeeper-cache-ttl header must be a number of seconds (0 or more).",
                               code="invalid_cache_ttl", param="x-gatekeeper-cache-ttl")
    return RequestControls("no-cache" in directives, "no-store" in directives, ttl_s)


def upstream_forbids_store(headers: CIMultiDict[str]) -> bool:
    values = headers.getall("cache-control", [])
    return bool(values) and "no-store" in _directives(values)


def replayed_headers(headers: CIMultiDict[str], upstream_request_id: str | None) -> tuple[tuple[str, str], ...]:
    """The response headers a hit replays, as the upstream sent them.

    The upstream's ``x-request-id`` is kept; one the gateway filled in (no upstream id) is not.
    """
    # CIMultiDict names are istr, which msgpack does not know: str(name).
    return tuple([(str(name), value) for name, value in headers.items()
                  if (lower := name.lower()) not in _NOT_REPLAYED and not lower.startswith("x-gatekeeper-")
                  and (lower != "x-request-id" or value == upstream_request_id)])


# Below this a JSON answer is checked in full (a few µs); above it, by its first and last bytes: a
# full check of a 1.5 MB image answer costs about 0.4 ms, and junk pages are small.
_CHECKED_IN_FULL_BELOW = 64 * 1024


def worth_keeping(headers: CIMultiDict[str], body: bytes) -> bool:
    """Whether a 200 answer may be stored. A relay's or a captive proxy's HTML page, an empty body or
    a JSON document cut short, answered 200 all the same, would otherwise be replayed to every
    identical request for a day; event streams and other types (audio) are kept as they come."""
    content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type == "text/html":
        return False
    if content_type != "application/json":
        return True
    if len(body) < _CHECKED_IN_FULL_BELOW:
        return is_json_object(body)
    return body[:64].lstrip().startswith(b"{") and body[-64:].rstrip().endswith(b"}")


def has_image_url(body: bytes) -> bool:
    return _URL_KEY.search(body) is not None


class _UsageOnly(msgspec.Struct):
    usage: dict[str, Any] | None = None


class _EventUsage(msgspec.Struct):
    usage: dict[str, Any] | None = None
    response: _UsageOnly | None = None  # responses API: usage sits in the terminal event's response


_decode_usage = msgspec.json.Decoder(_UsageOnly).decode
_decode_event_usage = msgspec.json.Decoder(_EventUsage).decode


def _add_usage(total: dict[str, Any], more: dict[str, Any]) -> None:
    for name, value in more.items():
        if isinstance(value, dict):
            _add_usage(total.setdefault(name, {}), value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total[name] = total.get(name, 0) + value


def usage_from_body(body: bytes, event_stream: bool) -> dict[str, Any] | None:
    """The upstream's `usage` read from a JSON body or an SSE stream (several events: summed).

    Used only for answers finished after the leader's client went away, when metering did not
    see the body; otherwise the cache stores `flow.usage` as metering set it.
    """
    try:
        if not event_stream:
            return _decode_usage(body).usage
        found: list[dict[str, Any]] = []
        for line in body.splitlines():
            if not line.startswith(b"data:") or b'"usage"' not in line:
                continue
            event = _decode_event_usage(line[5:])
            usage = event.usage or (event.response.usage if event.response else None)
            if usage:
                found.append(usage)
    except MALFORMED_JSON:  # ValidationError is a DecodeError
        return None
    if len(found) <= 1:
        return found[0] if found else None
    total: dict[str, Any] = {}
    for usage in found:
        _add_usage(total, usage)
    return total
