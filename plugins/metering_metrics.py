"""Prometheus metrics for ``GET /metrics``, registered into the gateway's own registry.

Money counters count whole micro-dollars (``*_usd_micros_total``): a float holds every integer
up to 2**53 exactly (9 billion dollars), so the counters never drift; divide by 1e6 for USD.
Model labels are limited to models the price table knows (others show as ``other``), so
clients sending made-up model names can't blow up the series count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from gatekeeper.app import Gateway

__all__ = ["MeteringMetrics", "RequestSeries"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class RequestSeries:
    """The counters every request of one tenant, model, status and cache outcome updates."""

    __slots__ = ("tenant", "model", "requests", "cost", "saved")

    def __init__(self, metrics: MeteringMetrics, tenant: str, model: str, status: int, cache: str | None) -> None:
        self.tenant, self.model = tenant, model
        self.requests = metrics.requests.labels(tenant, model, str(status), (cache or "none").lower())
        self.cost = metrics.child(metrics.cost, tenant, model)
        self.saved = metrics.child(metrics.saved, tenant, model)


class MeteringMetrics:
    """The metering plugin's collectors, one set per gateway."""

    def __init__(self, registry: CollectorRegistry, gateway: Gateway | None = None) -> None:
        self.requests = Counter(
            "gatekeeper_requests", "Requests on metered routes, by tenant, model, status and cache outcome.",
            ["tenant", "model", "status", "cache"], registry=registry)
        self.tokens = Counter(
            "gatekeeper_tokens", "Tokens used upstream (cache hits excluded), by direction and kind.",
            ["tenant", "model", "direction", "kind"], registry=registry)
        self.cost = Counter(
            "gatekeeper_cost_usd_micros", "What requests cost, in micro-dollars (divide by 1e6 for USD).",
            ["tenant", "model"], registry=registry)
        self.saved = Counter(
            "gatekeeper_saved_usd_micros", "What cache hits saved, in micro-dollars (divide by 1e6 for USD).",
            ["tenant", "model"], registry=registry)
        self.unpriced = Counter(
            "gatekeeper_unpriced_requests", "Requests whose model has no price: tokens recorded, cost unknown.",
            ["model"], registry=registry)
        self.unmetered = Counter(
            "gatekeeper_unmetered_requests", "Requests the upstream may have billed but that carried no usage.",
            ["reason"], registry=registry)
        self.budget_refusals = Counter(
            "gatekeeper_budget_refusals", "Requests refused because they would exceed a budget.",
            ["scope", "name"], registry=registry)
        self.dropped_rows = Counter(
            "gatekeeper_metering_dropped_rows", "Usage rows dropped because the write queue was full.",
            registry=registry)
        self.upstream_latency = Histogram(
            "gatekeeper_upstream_latency_seconds", "Time from sending a request upstream to its response headers.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.overhead = Histogram(
            "gatekeeper_overhead_seconds",
            "Gateway time on a non-streamed cache miss: total time minus the upstream's time to headers.",
            ["route"], buckets=_OVERHEAD_BUCKETS, registry=registry)
        self.queue = Gauge("gatekeeper_metering_queue_rows", "Usage rows waiting to be written.", registry=registry)
        self.in_flight = Gauge("gatekeeper_in_flight_requests", "Requests being served right now.", registry=registry)
        if gateway is not None:
            self.in_flight.set_function(lambda: gateway.in_flight)
        self._children: dict[tuple[Any, ...], Any] = {}
        self._series: dict[tuple[str, str, int, str | None], RequestSeries] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, memoised: label lookups are the costly part of a metric update."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def series(self, tenant: str, model: str, status: int, cache: str | None) -> RequestSeries:
        """The request, cost and saving counters of one kind of request, memoised: one lookup per request."""
        key = (tenant, model, status, cache)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = RequestSeries(self, tenant, model, status, cache)
        return found
