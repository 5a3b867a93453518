"""Guards that hold for every test: the upstream key (a canary) never reaches a client or a log.
And the modules that lean on the transport run on both event loops `gatekeeper serve` may use.

Every kit gateway carries `CanaryGuard`, which records responses that contain the key; the
fixture below fails the test that caused one. The report hook fails a test whose captured
stdout, stderr or log output contains the key.
"""

from __future__ import annotations

import asyncio
import os

import pytest
import uvloop

from gatekeeper.testing.kit import CANARY_SIGHTINGS, UPSTREAM_KEY

# The gateway honours the proxy variables towards its upstream, as the OpenAI SDK does; the fake
# upstreams are on loopback, where a proxy of the machine running the tests must not carry them.
# (tests/plugins/test_forward_proxy.py sets its own.)
for _variable in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"):
    os.environ.pop(_variable, None)


@pytest.fixture(autouse=True)
def upstream_key_never_reaches_a_client():
    CANARY_SIGHTINGS.clear()
    yield
    sightings = list(CANARY_SIGHTINGS)
    CANARY_SIGHTINGS.clear()
    if sightings:
        pytest.fail("the upstream key reached a client: " + "; ".join(sightings), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report = yield
    # Sections accumulate over setup, call and teardown; look only at this phase's own output.
    leaked = [title for title, content in report.sections if title.endswith(report.when) and UPSTREAM_KEY in content]
    if leaked and not report.failed:
        report.outcome = "failed"
        report.longrepr = f"the upstream key appeared in captured output: {', '.join(leaked)}"
    return report


# `gatekeeper serve` runs on uvloop by default ([server] uvloop = "auto") and on asyncio's own loop
# where uvloop is missing or turned off. What these modules test leans on the transport (slow
# clients and backpressure, streaming, raw HTTP, uploads streamed upstream, the Redis reader's
# buffered protocol), so their async tests run on both; the rest run on asyncio's.
BOTH_LOOPS = frozenset({
    "test_forward_slow_clients.py", "test_forward_streams.py", "test_proxy_http.py",
    "test_sdk_end_to_end.py", "test_cache_backends.py", "test_uploads.py",
})


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict:
    if item.path.name in BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}
