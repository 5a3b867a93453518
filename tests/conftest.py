"""Guards that hold for every test: the upstream key (a canary) never reaches a client or a log.

Every kit gateway carries `CanaryGuard`, which records responses that contain the key; the
fixture below fails the test that caused one. The report hook fails a test whose captured
stdout, stderr or log output contains the key.
"""

from __future__ import annotations

import pytest

from gatekeeper.testing.kit import CANARY_SIGHTINGS, UPSTREAM_KEY


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
