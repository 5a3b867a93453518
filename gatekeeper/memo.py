"""`BoundedMemo`: the hot path's small memos, which forget everything when full.

The gateway remembers a few answers that repeat on almost every request: a raw path's normalized
form, a redacted log field, a cache key's prefix, the upstreams serving a model, a price. Their
keys come from a small set, so a full memo means the traffic itself changed; starting over costs
one recomputation per key, less per request than an LRU's bookkeeping. `get` is dict's own.
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["BoundedMemo"]

K = TypeVar("K")
V = TypeVar("V")


class BoundedMemo(dict[K, V]):
    """A dict of at most `limit` entries; `remember` clears it when it is full."""

    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def remember(self, key: K, value: V) -> V:
        """Keep `value` under `key` (forgetting every other entry if the memo is full); returns it."""
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value
