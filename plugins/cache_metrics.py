"""The cache's counters as Prometheus metrics, read from the plugin at scrape time."""

from __future__ import annotations

from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CacheCollector"]


class HasSnapshot(Protocol):
    def snapshot(self) -> dict[str, Any]: ...


class CacheCollector(Collector):
    """The cache's counters as Prometheus metrics, read at scrape time (nothing per request)."""

    _COUNTERS = {
        "hits": "Requests answered from the cache (coalesced followers included).",
        "misses": "Cacheable requests forwarded upstream.",
        "bypasses": "Requests whose Cache-Control skipped the lookup (no-cache, no-store).",
        "stores": "Answers written to the cache.",
        "coalesced": "Followers answered by an identical request's upstream call.",
        "evictions": "Entries evicted to keep the memory backend within max_bytes.",
        "redis_errors": "Redis calls that failed (each one served as a miss).",
    }
    _GAUGES = {
        "bytes": "Bytes held by the memory backend.",
        "entries": "Entries held by the memory backend.",
        "in_flight": "Upstream calls that followers can join.",
    }

    def __init__(self, plugin: HasSnapshot) -> None:
        self.plugin = plugin

    def collect(self) -> Any:
        snapshot = self.plugin.snapshot()
        for name, documentation in self._COUNTERS.items():
            if name in snapshot:
                yield CounterMetricFamily(f"gatekeeper_cache_{name}", documentation, value=snapshot[name])
        for name, documentation in self._GAUGES.items():
            if name in snapshot:
                yield GaugeMetricFamily(f"gatekeeper_cache_{name}", documentation, value=snapshot[name])
        if "redis" in snapshot:
            yield GaugeMetricFamily("gatekeeper_cache_redis_up", "1 when the last Redis call worked.",
                                    value=1.0 if snapshot["redis"] == "up" else 0.0)
