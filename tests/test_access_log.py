"""The access log: one JSON line per request, in a fixed field order, redacted, written in batches."""

from __future__ import annotations

import asyncio
import io
from types import SimpleNamespace

import msgspec
import pytest

from gatekeeper.access_log import AccessLine, AccessLog
from gatekeeper.logs import register_secret


class FakeStderr:
    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def flush(self) -> None:
        pass

    def lines(self) -> list[dict]:
        return [msgspec.json.decode(line) for line in self.buffer.getvalue().splitlines()]


@pytest.fixture
def stderr(monkeypatch) -> FakeStderr:
    fake = FakeStderr()
    # Not sys.stderr itself: pytest's capture puts its own back at the start of each test phase.
    monkeypatch.setattr("gatekeeper.access_log.sys", SimpleNamespace(stderr=fake))
    return fake


def line(**fields) -> AccessLine:
    values = dict(request_id="req_1", method="POST", path="/v1/images/generations", status=200, ms=1.5,
                  tenant="design", key_id="design-1", model="gpt-image-1", cache="HIT", outcome="cache_hit",
                  upstream_request_id=None)
    return AccessLine(**{**values, **fields})


async def test_a_line_has_the_request_fields_then_event_level_and_timestamp(stderr):
    log = AccessLog(json_lines=True)
    log.record(line())
    log.flush()
    (written,) = stderr.lines()
    assert list(written) == ["request_id", "method", "path", "status", "ms", "tenant", "key_id", "model", "cache",
                             "outcome", "upstream_request_id", "event", "level", "timestamp"]
    assert written["event"] == "request" and written["level"] == "info" and written["cache"] == "HIT"
    assert written["timestamp"].endswith("Z") and len(written["timestamp"]) == len("2026-11-27T02:36:02.645243Z")


async def test_lines_wait_in_the_buffer_until_the_flush_interval(stderr):
    log = AccessLog(json_lines=True, flush_interval_s=0.05)
    log.record(line(request_id="req_a"))
    log.record(line(request_id="req_b"))
    assert stderr.lines() == []
    await asyncio.sleep(0.15)
    assert [entry["request_id"] for entry in stderr.lines()] == ["req_a", "req_b"]


async def test_a_full_buffer_is_written_at_once(stderr):
    log = AccessLog(json_lines=True, flush_interval_s=60, max_buffered_lines=3)
    for number in range(3):
        log.record(line(request_id=f"req_{number}"))
    assert len(stderr.lines()) == 3


async def test_client_sent_path_and_model_are_redacted_and_cut(stderr):
    register_secret("sk-upstream-secret-for-access-log-test")
    log = AccessLog(json_lines=True)
    for _ in range(2):  # the second time from the memo
        log.record(line(path="/v1/images/sk-upstream-secret-for-access-log-test", model="m" * 400))
    log.flush()
    for written in stderr.lines():
        assert "sk-upstream-secret-for-access-log-test" not in written["path"] and "[redacted]" in written["path"]
        assert written["model"] == "m" * 300


async def test_a_gateway_logs_each_request_with_its_tenant_model_and_cache_status(stderr, gateway, openai_client):
    for _ in range(2):
        await openai_client.images.generate(model="gpt-image-1", prompt="a lighthouse at night", size="1024x1024")
    gateway.gateway.access_log.flush()
    miss, hit = [entry for entry in stderr.lines() if entry["path"] == "/v1/images/generations"]
    assert (miss["cache"], miss["outcome"], hit["cache"], hit["outcome"]) == ("MISS", "ok", "HIT", "cache_hit")
    assert miss["model"] == hit["model"] == "gpt-image-1"
    assert miss["tenant"] == hit["tenant"] and miss["tenant"] is not None and miss["status"] == hit["status"] == 200
    assert miss["upstream_request_id"] is not None and miss["request_id"] != hit["request_id"]


async def test_a_secret_registered_later_is_redacted_from_paths_logged_before(stderr):
    log = AccessLog(json_lines=True)
    path = "/v1/images/later-secret-for-access-log-test-42"
    log.record(line(path=path))
    register_secret("later-secret-for-access-log-test-42")  # as a reload registers a new upstream key
    log.record(line(path=path))
    log.flush()
    before, after = stderr.lines()
    assert before["path"] == path
    assert "later-secret-for-access-log-test-42" not in after["path"] and "[redacted]" in after["path"]


async def test_a_request_refused_before_its_body_is_read_is_logged_too(stderr, gateway_kit):
    # Refused at the door (too large by its Content-Length, over max_concurrency, a WebSocket):
    # an operator chasing 413s or 503s finds them in the access log like any other answer.
    import aiohttp

    from gatekeeper.testing.kit import CLIENT_KEY

    gateway = await gateway_kit.start({"server": {"max_body_bytes": 1000}})
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.base_url + "/images/generations", data=b"x" * 5000,
                                headers={"Authorization": f"Bearer {CLIENT_KEY}",
                                         "Content-Type": "application/json"}) as response:
            assert response.status == 413
            request_id = response.headers["x-gatekeeper-request-id"]
    gateway.gateway.access_log.flush()
    logged = [entry for entry in stderr.lines() if entry.get("request_id") == request_id]
    assert [(entry["status"], entry["outcome"], entry["path"]) for entry in logged] == [
        (413, "rejected", "/v1/images/generations")]
