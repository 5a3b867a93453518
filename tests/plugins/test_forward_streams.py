"""Streams that break: on the upstream side (truncated, stalled) and on the client side (gone)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import openai
import pytest
from aiohttp import web

from gatekeeper import hookimpl
from gatekeeper.flow import Outcome
from gatekeeper.testing.fake_upstream import FakeUpstream
from gatekeeper.testing.kit import CLIENT_KEY, UPSTREAM_KEY, GatewayKit

GENERATIONS = "/v1/images/generations"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
STREAM_REQUEST = {"model": "gpt-image-1.5", "prompt": "a slow stream", "stream": True, "partial_images": 3}


class FlowEnds:
    """Records how each flow ended and when."""

    name = "flow-ends"

    def __init__(self) -> None:
        self.errors: list[tuple[str | None, float]] = []
        self.changed = asyncio.Event()

    @hookimpl
    def exchange_error(self, flow, error) -> None:
        self.errors.append((flow.outcome, time.monotonic()))
        self.changed.set()


@dataclass
class HandlerEnd:
    path: str
    at: float
    connection_closed: bool


class WatchedUpstream(FakeUpstream):
    """A fake upstream that notes when each handler ends and whether its client had hung up."""

    def __init__(self) -> None:
        super().__init__(api_key=UPSTREAM_KEY)
        self.ends: list[HandlerEnd] = []
        self.ended = asyncio.Event()

    def make_app(self) -> web.Application:
        app = super().make_app()
        app.middlewares.append(self._watch)
        return app

    @web.middleware
    async def _watch(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        finally:
            transport = request.transport
            self.ends.append(HandlerEnd(request.path, time.monotonic(), transport is None or transport.is_closing()))
            self.ended.set()


@pytest.fixture
async def watched_kit(tmp_path):
    upstream = WatchedUpstream()
    await upstream.start()
    kit = GatewayKit(upstream.base_url, tmp_path)
    try:
        yield kit, upstream
    finally:
        await kit.stop_all()
        await upstream.stop()


async def test_truncated_sse_makes_the_sdk_stream_raise(gateway, fake_upstream):
    fake_upstream.inject(path=GENERATIONS, status=200, cut_after_events=2)
    events = []
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        stream = await client.images.generate(model="gpt-image-1.5", prompt="cut short", stream=True, partial_images=3)
        with pytest.raises(openai.APIConnectionError):  # a broken stream, never a clean end
            async for event in stream:
                events.append(event.type)
    # The break reaches the client as an error; whatever arrived before it is never the whole stream.
    assert "image_generation.completed" not in events


async def test_truncated_sse_is_not_cached_so_a_repeat_reaches_the_upstream(gateway, fake_upstream):
    fake_upstream.inject(path=GENERATIONS, status=200, cut_after_events=1)
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(gateway.base_url + "/images/generations", headers=AUTH,
                                    json={**STREAM_REQUEST, "prompt": "cut, then whole"}) as response:
                try:
                    await response.read()
                except aiohttp.ClientPayloadError:
                    pass
    assert fake_upstream.count(GENERATIONS) == 2


async def test_truncated_sse_ends_the_flow_as_truncated(gateway_kit, fake_upstream):
    ends = FlowEnds()
    gateway = await gateway_kit.start(plugins=[ends])
    fake_upstream.inject(path=GENERATIONS, status=200, cut_after_events=1)
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.base_url + "/images/generations", headers=AUTH, json=STREAM_REQUEST) as response:
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    await asyncio.wait_for(ends.changed.wait(), 2)
    assert ends.errors[0][0] == Outcome.TRUNCATED


async def test_client_disconnect_mid_stream_cancels_the_upstream_request_and_ends_as_client_abort(watched_kit):
    kit, upstream = watched_kit
    upstream.stream_interval_s = 0.5  # four events: the whole stream would take two seconds
    ends = FlowEnds()
    gateway = await kit.start(plugins=[ends])
    async with aiohttp.ClientSession() as session:
        response = await session.post(gateway.base_url + "/images/generations", headers=AUTH, json=STREAM_REQUEST)
        assert response.status == 200
        await response.content.readuntil(b"\n\n")  # the first event has arrived
        hung_up = time.monotonic()
        response.close()  # drop the connection mid-stream
    await asyncio.wait_for(ends.changed.wait(), 1)
    await asyncio.wait_for(upstream.ended.wait(), 1)
    assert ends.errors == [(Outcome.CLIENT_ABORT, pytest.approx(hung_up, abs=0.3))]
    [end] = upstream.ends
    assert end.connection_closed  # the gateway closed its upstream connection...
    assert end.at - hung_up < 0.7  # ...at once, not after the remaining 1.5 s of stream


async def test_stall_before_headers_gives_504_at_read_timeout(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start({"upstream": {"read_timeout_s": 1.0, "max_retries": 2}})
    fake_upstream.inject(path=GENERATIONS, status=200, delay_s=3)
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(gateway.base_url + "/images/generations", headers=AUTH,
                                json={"model": "gpt-image-1.5", "prompt": "stalled"}) as response:
            elapsed = time.monotonic() - started
            body = await response.json()
    assert response.status == 504 and body["error"]["code"] == "upstream_timeout"
    assert 0.9 <= elapsed <= 1.1
    assert response.headers["x-should-retry"] == "false"  # it may still be generating: do not send it again
    assert fake_upstream.count(GENERATIONS) == 1


async def test_stall_mid_stream_breaks_the_client_stream_at_read_timeout(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start({"upstream": {"read_timeout_s": 0.5}})
    fake_upstream.stream_interval_s = 2  # a gap between events longer than the read timeout
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.base_url + "/images/generations", headers=AUTH, json=STREAM_REQUEST) as response:
            started = time.monotonic()
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
            assert time.monotonic() - started < 1.5


async def test_client_disconnect_while_waiting_for_headers_closes_the_upstream_connection(watched_kit):
    kit, upstream = watched_kit
    ends = FlowEnds()
    gateway = await kit.start(plugins=[ends])
    upstream.inject(path=GENERATIONS, status=200, delay_s=1.5)  # the upstream thinks for 1.5 s
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(session.post(gateway.base_url + "/images/generations", headers=AUTH,
                                                   json={"model": "gpt-image-1.5", "prompt": "never mind"}))
        await asyncio.sleep(0.3)
        request.cancel()  # the client gives up before any header arrived
        hung_up = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await request
    await asyncio.wait_for(ends.changed.wait(), 1)
    assert ends.errors == [(Outcome.CLIENT_ABORT, pytest.approx(hung_up, abs=0.3))]
    await asyncio.wait_for(upstream.ended.wait(), 3)
    [end] = upstream.ends
    assert end.connection_closed  # when the upstream finally answered, the gateway had hung up on it
