"""Prometheus metrics for ``GET /metrics``, registered into the gateway's own registry.

Money counters count whole micro-dollars (``*_usd_micros_total``): a float holds every integer
up to 2**53 exactly (9 billion dollars), so the counters never drift; divide by 1e6 for USD.
Model labels are limited to models the price table knows (others show as ``other``), so
clients sending made-up model names can't blow up the series count.

What every request updates (the request, token, cost and saving counters, the latency
histograms) is kept in plain numbers and exported by collectors when ``/metrics`` is scraped:
prometheus-client metrics take a lock on each update (a histogram one per bucket it passes),
and metering only ever counts on the event loop.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from gatekeeper_plugins.metering_budgets import BudgetLedger

__all__ = ["MeteringMetrics", "PlainHistogram", "RequestSeries"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
_TOKEN_KINDS = (("input", "text"), ("input", "image"), ("output", "text"), ("output", "image"))


class RequestSeries:
    """What the requests of one tenant, model, status and cache outcome used, as plain ints."""

    __slots__ = ("tenant", "model", "status", "cache", "created", "requests", "cost_micros", "saved_micros",
                 "tokens")

    def __init__(self, tenant: str, model: str, status: int, cache: str | None) -> None:
        self.tenant, self.model, self.status = tenant, model, str(status)
        self.cache = (cache or "none").lower()
        self.created = time.time()
        self.requests = 0
        self.cost_micros = 0
        self.saved_micros = 0
        self.tokens = [0, 0, 0, 0]  # upstream tokens, in `_TOKEN_KINDS` order


class _RequestCollector(Collector):
    """Exports the `RequestSeries` counts as the request, token, cost and saving counters."""

    def __init__(self, series: dict[Any, RequestSeries]) -> None:
        self.series = series

    def collect(self) -> Iterator[CounterMetricFamily]:
        requests = CounterMetricFamily(
            "gatekeeper_requests", "Requests on metered routes, by tenant, model, status and cache outcome.",
            labels=["tenant", "model", "status", "cache"])
        tokens = CounterMetricFamily(
            "gatekeeper_tokens", "Tokens used upstream (cache hits excluded), by direction and kind.",
            labels=["tenant", "model", "direction", "kind"])
        cost = CounterMetricFamily(
            "gatekeeper_cost_usd_micros", "What requests cost, in micro-dollars (divide by 1e6 for USD).",
            labels=["tenant", "model"])
        saved = CounterMetricFamily(
            "gatekeeper_saved_usd_micros", "What cache hits saved, in micro-dollars (divide by 1e6 for USD).",
            labels=["tenant", "model"])
        # Tokens, cost and savings are by tenant and model only: sum the series of each pair.
        sums: dict[tuple[str, str], list[float]] = {}
        for series in list(self.series.values()):
            requests.add_metric([series.tenant, series.model, series.status, series.cache], series.requests,
                                created=series.created)
            total = sums.setdefault((series.tenant, series.model), [series.created, 0, 0, 0, 0, 0, 0])
            total[0] = min(total[0], series.created)
            total[1] += series.cost_micros
            total[2] += series.saved_micros
            for index, count in enumerate(series.tokens):
                total[3 + index] += count
        for (tenant, model), total in sums.items():
            created = total[0]
            if total[1]:
                cost.add_metric([tenant, model], total[1], created=created)
            if total[2]:
                saved.add_metric([tenant, model], total[2], created=created)
            for (direction, kind), count in zip(_TOKEN_KINDS, total[3:]):
                if count:
                    tokens.add_metric([tenant, model, direction, kind], count, created=created)
        yield from (requests, tokens, cost, saved)


class _BudgetCollector(Collector):
    """Each budget's amount, spend and reservations this month, read from the ledger at scrape time
    (this replica's view: other replicas' spend as of the last refresh), for alerts such as
    ``gatekeeper_budget_spent_usd / gatekeeper_budget_usd > 0.8``."""

    def __init__(self, ledger: BudgetLedger) -> None:
        self.ledger = ledger

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["scope", "name"]
        amount = GaugeMetricFamily("gatekeeper_budget_usd", "Each monthly budget, in USD.", labels=labels)
        spent = GaugeMetricFamily("gatekeeper_budget_spent_usd", "Spent against each budget this UTC month, in USD.",
                                  labels=labels)
        reserved = GaugeMetricFamily("gatekeeper_budget_reserved_usd",
                                     "Held against each budget by this replica's requests in flight, in USD.",
                                     labels=labels)
        for status in self.ledger.statuses():
            values = [status.scope, status.name]
            amount.add_metric(values, status.budget_micros / 1e6)
            spent.add_metric(values, status.spent_micros / 1e6)
            reserved.add_metric(values, status.reserved_micros / 1e6)
        yield from (amount, spent, reserved)


class _Buckets:
    __slots__ = ("counts", "total", "created")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size  # per bucket, not cumulative: the last one is +Inf
        self.total = 0.0
        self.created = time.time()


class PlainHistogram(Collector):
    """A histogram by one label, counted in plain numbers: `observe` is a bisect and two additions."""

    def __init__(self, name: str, documentation: str, label: str, bounds: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.label, self.bounds = name, documentation, label, bounds
        self._le = [floatToGoString(bound) for bound in bounds] + ["+Inf"]
        self._series: dict[str, _Buckets] = {}
        registry.register(self)

    def observe(self, label_value: str, amount: float) -> None:
        buckets = self._series.get(label_value)
        if buckets is None:
            buckets = self._series[label_value] = _Buckets(len(self._le))
        buckets.counts[bisect_left(self.bounds, amount)] += 1  # bucket `le` counts amounts <= le
        buckets.total += amount

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for label_value, buckets in list(self._series.items()):
            family.add_metric([label_value], list(zip(self._le, accumulate(buckets.counts))), buckets.total)
            family.samples.append(Sample(self.name + "_created", {self.label: label_value}, buckets.created))
        yield family


class MeteringMetrics:
    """The metering plugin's collectors, one set per gateway."""

    def __init__(self, registry: CollectorRegistry, ledger: BudgetLedger | None = None) -> None:
        self._series: dict[tuple[str, str, int, str | None], RequestSeries] = {}
        self._children: dict[tuple[Counter, tuple[str, ...]], Counter] = {}
        registry.register(_RequestCollector(self._series))
        if ledger is not None:
            registry.register(_BudgetCollector(ledger))
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
        self.upstream_latency = PlainHistogram(
            "gatekeeper_upstream_latency_seconds", "Time from sending a request upstream to its response headers.",
            "model", _LATENCY_BUCKETS, registry)
        self.overhead = PlainHistogram(
            "gatekeeper_overhead_seconds",
            "Gateway time on a non-streamed cache miss: total time minus the upstream's time to headers.",
            "route", _OVERHEAD_BUCKETS, registry)
        self.queue = Gauge("gatekeeper_metering_queue_rows", "Usage rows waiting to be written.", registry=registry)

    def child(self, counter: Counter, *values: str) -> Counter:
        """`counter.labels(*values)`, looked up once per label values (each `labels` call takes a lock)."""
        key = (counter, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = counter.labels(*values)
        return found

    def series(self, tenant: str, model: str, status: int, cache: str | None) -> RequestSeries:
        """The counts of one kind of request, to add to: one dict lookup per request."""
        key = (tenant, model, status, cache)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = RequestSeries(tenant, model, status, cache)
        return found
