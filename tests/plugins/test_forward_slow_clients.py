"""The server side: slowloris, slow POST, clients that never read, and overload.

Every connection here is on loopback and every loop has a deadline, so nothing outlives its test.
"""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import msgspec
import pytest
from aiohttp import web

from gatekeeper import hookimpl
from gatekeeper.config import parse_config
from gatekeeper.flow import Outcome
from gatekeeper.server import start_gateway
from gatekeeper.testing.kit import CLIENT_KEY, UPSTREAM_KEY, CanaryGuard

GENERATIONS = "/v1/images/generations"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
CHUNK = b"x" * 65536
ENDLESS_CAP_BYTES = 256 * 1024 * 1024  # an endless body stops here, so a failing test still ends


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


class Endless:
    """An upstream whose generations answer a body that never ends; counts what it has sent."""

    def __init__(self) -> None:
        self.sent = 0
        self.runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post(GENERATIONS, self.generate)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/v1"
        return self.base_url

    async def generate(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        try:
            while self.sent < ENDLESS_CAP_BYTES:
                await response.write(CHUNK)
                self.sent += len(CHUNK)
        except ConnectionError:
            pass
        return response

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def endless():
    upstream = Endless()
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.stop()


class FlowEnds:
    name = "flow-ends"

    def __init__(self) -> None:
        self.outcomes: list[str | None] = []

    @hookimpl
    def exchange_error(self, flow, error) -> None:
        self.outcomes.append(flow.outcome)


async def start_gateway_for(gateway_kit, fake_url: str, endless_url: str, server: dict, plugins=()):
    """A gateway with the fake upstream for gpt-image-* and the endless one for "endless-*"."""
    raw = gateway_kit.config_dict({"server": server})
    raw.pop("upstream")
    raw["upstreams"] = {
        "fake": {"base_url": fake_url, "api_key": UPSTREAM_KEY, "models": ["gpt-image-*"], "max_retries": 0},
        "endless": {"base_url": endless_url, "api_key": UPSTREAM_KEY, "models": ["endless-*"], "max_retries": 0},
    }
    config = parse_config(raw, path=str(gateway_kit.workdir / "test-config.toml"))
    running = await start_gateway(config, extra_plugins=[*plugins, CanaryGuard()])
    gateway_kit.running.append(running)
    return running


def host_port(gateway) -> tuple[str, int]:
    host, port = gateway.url.removeprefix("http://").split(":")
    return host, int(port)


async def closed_by_server(reader: asyncio.StreamReader, within_s: float) -> bool:
    """Whether the server closes the connection within `within_s` (reading whatever it sends)."""
    try:
        async with asyncio.timeout(within_s):
            while await reader.read(65536):
                pass
        return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def non_reading_client(gateway) -> socket.socket:
    """Ask for an endless streamed body and never read it (a small receive buffer, on purpose)."""
    body = msgspec.json.encode({"model": "endless-1", "prompt": "never read", "stream": True})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, host_port(gateway))
    head = (f"POST /v1/images/generations HTTP/1.1\r\nHost: gk\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    await asyncio.get_running_loop().sock_sendall(sock, head + body)
    return sock


async def slowloris(gateway, until: float, closes: list[float], byte_every_s: float = 0.2) -> None:
    """Trickle header bytes, never finishing the head; reconnect when cut off, until `until`."""
    host, port = host_port(gateway)
    while time.monotonic() < until:
        reader, writer = await asyncio.open_connection(host, port)
        opened = time.monotonic()
        try:
            writer.write(b"POST /v1/images/generations HTTP/1.1\r\nHost: gk\r\n")
            while time.monotonic() < until:
                writer.write(b"X-Slow: a\r\n")
                await writer.drain()
                if await closed_by_server(reader, byte_every_s):
                    closes.append(time.monotonic() - opened)
                    break
        except ConnectionError:
            closes.append(time.monotonic() - opened)
        finally:
            writer.close()


# ------------------------------------------------------------------ header and body timeouts


async def test_slowloris_is_cut_off_at_the_header_timeout(gateway_kit):
    gateway = await gateway_kit.start({"server": {"header_timeout_s": 0.5}})
    closes: list[float] = []
    await slowloris(gateway, time.monotonic() + 1.2, closes, byte_every_s=0.1)
    assert closes and 0.45 <= closes[0] <= 0.7


async def test_connection_that_sends_nothing_is_closed_at_the_header_timeout(gateway_kit):
    gateway = await gateway_kit.start({"server": {"header_timeout_s": 0.5}})
    reader, writer = await asyncio.open_connection(*host_port(gateway))
    started = time.monotonic()
    assert await closed_by_server(reader, 2)
    assert 0.45 <= time.monotonic() - started <= 0.7
    writer.close()


async def test_idle_keep_alive_survives_but_a_stalled_second_request_head_is_cut_off(gateway_kit):
    gateway = await gateway_kit.start({"server": {"header_timeout_s": 0.5}})
    reader, writer = await asyncio.open_connection(*host_port(gateway))
    writer.write(b"GET /health HTTP/1.1\r\nHost: gk\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    await reader.readexactly(len(b'{"status": "ok"}'))
    assert not await closed_by_server(reader, 0.8)  # idle between requests longer than the header timeout
    writer.write(b"GET /health HTTP/1.1\r\nHo")  # a second request starts, and stalls
    started = time.monotonic()
    assert await closed_by_server(reader, 2)
    assert 0.45 <= time.monotonic() - started <= 0.7
    writer.close()


async def test_a_head_that_stalls_after_quick_requests_gets_its_own_full_timeout(gateway_kit):
    gateway = await gateway_kit.start({"server": {"header_timeout_s": 0.5}})
    reader, writer = await asyncio.open_connection(*host_port(gateway))
    for _ in range(3):  # requests in quick succession, the last 0.3 s after the connect
        writer.write(b"GET /health HTTP/1.1\r\nHost: gk\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        await reader.readexactly(len(b'{"status": "ok"}'))
        await asyncio.sleep(0.1)
    writer.write(b"GET /health HTTP/1.1\r\nHo")  # stalls 0.4 s after the connect
    started = time.monotonic()
    assert await closed_by_server(reader, 2)
    assert 0.45 <= time.monotonic() - started <= 0.7  # not at the connection's first deadline (0.5 s after connect)
    writer.close()


async def test_slow_post_body_gets_408_at_the_body_timeout(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start({"server": {"body_timeout_s": 0.5}})
    reader, writer = await asyncio.open_connection(*host_port(gateway))
    writer.write(f"POST /v1/images/generations HTTP/1.1\r\nHost: gk\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{".encode())
    started = time.monotonic()
    head = b""
    async with asyncio.timeout(3):
        while not head:
            writer.write(b" ")  # one byte every 100 ms: 1000 bytes would take 100 s
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.1)
            except TimeoutError:
                pass
    assert head.startswith(b"HTTP/1.1 408")
    assert 0.45 <= time.monotonic() - started <= 0.8
    assert fake_upstream.count() == 0
    writer.close()


# ------------------------------------------------------------------ clients that do not read


async def test_non_reading_client_holds_back_the_upstream_instead_of_growing_memory(gateway_kit, fake_upstream, endless):
    gateway = await start_gateway_for(gateway_kit, fake_upstream.base_url, endless.base_url,
                                      {"write_buffer_bytes": 256 * 1024, "send_timeout_s": 30})
    rss_before = rss_bytes()
    sock = await non_reading_client(gateway)
    try:
        await asyncio.sleep(1.5)  # unbounded buffering would have moved hundreds of MB by now
        sent_after_stall = endless.sent
        await asyncio.sleep(0.5)
        assert endless.sent == sent_after_stall  # backpressure: the upstream is not being read either
        assert sent_after_stall < 32 * 1024 * 1024  # socket buffers and one write buffer, not 256 MB
        assert rss_bytes() - rss_before < 32 * 1024 * 1024
    finally:
        sock.close()


async def test_non_reading_client_is_disconnected_at_the_send_timeout(gateway_kit, fake_upstream, endless):
    ends = FlowEnds()
    gateway = await start_gateway_for(gateway_kit, fake_upstream.base_url, endless.base_url,
                                      {"write_buffer_bytes": 256 * 1024, "send_timeout_s": 0.5}, plugins=[ends])
    sock = await non_reading_client(gateway)
    try:
        async with asyncio.timeout(5):
            while not ends.outcomes:
                await asyncio.sleep(0.05)
        assert ends.outcomes == [Outcome.CLIENT_ABORT]
        assert gateway.gateway.in_flight == 0  # its concurrency slot is free again
    finally:
        sock.close()


async def test_other_clients_stay_fast_beside_slowloris_and_a_non_reading_client(gateway_kit, fake_upstream, endless):
    gateway = await start_gateway_for(gateway_kit, fake_upstream.base_url, endless.base_url,
                                      {"header_timeout_s": 1, "write_buffer_bytes": 256 * 1024, "send_timeout_s": 30})
    rss_before = rss_bytes()
    until = time.monotonic() + 3
    closes: list[float] = []
    attackers = [asyncio.create_task(slowloris(gateway, until, closes)) for _ in range(50)]
    greedy = await non_reading_client(gateway)
    latencies: list[float] = []

    async def client(session: aiohttp.ClientSession, worker: int) -> None:
        for index in range(40):
            started = time.monotonic()
            async with session.post(gateway.base_url + "/images/generations", headers=AUTH,
                                    json={"model": "gpt-image-1.5", "prompt": f"honest {worker}-{index}"}) as response:
                await response.read()
                assert response.status == 200
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.01)

    try:
        await asyncio.sleep(0.3)  # let the attack settle in first
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(client(session, worker) for worker in range(5)))
        await asyncio.gather(*attackers)
    finally:
        greedy.close()
        for task in attackers:
            task.cancel()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    assert len(latencies) == 200 and p99 < 1.0
    assert closes and max(closes) < 1.5  # the server cut every slowloris off at its header timeout
    assert rss_bytes() - rss_before < 48 * 1024 * 1024


# ------------------------------------------------------------------ overload


async def test_over_max_concurrency_gets_a_fast_503_with_retry_after_and_no_upstream_call(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start({"server": {"max_concurrency": 2}})
    fake_upstream.inject(path=GENERATIONS, status=200, delay_s=1, times=2)

    async def generate(prompt: str) -> tuple[int, float, aiohttp.typedefs.LooseHeaders, bytes]:
        started = time.monotonic()
        async with aiohttp.ClientSession() as session:
            async with session.post(gateway.base_url + "/images/generations", headers=AUTH,
                                    json={"model": "gpt-image-1.5", "prompt": prompt}) as response:
                return response.status, time.monotonic() - started, response.headers.copy(), await response.read()

    slow = [asyncio.create_task(generate(f"slow {index}")) for index in range(2)]
    async with asyncio.timeout(2):
        while fake_upstream.count(GENERATIONS) < 2:
            await asyncio.sleep(0.01)
    status, elapsed, headers, body = await generate("one too many")
    assert status == 503 and elapsed < 0.1
    assert headers["retry-after"] == "1" and headers["x-should-retry"] == "true"
    assert msgspec.json.decode(body)["error"]["code"] == "overloaded"
    assert fake_upstream.count(GENERATIONS) == 2
    assert [result[0] for result in await asyncio.gather(*slow)] == [200, 200]
    assert (await generate("a free slot again"))[0] == 200


async def test_idle_keep_alive_connection_is_closed_at_the_keepalive_timeout(gateway_kit):
    gateway = await gateway_kit.start({"server": {"header_timeout_s": 5, "keepalive_timeout_s": 0.5}})
    reader, writer = await asyncio.open_connection(*host_port(gateway))
    writer.write(b"GET /health HTTP/1.1\r\nHost: gk\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    await reader.readexactly(len(b'{"status": "ok"}'))
    started = time.monotonic()
    assert await closed_by_server(reader, 2)
    assert 0.45 <= time.monotonic() - started <= 0.8
    writer.close()
