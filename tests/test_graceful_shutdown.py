"""SIGTERM drains: `gatekeeper serve` stops accepting, lets in-flight requests finish within
`[server] shutdown_timeout_s`, then flushes metering and audit, and exits 0."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import openai
import pytest_asyncio

from gateway_processes import GatewayProcess, free_port, serve_config
from gatekeeper.testing.kit import ADMIN_KEY, CLIENT_KEY


def drain_config(upstream_url: str, port: int, workdir, shutdown_timeout_s: float) -> str:
    return serve_config(upstream_url, port, server=f"shutdown_timeout_s = {shutdown_timeout_s}", sections=f'''
[auth]
admin_keys = ["{ADMIN_KEY}"]
keys = [{{ id = "drain-app", key = "{CLIENT_KEY}", tenant = "drain" }}]

[metering]
database = "sqlite:///{workdir / 'usage.db'}"
flush_interval_ms = 60000  # nothing is written on a timer during the test: only the shutdown flush

[audit]
path = "{workdir / 'audit' / 'gatekeeper-audit.jsonl'}"
''')


class Served:
    def __init__(self, process: GatewayProcess, workdir) -> None:
        self.process = process
        self.workdir = workdir

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.process.base_url, api_key=CLIENT_KEY, max_retries=0)

    def usage_row(self, request_id: str) -> sqlite3.Row | None:
        with sqlite3.connect(self.workdir / "usage.db") as connection:
            connection.row_factory = sqlite3.Row
            return connection.execute("SELECT * FROM gatekeeper_usage WHERE request_id = ?", (request_id,)).fetchone()

    def audit_record(self, request_id: str) -> dict | None:
        for path in sorted((self.workdir / "audit").glob("*.jsonl*")):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record.get("request_id") == request_id:
                    return record
        return None


async def start_served(fake_upstream, tmp_path, shutdown_timeout_s: float) -> Served:
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(drain_config(fake_upstream.base_url, port, tmp_path, shutdown_timeout_s))
    process = GatewayProcess(config, port, tmp_path / "gatekeeper.log")
    await process.start()
    return Served(process, tmp_path)


@pytest_asyncio.fixture
async def served(fake_upstream, tmp_path):
    served = await start_served(fake_upstream, tmp_path, shutdown_timeout_s=20)
    try:
        yield served
    finally:
        await served.process.stop()


async def stream_with_sigterm_after_first_event(served: Served, partial_images: int):
    """Stream a generation, SIGTERM the gateway once the first event is in, read on to the end."""
    async with served.client() as client:
        stream = await client.images.generate(model="gpt-image-1.5", prompt="a fox at closing time", stream=True,
                                              partial_images=partial_images, quality="low")
        events = []
        async for event in stream:
            events.append(event)
            if len(events) == 1:
                served.process.terminate()
        return stream.response.headers["x-gatekeeper-request-id"], events


async def test_sigterm_during_a_stream_lets_it_finish_intact(served, fake_upstream):
    fake_upstream.stream_interval_s = 0.4
    _, events = await stream_with_sigterm_after_first_event(served, partial_images=3)
    assert [event.type for event in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert events[-1].b64_json and events[-1].usage.output_tokens > 0


async def test_the_process_exits_0_after_draining(served, fake_upstream):
    fake_upstream.stream_interval_s = 0.4
    await stream_with_sigterm_after_first_event(served, partial_images=2)
    assert await served.process.wait(timeout=30) == 0


async def test_the_drained_streams_usage_row_and_audit_record_are_flushed(served, fake_upstream):
    fake_upstream.stream_interval_s = 0.4
    request_id, events = await stream_with_sigterm_after_first_event(served, partial_images=2)
    assert await served.process.wait(timeout=30) == 0
    row = served.usage_row(request_id)
    assert row is not None and row["outcome"] == "ok"
    assert (row["input_tokens"], row["output_tokens"]) == (events[-1].usage.input_tokens, events[-1].usage.output_tokens)
    record = served.audit_record(request_id)
    assert record is not None and record["outcome"] == "ok"
    assert record["usage"]["output_tokens"] == events[-1].usage.output_tokens


async def test_after_sigterm_new_connections_are_refused_while_the_stream_goes_on(served, fake_upstream):
    fake_upstream.stream_interval_s = 0.5
    async with served.client() as client:
        stream = await client.images.generate(model="gpt-image-1.5", prompt="a fox at the door", stream=True,
                                              partial_images=3, quality="low")
        iterator = stream.__aiter__()
        await iterator.__anext__()
        served.process.terminate()
        refused = await connection_refused_within(served.process.port, seconds=1.0)
        rest = [event async for event in iterator]
    assert refused
    assert rest[-1].type == "image_generation.completed"


async def connection_refused_within(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return True
        writer.close()
        await asyncio.sleep(0.05)
    return False


async def test_a_request_outlasting_the_drain_is_cut_and_still_recorded(fake_upstream, tmp_path):
    """aiohttp waits shutdown_timeout_s for handlers, then cancels their requests and waits as long
    again, then cancels the handlers: a stream far longer than that is cut, and ends as an abort."""
    served = await start_served(fake_upstream, tmp_path, shutdown_timeout_s=1)
    fake_upstream.stream_interval_s = 2.0  # four events: the upstream would need about 6 s
    events = []
    try:
        async with served.client() as client:
            stream = await client.images.generate(model="gpt-image-1.5", prompt="a fox that stays too long",
                                                  stream=True, partial_images=3, quality="low")
            request_id = stream.response.headers["x-gatekeeper-request-id"]
            try:
                async for event in stream:
                    events.append(event)
                    if len(events) == 1:
                        served.process.terminate()
                        terminated = time.monotonic()
            except Exception:  # the SDK sees the connection close mid-stream
                pass
        code = await served.process.wait(timeout=30)
        stopped_after_s = time.monotonic() - terminated
    finally:
        await served.process.stop()
    assert code == 0 and stopped_after_s < 2 * 1 + 2
    assert events and events[-1].type != "image_generation.completed"
    record = served.audit_record(request_id)
    assert record is not None and record["outcome"] == "client_abort"
    row = served.usage_row(request_id)
    assert row is not None and row["outcome"] == "client_abort"
