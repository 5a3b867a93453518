"""Which upstream a request goes to, and which upstreams are cooling down.

Every ``[upstreams.NAME]`` (and a lone ``[upstream]``, named ``default``) becomes an `Upstream`
with its own circuit `Breaker`. `Router.candidates` lists the upstreams that serve a model, in
the order the forwarder tries them: higher ``priority`` first, a weighted random order among
equal priorities. `UpstreamCollector` publishes breaker states and attempt counts to Prometheus
at scrape time, so the request path only bumps plain integers.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from fnmatch import fnmatchcase
from urllib.request import getproxies, proxy_bypass

from aiohttp import encode_basic_auth
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from yarl import URL

from gatekeeper.config import ConfigError, UpstreamConfig
from gatekeeper.errors import GatewayError
from gatekeeper.flow import Outcome
from gatekeeper.logs import register_secret
from gatekeeper.memo import BoundedMemo

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "Breaker", "Router", "Upstream", "UpstreamCollector", "egress_proxy"]

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
_STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
_SERVING_MEMO = 4096  # models whose serving upstreams are remembered


class Breaker:
    """A circuit breaker: closed -> open after `threshold` consecutive failures -> half-open
    once `cooldown_s` has passed, letting one probe request through -> closed if it succeeds,
    open again (for another cooldown) if it fails. A threshold of 0 never opens.

    Only the probe's verdict closes an open breaker: answers to requests sent before it opened
    are stale news and only count while it is closed.
    """

    def __init__(self, threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self.probing = False
        self.times_opened = 0

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return CLOSED
        if self.probing or self.clock() - self.opened_at >= self.cooldown_s:
            return HALF_OPEN
        return OPEN

    def available(self) -> bool:
        """Whether a request may be sent now (closed, or half-open with no probe in flight)."""
        if self.opened_at is None:
            return True
        return not self.probing and self.clock() - self.opened_at >= self.cooldown_s

    def retry_in_s(self) -> float:
        """Seconds until the breaker lets a probe through (0 when it would now)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown_s - self.clock())

    def acquire(self) -> bool:
        """Take the breaker's permission for one request; True when that request is the probe."""
        if self.opened_at is None:
            return False
        self.probing = True
        return True

    def succeeded(self, probe: bool) -> None:
        if probe or self.opened_at is None:
            self.consecutive_failures = 0
            self.opened_at = None
            self.probing = False

    def failed(self, probe: bool) -> None:
        self.consecutive_failures += 1
        if probe:
            self.probing = False
            self._open()
        elif self.opened_at is None and self.threshold and self.consecutive_failures >= self.threshold:
            self._open()

    def abandoned(self, probe: bool) -> None:
        """The request ended without a verdict (the client left): let another probe go."""
        if probe:
            self.probing = False

    def _open(self) -> None:
        self.opened_at = self.clock()
        self.times_opened += 1

    def report(self) -> dict[str, object]:
        return {
            "state": self.state,
            "consecutive_failures": self.consecutive_failures,
            "retry_in_s": round(self.retry_in_s(), 3),
            "times_opened": self.times_opened,
        }


def egress_proxy(config: UpstreamConfig) -> tuple[URL | None, dict[str, str] | None]:
    """The proxy an upstream's requests go through (without its credentials), and the
    ``Proxy-Authorization`` header that carries them; (None, None) to go direct.

    `config.proxy` when set ("" for none), else the environment's ``HTTPS_PROXY`` / ``HTTP_PROXY``
    (by the upstream's scheme) unless ``NO_PROXY`` names its host, as the OpenAI SDK reads them.
    Read once per upstream: aiohttp's own ``trust_env`` reads the environment again, in a worker
    thread, for every request.
    """
    text = config.proxy
    if text == "":
        return None, None
    if text is None:
        upstream = URL(config.base_url)
        if upstream.host and proxy_bypass(upstream.host):
            return None, None
        text = getproxies().get(upstream.scheme)
        if not text:
            return None, None
        if URL(text).scheme != "http":
            raise ConfigError(f"the {upstream.scheme.upper()}_PROXY environment variable names "
                              f"{URL(text).with_user(None)}: only http:// proxies are supported (an https:// "
                              "upstream goes through them with CONNECT)")
    proxy = URL(text)
    register_secret(proxy.password)  # from the environment too: never in a log line
    headers = None
    if proxy.user is not None:
        headers = {"Proxy-Authorization": encode_basic_auth(proxy.user, proxy.password or "")}
    return proxy.with_user(None), headers


class Upstream:
    """One configured upstream, its breaker, its egress proxy and how its attempts went."""

    __slots__ = ("name", "config", "base_url", "tls", "proxy", "proxy_headers", "breaker", "results", "serves_any")

    def __init__(self, name: str, config: UpstreamConfig, breaker: Breaker | None = None) -> None:
        self.name = name
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self.tls = self.base_url.startswith("https:")
        self.proxy, self.proxy_headers = egress_proxy(config)
        self.breaker = breaker or Breaker(config.breaker_failures, config.breaker_cooldown_s)
        # attempts by result: ok, status_<code> (retryable statuses), connect_error, proxy_error, timeout, disconnect
        self.results: Counter[str] = Counter()
        self.serves_any = "*" in config.models

    def serves(self, model: str | None) -> bool:
        # A request without a model (GET /v1/models, ...) may go to any upstream.
        return model is None or self.serves_any or any(fnmatchcase(model, pattern) for pattern in self.config.models)


class Router:
    """The configured upstreams and the order in which a request tries them."""

    def __init__(self, configs: dict[str, UpstreamConfig], previous: Router | None = None,
                 rng: random.Random | None = None) -> None:
        old = {u.name: u for u in previous.upstreams} if previous else {}
        self.upstreams: list[Upstream] = []
        for name, config in configs.items():
            kept = old.get(name)
            if kept is not None:  # a reload keeps what the breaker has learnt, with the new thresholds
                kept.breaker.threshold, kept.breaker.cooldown_s = config.breaker_failures, config.breaker_cooldown_s
                upstream = Upstream(name, config, kept.breaker)
                upstream.results = kept.results
            else:
                upstream = Upstream(name, config)
            self.upstreams.append(upstream)
        self.by_name = {u.name: u for u in self.upstreams}
        self.rng = rng or random.Random()
        self._serving: BoundedMemo[str | None, list[Upstream]] = BoundedMemo(_SERVING_MEMO)  # by model; upstreams never change

    def candidates(self, model: str | None, pinned: str | None = None) -> list[Upstream]:
        """The upstreams to try for `model`, best first; only `pinned` when a plugin chose one.

        Raises a 502 `GatewayError` for an unknown pinned name and a 404 when no upstream serves
        the model.
        """
        if pinned:
            upstream = self.by_name.get(pinned)
            if upstream is None:
                raise GatewayError(502, f"No upstream named {pinned!r} is configured.",
                                   code="upstream_not_found", outcome=Outcome.UPSTREAM_ERROR)
            return [upstream]
        serving = self._serving.get(model)
        if serving is None:
            serving = self._serving.remember(model, [u for u in self.upstreams if u.serves(model)])
        if not serving:
            raise GatewayError(404, f"No upstream serves the model {model!r}.", code="model_not_found", param="model")
        if len(serving) == 1:
            return serving[:]  # callers may keep or change their list
        # Weighted random order (Efraimidis-Spirakis keys): each upstream leads a priority level
        # with probability weight / sum(weights); weight 0 always comes last.
        random_key = self.rng.random
        keyed = [(-u.config.priority, -(random_key() ** (1.0 / u.config.weight)) if u.config.weight else 1.0, i)
                 for i, u in enumerate(serving)]
        keyed.sort()
        return [serving[i] for _, _, i in keyed]


class UpstreamCollector(Collector):
    """Breaker state and attempt counts per upstream, read when Prometheus scrapes /metrics."""

    def __init__(self, router: Callable[[], Router]) -> None:
        self.router = router

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = GaugeMetricFamily("gatekeeper_upstream_breaker_state",
                                  "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open.", labels=["upstream"])
        failures = GaugeMetricFamily("gatekeeper_upstream_consecutive_failures",
                                     "Failures in a row per upstream (the breaker opens at breaker_failures).",
                                     labels=["upstream"])
        opened = CounterMetricFamily("gatekeeper_upstream_breaker_opened",
                                     "Times each upstream's circuit breaker opened.", labels=["upstream"])
        attempts = CounterMetricFamily("gatekeeper_upstream_attempts",
                                       "Requests sent to each upstream, by result.", labels=["upstream", "result"])
        for upstream in self.router().upstreams:
            breaker = upstream.breaker
            state.add_metric([upstream.name], _STATE_VALUE[breaker.state])
            failures.add_metric([upstream.name], breaker.consecutive_failures)
            opened.add_metric([upstream.name], breaker.times_opened)
            for result, count in sorted(upstream.results.items()):
                attempts.add_metric([upstream.name, result], count)
        yield from (state, failures, opened, attempts)
