"""Several upstreams: routing by model, priority and weight, failover, and the circuit breaker."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections import Counter

import aiohttp
import msgspec
import pytest
from multidict import CIMultiDict

from gatekeeper import hookimpl
from gatekeeper.config import UpstreamConfig, parse_config
from gatekeeper.server import start_gateway
from gatekeeper.testing.fake_upstream import FakeUpstream
from gatekeeper.testing.kit import CLIENT_KEY, UPSTREAM_KEY, CanaryGuard
from gatekeeper_plugins.forward_routing import CLOSED, HALF_OPEN, OPEN, Breaker, Router

GENERATIONS = "/v1/images/generations"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
FAST = {"retry_backoff_s": 0.01, "retry_max_delay_s": 0.1}


@pytest.fixture
async def relay():
    """A second fake upstream: the regional relay next to "OpenAI direct" (`fake_upstream`)."""
    upstream = FakeUpstream(api_key=UPSTREAM_KEY)
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.stop()


@pytest.fixture
def dead_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


async def start_with_upstreams(gateway_kit, upstreams: dict, overrides: dict | None = None, plugins=()):
    """A kit gateway whose only upstreams are `upstreams` (no lone [upstream] section)."""
    raw = gateway_kit.config_dict(overrides)
    raw.pop("upstream")
    raw["upstreams"] = {name: {"api_key": UPSTREAM_KEY, **FAST, **settings} for name, settings in upstreams.items()}
    config = parse_config(raw, path=str(gateway_kit.workdir / "test-config.toml"))
    running = await start_gateway(config, extra_plugins=[*plugins, CanaryGuard()])
    gateway_kit.running.append(running)
    return running


async def post_generation(gateway, prompt: str, model: str = "gpt-image-1.5") -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.base_url + "/images/generations", headers=AUTH,
                                json={"model": model, "prompt": prompt}) as response:
            return response.status, CIMultiDict(response.headers), await response.read()


async def get_json(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            return response.status, await response.json()


async def scrape(gateway) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/metrics") as response:
            return await response.text()


class Pin:
    """A router plugin: sends every flow to one named upstream."""

    name = "pin"

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream

    @hookimpl
    def before_forward(self, flow) -> None:
        flow.upstream_name = self.upstream


# ------------------------------------------------------------------ routing and failover


async def test_failover_from_a_dead_upstream_to_a_live_one(gateway_kit, fake_upstream, dead_url):
    gateway = await start_with_upstreams(gateway_kit, {
        "openai": {"base_url": dead_url, "priority": 10},
        "relay": {"base_url": fake_upstream.base_url, "priority": 0},
    })
    status, _, _ = await post_generation(gateway, "dead then live")
    assert status == 200
    assert fake_upstream.count(GENERATIONS) == 1


async def test_failover_on_503_goes_to_the_next_upstream_without_waiting(gateway_kit, fake_upstream, relay):
    gateway = await start_with_upstreams(gateway_kit, {
        "openai": {"base_url": fake_upstream.base_url, "priority": 10, "retry_backoff_s": 5, "retry_max_delay_s": 5},
        "relay": {"base_url": relay.base_url},
    })
    fake_upstream.inject(path=GENERATIONS, status=503)
    started = time.monotonic()
    status, _, _ = await post_generation(gateway, "overloaded primary")
    assert status == 200
    assert time.monotonic() - started < 1  # no backoff: the relay had not been tried yet
    assert (fake_upstream.count(GENERATIONS), relay.count(GENERATIONS)) == (1, 1)


async def test_higher_priority_upstream_serves_while_it_is_healthy(gateway_kit, fake_upstream, relay):
    gateway = await start_with_upstreams(gateway_kit, {
        "openai": {"base_url": fake_upstream.base_url, "priority": 10},
        "relay": {"base_url": relay.base_url, "priority": 0},
    })
    for index in range(3):
        assert (await post_generation(gateway, f"healthy {index}"))[0] == 200
    assert (fake_upstream.count(GENERATIONS), relay.count(GENERATIONS)) == (3, 0)


async def test_requests_route_by_model_glob(gateway_kit, fake_upstream, relay):
    gateway = await start_with_upstreams(gateway_kit, {
        "gpt": {"base_url": fake_upstream.base_url, "models": ["gpt-image-*"]},
        "dalle": {"base_url": relay.base_url, "models": ["dall-e-*"]},
    })
    assert (await post_generation(gateway, "a dall-e picture", model="dall-e-3"))[0] == 200
    assert (await post_generation(gateway, "a gpt picture", model="gpt-image-1"))[0] == 200
    assert relay.calls[-1].json()["model"] == "dall-e-3"
    assert fake_upstream.calls[-1].json()["model"] == "gpt-image-1"


async def test_a_model_no_upstream_serves_is_a_404(gateway_kit, fake_upstream):
    gateway = await start_with_upstreams(gateway_kit, {"gpt": {"base_url": fake_upstream.base_url,
                                                               "models": ["gpt-image-*"]}})
    status, _, body = await post_generation(gateway, "x", model="dall-e-3")
    assert status == 404
    assert msgspec.json.decode(body)["error"]["code"] == "model_not_found"
    assert fake_upstream.count() == 0


async def test_an_upstream_named_by_a_plugin_is_used_and_never_failed_over(gateway_kit, fake_upstream, dead_url):
    gateway = await start_with_upstreams(gateway_kit, {
        "eu": {"base_url": dead_url},
        "us": {"base_url": fake_upstream.base_url, "priority": 10},
    }, plugins=[Pin("eu")])
    status, _, body = await post_generation(gateway, "must stay in the EU")
    assert status == 502
    assert msgspec.json.decode(body)["error"]["code"] == "upstream_unreachable"
    assert fake_upstream.count() == 0


def test_weight_shares_first_place_among_equal_priorities():
    router = Router({
        "big": UpstreamConfig(weight=3),
        "small": UpstreamConfig(weight=1),
        "spare": UpstreamConfig(weight=0),
        "backup": UpstreamConfig(priority=-1, weight=100),
    }, rng=random.Random(7))
    orders = [tuple(u.name for u in router.candidates("gpt-image-1")) for _ in range(4000)]
    firsts = Counter(order[0] for order in orders)
    assert 0.72 < firsts["big"] / 4000 < 0.78
    assert all(order[2:] == ("spare", "backup") for order in orders)


# ------------------------------------------------------------------ the breaker itself


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_only():
    breaker = Breaker(3, 30, Clock())
    for _ in range(2):
        breaker.failed(breaker.acquire())
    breaker.succeeded(breaker.acquire())  # a success in between starts the count again
    for _ in range(2):
        breaker.failed(breaker.acquire())
    assert breaker.state == CLOSED
    breaker.failed(breaker.acquire())
    assert breaker.state == OPEN and not breaker.available()


def test_breaker_half_opens_after_the_cooldown_and_lets_one_probe_through():
    clock = Clock()
    breaker = Breaker(1, 30, clock)
    breaker.failed(breaker.acquire())
    clock.now += 29.9
    assert breaker.state == OPEN and breaker.retry_in_s() == pytest.approx(0.1)
    clock.now += 0.1
    assert breaker.state == HALF_OPEN and breaker.available()
    assert breaker.acquire() is True  # this request is the probe
    assert not breaker.available()  # nobody else until it reports back
    breaker.succeeded(True)
    assert breaker.state == CLOSED and breaker.consecutive_failures == 0


def test_failed_probe_opens_the_breaker_for_another_cooldown():
    clock = Clock()
    breaker = Breaker(1, 30, clock)
    breaker.failed(breaker.acquire())
    clock.now += 30
    breaker.failed(breaker.acquire())
    assert breaker.state == OPEN and breaker.retry_in_s() == 30 and breaker.times_opened == 2


def test_abandoned_probe_lets_the_next_request_probe():
    clock = Clock()
    breaker = Breaker(1, 30, clock)
    breaker.failed(breaker.acquire())
    clock.now += 30
    breaker.abandoned(breaker.acquire())
    assert breaker.available()


def test_late_success_of_a_request_sent_before_opening_does_not_close_the_breaker():
    breaker = Breaker(1, 30, Clock())
    early = breaker.acquire()
    breaker.failed(breaker.acquire())
    breaker.succeeded(early)
    assert breaker.state == OPEN


def test_breaker_with_threshold_zero_never_opens():
    breaker = Breaker(0, 30, Clock())
    for _ in range(100):
        breaker.failed(breaker.acquire())
    assert breaker.state == CLOSED


# ------------------------------------------------------------------ the breaker in a gateway


async def test_breaker_opens_answers_fast_503s_then_closes_after_a_good_probe(gateway_kit, fake_upstream):
    gateway = await start_with_upstreams(gateway_kit, {
        "openai": {"base_url": fake_upstream.base_url, "max_retries": 0, "breaker_failures": 2,
                   "breaker_cooldown_s": 0.5},
    })
    fake_upstream.inject(path=GENERATIONS, status=500, times=2)
    assert (await post_generation(gateway, "fail 1"))[0] == 500
    assert (await post_generation(gateway, "fail 2"))[0] == 500

    started = time.monotonic()
    status, headers, body = await post_generation(gateway, "while open")
    assert time.monotonic() - started < 0.2
    assert status == 503 and msgspec.json.decode(body)["error"]["code"] == "upstream_unavailable"
    assert headers["retry-after"] == "1"  # the rest of the cooldown, rounded up
    assert fake_upstream.count(GENERATIONS) == 2  # no upstream call while open

    await asyncio.sleep(0.5)
    assert (await post_generation(gateway, "the probe"))[0] == 200
    _, ready = await get_json(gateway.url + "/ready")
    assert ready["plugins"]["forward"]["upstreams"]["openai"]["state"] == "closed"
    assert fake_upstream.count(GENERATIONS) == 3


async def test_hook_ready_check_reports_each_upstream_breaker(gateway_kit, fake_upstream, dead_url):
    gateway = await start_with_upstreams(gateway_kit, {
        "openai": {"base_url": dead_url, "priority": 10, "max_retries": 0, "breaker_failures": 1,
                   "breaker_cooldown_s": 60},
        "relay": {"base_url": fake_upstream.base_url},
    })
    assert (await post_generation(gateway, "opens the openai breaker"))[0] == 200
    status, ready = await get_json(gateway.url + "/ready")
    report = ready["plugins"]["forward"]
    assert status == 200 and report["ready"] is True  # the relay still serves
    assert report["upstreams"]["openai"]["state"] == "open"
    assert report["upstreams"]["openai"]["consecutive_failures"] == 1
    assert report["upstreams"]["relay"] == {"state": "closed", "consecutive_failures": 0, "retry_in_s": 0.0,
                                            "times_opened": 0}


async def test_ready_is_503_while_every_upstream_breaker_is_open(gateway_kit, dead_url):
    gateway = await start_with_upstreams(gateway_kit, {
        "openai": {"base_url": dead_url, "max_retries": 0, "breaker_failures": 1, "breaker_cooldown_s": 60},
    })
    assert (await post_generation(gateway, "opens it"))[0] == 502
    status, ready = await get_json(gateway.url + "/ready")
    assert status == 503 and ready["plugins"]["forward"]["ready"] is False


async def test_open_upstream_is_skipped_without_a_call(gateway_kit, fake_upstream, relay):
    gateway = await start_with_upstreams(gateway_kit, {
        "openai": {"base_url": fake_upstream.base_url, "priority": 10, "max_retries": 0, "breaker_failures": 1,
                   "breaker_cooldown_s": 60},
        "relay": {"base_url": relay.base_url},
    })
    fake_upstream.inject(path=GENERATIONS, status=502)
    assert (await post_generation(gateway, "opens openai, served by relay"))[0] == 200
    assert (await post_generation(gateway, "straight to relay"))[0] == 200
    assert (fake_upstream.count(GENERATIONS), relay.count(GENERATIONS)) == (1, 2)


async def test_metrics_show_breaker_state_and_attempts_per_upstream(gateway_kit, fake_upstream, dead_url):
    gateway = await start_with_upstreams(gateway_kit, {
        "openai": {"base_url": dead_url, "priority": 10, "max_retries": 0, "breaker_failures": 1,
                   "breaker_cooldown_s": 60},
        "relay": {"base_url": fake_upstream.base_url},
    })
    await post_generation(gateway, "one failover")
    metrics = await scrape(gateway)
    assert 'gatekeeper_upstream_breaker_state{upstream="openai"} 2.0' in metrics
    assert 'gatekeeper_upstream_breaker_state{upstream="relay"} 0.0' in metrics
    assert 'gatekeeper_upstream_consecutive_failures{upstream="openai"} 1.0' in metrics
    assert 'gatekeeper_upstream_breaker_opened_total{upstream="openai"} 1.0' in metrics
    assert 'gatekeeper_upstream_attempts_total{result="connect_error",upstream="openai"} 1.0' in metrics
    assert 'gatekeeper_upstream_attempts_total{result="ok",upstream="relay"} 1.0' in metrics


async def test_hook_reload_config_keeps_breaker_state_of_upstreams_that_stay(gateway_kit, fake_upstream, dead_url):
    upstreams = {
        "openai": {"base_url": dead_url, "priority": 10, "max_retries": 0, "breaker_failures": 1,
                   "breaker_cooldown_s": 60},
        "relay": {"base_url": fake_upstream.base_url},
    }
    gateway = await start_with_upstreams(gateway_kit, upstreams)
    await post_generation(gateway, "opens openai")
    raw = gateway_kit.config_dict()
    raw.pop("upstream")
    raw["upstreams"] = {"openai": {**upstreams["openai"], "api_key": UPSTREAM_KEY},
                        "backup": {"base_url": fake_upstream.base_url, "api_key": UPSTREAM_KEY}}
    fresh = parse_config(raw, path="reloaded.toml")
    await gateway.gateway.hooks.call_all("reload_config", gateway=gateway.gateway, config=fresh)
    _, ready = await get_json(gateway.url + "/ready")
    assert set(ready["plugins"]["forward"]["upstreams"]) == {"openai", "backup"}
    assert ready["plugins"]["forward"]["upstreams"]["openai"]["state"] == "open"
