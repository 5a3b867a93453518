"""Every ``/v1`` request in Prometheus, by API and status: ``gatekeeper_http_requests_total``.

Metering counts the requests of metered routes by tenant and model; this counts all of them
(uploads, model lists, batches, refusals at the door), by the API their path belongs to, its
first segment after ``/v1/`` (``images``, ``files``, ...), and the status the client got. A
segment that is not one of OpenAI's API families is counted as ``other``, so no client can grow
the label set. Each request bumps a plain int; the counter is built at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily
from prometheus_client.registry import Collector

__all__ = ["API_FAMILIES", "RouteCounts"]

# The first path segments of OpenAI's API (its OpenAPI file's paths).
API_FAMILIES = frozenset({
    "assistants", "audio", "batches", "chat", "chatkit", "completions", "containers", "content_provenance_checks",
    "conversations", "embeddings", "evals", "files", "fine_tuning", "images", "models", "moderations",
    "organization", "projects", "realtime", "responses", "skills", "threads", "uploads", "vector_stores", "videos",
})


class RouteCounts(Collector):
    """Requests by (API, status); a status of None is a request that ended with no answer sent."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int | None], int] = {}
        self.created = time.time()

    def count(self, route: str, status: int | None) -> None:
        """One request to `route` (``images/generations``: the path without ``/v1/``)."""
        api = route.partition("/")[0]
        key = (api if api in API_FAMILIES else "other", status)
        self.counts[key] = self.counts.get(key, 0) + 1

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "gatekeeper_http_requests", "Every /v1 request, by API (the path's first segment) and status.",
            labels=["api", "status"])
        for (api, status), count in sorted(self.counts.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
            family.add_metric([api, str(status) if status is not None else "none"], count, created=self.created)
        yield family
