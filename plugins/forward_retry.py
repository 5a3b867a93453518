"""When and how long the forwarder waits before trying an upstream again.

Backoff is exponential with full jitter (a uniform draw between 0 and the exponential ceiling),
so clients that failed together do not come back together. A delay the upstream asks for with
``retry-after-ms`` (OpenAI's, preferred, as the SDK does) or ``retry-after`` (seconds or an HTTP
date) replaces the backoff when it is no longer than the configured cap.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Mapping

__all__ = ["RETRYABLE_STATUSES", "SAFE_METHODS", "backoff_s", "retry_after_s"]

# Statuses that say "not now" rather than "never": the same request may succeed on a retry.
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
# Methods that bill nothing and change nothing, so re-sending them after a failure is harmless.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def backoff_s(retry: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """The wait before retry number `retry` (1 for the first): uniform in [0, min(cap, base * 2**(retry-1))]."""
    ceiling = min(cap_s, base_s * (2.0 ** min(retry - 1, 60)))
    return (rng or random).uniform(0.0, ceiling)


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The delay an upstream asked for, in seconds, or None when it asked for none (or nonsense)."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            delay = float(value) / 1000.0
        except ValueError:
            delay = math.nan
        if math.isfinite(delay) and delay >= 0:
            return delay
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        delay = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP date is always GMT
            return None
        delay = when.timestamp() - (time.time() if now is None else now)
        return max(0.0, delay)
    return delay if math.isfinite(delay) and delay >= 0 else None
