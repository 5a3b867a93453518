"""Retries in the forwarder: what is retried, how long it waits, what is never sent twice,
and what the client (the official SDK) sees when the gateway gives up."""

from __future__ import annotations

import time

import aiohttp
import msgspec
import openai
import pytest
from multidict import CIMultiDict

from gatekeeper import hookimpl
from gatekeeper.testing.kit import CLIENT_KEY

GENERATIONS = "/v1/images/generations"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
# Fast retries for tests: the first retry waits up to 50 ms, any wait is at most 0.5 s.
RETRIES = {"upstream": {"max_retries": 2, "retry_backoff_s": 0.05, "retry_max_delay_s": 0.5}}


class FlowRecorder:
    """Keeps every flow that ends, so tests can read attempts and the forwarder's notes."""

    name = "flow-recorder"

    def __init__(self) -> None:
        self.flows: list = []

    @hookimpl
    def exchange_complete(self, flow) -> None:
        self.flows.append(flow)

    @hookimpl
    def exchange_error(self, flow, error) -> None:
        self.flows.append(flow)


async def post_generation(gateway, prompt: str) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.base_url + "/images/generations", headers=AUTH,
                                json={"model": "gpt-image-1.5", "prompt": prompt}) as response:
            return response.status, CIMultiDict(response.headers), await response.read()


def sdk(gateway, max_retries: int = 0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=max_retries)


async def test_429_then_200_is_one_client_call_and_two_upstream_calls(gateway_kit, fake_upstream):
    recorder = FlowRecorder()
    gateway = await gateway_kit.start(RETRIES, plugins=[recorder])
    fake_upstream.inject(path=GENERATIONS, status=429)
    async with sdk(gateway) as client:
        result = await client.images.generate(model="gpt-image-1.5", prompt="rate limited once")
    assert result.data[0].b64_json
    assert fake_upstream.count(GENERATIONS) == 2
    assert recorder.flows[-1].attempts == 2
    assert recorder.flows[-1].scratch["forward"]["upstreams"] == ["default", "default"]


async def test_retry_waits_as_long_as_retry_after_ms_asks(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start(RETRIES)
    fake_upstream.inject(path=GENERATIONS, status=429, headers={"retry-after-ms": "300"})
    status, _, _ = await post_generation(gateway, "wait 300 ms")
    assert status == 200
    first, second = fake_upstream.calls[-2:]
    assert 0.3 <= second.time - first.time < 0.45


async def test_retry_after_in_seconds_is_honoured(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start({"upstream": {"max_retries": 1, "retry_max_delay_s": 2}})
    fake_upstream.inject(path=GENERATIONS, status=503, headers={"retry-after": "1"})
    status, _, _ = await post_generation(gateway, "wait one second")
    assert status == 200
    first, second = fake_upstream.calls[-2:]
    assert 1.0 <= second.time - first.time < 1.2


async def test_retry_after_longer_than_the_cap_is_relayed_at_once_for_the_sdk_to_decide(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start(RETRIES)
    fake_upstream.inject(path=GENERATIONS, status=429, headers={"retry-after": "30"})
    started = time.monotonic()
    status, headers, body = await post_generation(gateway, "come back in 30 s")
    assert time.monotonic() - started < 0.5
    assert status == 429 and headers["retry-after"] == "30"
    assert headers["x-should-retry"] == "true"  # the gateway did not retry: the SDK may wait and retry
    assert msgspec.json.decode(body)["error"]["code"] == "rate_limit_exceeded"  # OpenAI's own error
    assert fake_upstream.count(GENERATIONS) == 1


async def test_persistent_500_relays_the_upstream_error_after_the_retry_budget(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start(RETRIES)
    fake_upstream.inject(path=GENERATIONS, status=500, times=3)
    status, headers, body = await post_generation(gateway, "always failing")
    assert status == 500
    assert msgspec.json.decode(body)["error"]["message"].startswith("The server had an error")
    assert headers["x-request-id"].startswith("req_")  # the upstream's id, for OpenAI support
    assert headers["x-should-retry"] == "false"  # the gateway retried already
    assert fake_upstream.count(GENERATIONS) == 3


async def test_exhausted_retries_stop_the_sdk_from_multiplying_upstream_calls(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start(RETRIES)
    fake_upstream.inject(path=GENERATIONS, status=500, times=20)
    async with sdk(gateway, max_retries=2) as client:  # the SDK's default
        with pytest.raises(openai.InternalServerError):
            await client.images.generate(model="gpt-image-1.5", prompt="storm")
    assert fake_upstream.count(GENERATIONS) == 3  # 1 + max_retries, not 3 x 3


async def test_failed_request_is_not_cached_so_a_repeat_reaches_the_upstream(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start(RETRIES)
    fake_upstream.inject(path=GENERATIONS, status=500, times=3)
    assert (await post_generation(gateway, "same prompt"))[0] == 500
    status, headers, _ = await post_generation(gateway, "same prompt")
    assert status == 200
    assert fake_upstream.count(GENERATIONS) == 4
    assert headers.get("x-gatekeeper-cache") != "HIT"


async def test_relayed_429_without_retry_after_gets_one(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start({"upstream": {"max_retries": 0}})
    fake_upstream.inject(path=GENERATIONS, status=429)
    status, headers, _ = await post_generation(gateway, "no retry-after from upstream")
    assert status == 429
    assert headers["retry-after"] == "1"
    assert headers["x-should-retry"] == "true"


async def test_connection_refused_gives_502_within_the_retry_deadline(gateway_kit, dead_url):
    gateway = await gateway_kit.start({"upstream": {**RETRIES["upstream"], "base_url": dead_url}})
    started = time.monotonic()
    status, headers, body = await post_generation(gateway, "nobody home")
    elapsed = time.monotonic() - started
    assert status == 502
    assert msgspec.json.decode(body)["error"]["code"] == "upstream_unreachable"
    assert headers["x-should-retry"] == "false"
    assert elapsed < 0.05 + 0.1 + 0.3  # two backoffs of at most 50 and 100 ms, plus slack


async def test_without_gateway_retries_the_sdk_may_retry_an_unreachable_upstream(gateway_kit, dead_url):
    gateway = await gateway_kit.start({"upstream": {"max_retries": 0, "base_url": dead_url}})
    status, headers, _ = await post_generation(gateway, "nobody home")
    assert status == 502
    assert headers["x-should-retry"] == "true"


async def test_generation_is_not_resent_after_the_upstream_dropped_the_connection(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start(RETRIES)
    fake_upstream.inject(path=GENERATIONS, status=200, reset=True)
    status, headers, body = await post_generation(gateway, "dropped after sending")
    assert status == 502
    assert msgspec.json.decode(body)["error"]["code"] == "upstream_disconnected"
    assert headers["x-should-retry"] == "false"  # it may be billing already: the SDK must not resend
    assert fake_upstream.count(GENERATIONS) == 1


async def test_generation_cut_part_way_through_a_small_body_is_not_resent(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start(RETRIES)
    fake_upstream.inject(path=GENERATIONS, status=200, cut_after_bytes=20)
    status, headers, _ = await post_generation(gateway, "cut in the body")
    assert status == 502
    assert headers["x-should-retry"] == "false"
    assert fake_upstream.count(GENERATIONS) == 1


async def test_retry_after_send_allows_resending_after_a_drop(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start({"upstream": {**RETRIES["upstream"], "retry_after_send": True}})
    fake_upstream.inject(path=GENERATIONS, status=200, reset=True)
    status, _, _ = await post_generation(gateway, "resend allowed")
    assert status == 200
    assert fake_upstream.count(GENERATIONS) == 2


async def test_get_is_resent_after_a_drop_because_it_bills_nothing(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start(RETRIES)
    fake_upstream.inject(path="/v1/models", status=200, reset=True)
    async with sdk(gateway) as client:
        models = await client.models.list()
    assert models.data
    assert fake_upstream.count("/v1/models") == 2


async def test_client_errors_are_not_retried(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start(RETRIES)
    fake_upstream.inject(path=GENERATIONS, status=400)
    status, _, _ = await post_generation(gateway, "bad request")
    assert status == 400
    assert fake_upstream.count(GENERATIONS) == 1


async def test_total_timeout_stops_a_retry_that_would_end_after_it(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start({"upstream": {"max_retries": 2, "retry_max_delay_s": 5, "total_timeout_s": 1}})
    fake_upstream.inject(path=GENERATIONS, status=503, headers={"retry-after-ms": "1500"})
    started = time.monotonic()
    status, headers, _ = await post_generation(gateway, "past the deadline")
    assert time.monotonic() - started < 0.5
    assert status == 503 and headers["retry-after-ms"] == "1500"
    assert fake_upstream.count(GENERATIONS) == 1


@pytest.fixture
def dead_url() -> str:
    """A loopback URL where nothing listens: connecting is refused at once."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# ------------------------------------------------------------------ large non-streamed bodies

BIG_JSON = msgspec.json.encode({"created": 1, "data": [{"b64_json": "A" * (2 * 1024 * 1024)}]})


@pytest.fixture
async def big_json_upstream():
    """An upstream whose generations answer a 2 MB JSON body; `cut` makes it drop half-way."""
    from aiohttp import web

    state = {"cut": False, "calls": 0, "chunked": False}

    async def generate(request: web.Request) -> web.StreamResponse:
        await request.read()
        state["calls"] += 1
        response = web.StreamResponse(headers={"content-type": "application/json"})
        if not state["chunked"]:
            response.content_length = len(BIG_JSON)
        await response.prepare(request)
        if state["cut"]:
            await response.write(BIG_JSON[: len(BIG_JSON) // 2])
            request.transport.close()
            return response
        for start in range(0, len(BIG_JSON), 65536):
            await response.write(BIG_JSON[start:start + 65536])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post(GENERATIONS, generate)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state["base_url"] = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        yield state
    finally:
        await runner.cleanup()


async def test_with_buffer_response_bytes_a_large_json_cut_part_way_is_a_clean_502_the_sdk_does_not_resend(
        gateway_kit, big_json_upstream):
    big_json_upstream["cut"] = True
    gateway = await gateway_kit.start({"upstream": {**RETRIES["upstream"], "base_url": big_json_upstream["base_url"],
                                                    "buffer_response_bytes": 64 * 1024 * 1024}})
    async with sdk(gateway, max_retries=2) as client:
        with pytest.raises(openai.InternalServerError) as raised:
            await client.images.generate(model="gpt-image-1.5", prompt="big and broken")
    assert raised.value.status_code == 502 and raised.value.code == "upstream_disconnected"
    assert big_json_upstream["calls"] == 1  # neither the gateway nor the SDK sent it twice


async def test_by_default_a_large_json_cut_part_way_reaches_the_client_broken(gateway_kit, big_json_upstream):
    big_json_upstream["cut"] = True
    gateway = await gateway_kit.start({"upstream": {**RETRIES["upstream"], "base_url": big_json_upstream["base_url"]}})
    async with sdk(gateway, max_retries=0) as client:
        with pytest.raises(openai.APIConnectionError):
            await client.images.generate(model="gpt-image-1.5", prompt="big and broken, streamed")
    assert big_json_upstream["calls"] == 1  # the gateway never re-sends a generation that was cut


async def test_large_json_reaches_the_client_whole(gateway_kit, big_json_upstream):
    gateway = await gateway_kit.start({"upstream": {"base_url": big_json_upstream["base_url"]}})
    async with sdk(gateway) as client:
        result = await client.images.generate(model="gpt-image-1.5", prompt="big")
    assert len(result.data[0].b64_json) == 2 * 1024 * 1024


async def test_json_longer_than_buffer_response_bytes_streams_through_whole(gateway_kit, big_json_upstream):
    big_json_upstream["chunked"] = True  # no content-length: the gateway finds out while reading
    gateway = await gateway_kit.start({"upstream": {"base_url": big_json_upstream["base_url"],
                                                    "buffer_response_bytes": 100_000}})
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.base_url + "/images/generations", headers=AUTH,
                                json={"model": "gpt-image-1.5", "prompt": "streamed"}) as response:
            assert response.headers.get("transfer-encoding") == "chunked"
            assert await response.read() == BIG_JSON
