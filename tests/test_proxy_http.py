"""Raw HTTP at the edges: header hygiene, limits, upstream failures, unbuffered streams."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time

import aiohttp
import msgspec
import pytest
from aiohttp import http_writer, web

from gatekeeper import hookimpl
from gatekeeper.flow import Flow
from gatekeeper.testing.kit import CLIENT_KEY, UPSTREAM_KEY

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


async def post(url, body=None, headers=None, **kwargs):
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body, headers={**AUTH, **(headers or {})}, **kwargs) as response:
            return response.status, response.headers.copy(), await response.read()


async def test_hop_by_hop_request_headers_never_reach_upstream(gateway, fake_upstream):
    status, _, _ = await post(gateway.base_url + "/images/generations", {"model": "gpt-image-1.5", "prompt": "hop"},
                              headers={"Connection": "keep-alive, X-Private-Hop", "X-Private-Hop": "secret",
                                       "Keep-Alive": "timeout=5", "TE": "trailers", "X-End-To-End": "kept"})
    assert status == 200
    sent = fake_upstream.calls[-1].headers
    for name in ("X-Private-Hop", "Keep-Alive", "TE"):
        assert name not in sent
    assert sent["X-End-To-End"] == "kept"


async def test_hop_by_hop_response_headers_are_stripped(gateway_kit, custom_upstream):
    async def upstream(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b'{"ok":true}', content_type="application/json",
                            headers={"Connection": "X-Upstream-Hop", "X-Upstream-Hop": "1", "Keep-Alive": "timeout=9",
                                     "X-Request-Id": "req_custom", "X-Ratelimit-Remaining-Requests": "7"})

    gateway = await gateway_kit.start({"upstream": {"base_url": await custom_upstream(upstream)}})
    status, headers, body = await post(gateway.base_url + "/chat/completions", {"model": "gpt-4o-mini", "messages": []})
    assert (status, body) == (200, b'{"ok":true}')
    assert "X-Upstream-Hop" not in headers and "Keep-Alive" not in headers
    assert headers["X-Request-Id"] == "req_custom"  # the upstream's id is kept, not replaced
    assert headers["X-Ratelimit-Remaining-Requests"] == "7"


async def test_gateway_adds_its_own_x_request_id_only_when_upstream_sent_none(gateway_kit, custom_upstream):
    async def upstream(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b'{"object":"list","data":[]}', content_type="application/json")

    gateway = await gateway_kit.start({"upstream": {"base_url": await custom_upstream(upstream)}})
    status, headers, _ = await post(gateway.base_url + "/chat/completions", {"model": "gpt-4o-mini", "messages": []})
    assert status == 200
    assert headers["x-request-id"] == headers["x-gatekeeper-request-id"]
    assert headers["x-request-id"].startswith("req_gk_")


async def test_unknown_json_fields_reach_upstream_untouched(gateway, fake_upstream):
    body = b'{"model":"gpt-image-1.5","prompt":"raw","future_field":{"nested":[1,2.50,"x"]},"svg":true}'
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.base_url + "/images/generations", data=body,
                                headers={**AUTH, "Content-Type": "application/json"}) as response:
            assert response.status == 200
    assert fake_upstream.calls[-1].body == body


async def test_body_over_max_body_bytes_gets_413_before_it_is_read(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start({"server": {"max_body_bytes": 1024}})
    status, headers, body = await post(gateway.base_url + "/images/generations", {"prompt": "x" * 4096})
    assert status == 413
    error = msgspec.json.decode(body)["error"]
    assert error["code"] == "request_too_large" and set(error) == {"message", "type", "param", "code"}
    assert headers["x-request-id"]
    assert fake_upstream.count() == 0


async def test_chunked_body_over_the_limit_gets_413(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start({"server": {"max_body_bytes": 1024}})

    async def chunks():
        for _ in range(8):
            yield b"x" * 512

    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.base_url + "/images/generations", data=chunks(),
                                headers={**AUTH, "Content-Type": "application/json"}) as response:
            assert response.status == 413
    assert fake_upstream.count() == 0


async def test_a_chunked_body_over_the_limit_that_arrives_with_its_head_gets_413(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start({"server": {"max_body_bytes": 1024}})
    body = b"x" * 2048
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/images/generations HTTP/1.1\r\nHost: gk\r\nAuthorization: " + AUTH["Authorization"].encode()
                 + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")  # head and whole body in one write
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413")
    assert fake_upstream.count() == 0


async def test_a_plugin_reading_the_request_itself_gets_the_body_the_flow_carries(gateway_kit, fake_upstream):
    read: list[tuple[bytes, bytes]] = []

    class Reader:
        @hookimpl
        async def check_request(self, flow: Flow) -> None:
            read.append((await flow.request.read(), flow.body))

    gateway = await gateway_kit.start(plugins=[Reader()])
    body = b'{"model":"gpt-image-1.5","prompt":"read twice"}'
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.base_url + "/images/generations", data=body,
                                headers={**AUTH, "Content-Type": "application/json"}) as response:
            assert response.status == 200
    assert read == [(body, body)]


async def test_unreachable_upstream_gives_502_openai_shaped(gateway_kit):
    gateway = await gateway_kit.start({"upstream": {"base_url": "http://127.0.0.1:9/v1"}})
    status, headers, body = await post(gateway.base_url + "/images/generations", {"model": "gpt-image-1.5", "prompt": "x"})
    assert status == 502
    error = msgspec.json.decode(body)["error"]
    assert error["code"] == "upstream_unreachable" and error["type"]
    assert headers["x-request-id"]
    assert UPSTREAM_KEY.encode() not in body


async def test_upstream_stall_gives_504(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start({"upstream": {"read_timeout_s": 0.5}})
    fake_upstream.inject(path="/v1/images/generations", status=200, delay_s=3)
    started = time.monotonic()
    status, _, body = await post(gateway.base_url + "/images/generations", {"model": "gpt-image-1.5", "prompt": "stall"})
    assert status == 504
    assert msgspec.json.decode(body)["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 2.5


async def test_sse_events_reach_the_client_as_they_arrive(gateway, fake_upstream):
    fake_upstream.stream_interval_s = 0.3
    arrivals = []
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.base_url + "/images/generations", headers=AUTH,
                                json={"model": "gpt-image-1.5", "prompt": "slow stream", "stream": True, "partial_images": 3}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            started = time.monotonic()
            async for line in response.content:
                if line.startswith(b"event:"):
                    arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 4
    # Unbuffered: the first event arrives long before the last one was even produced.
    assert arrivals[-1] - arrivals[0] > 0.6


async def test_health_needs_no_auth_and_ready_reports_plugins(gateway):
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/health") as response:
            assert response.status == 200
        async with session.get(gateway.url + "/ready") as response:
            body = await response.json()
            assert response.status == 200 and body["ready"] is True and body["started"] is True


async def test_unknown_non_v1_route_is_an_openai_shaped_404(gateway):
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/nope") as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "unknown_url"


async def raw_request(url: str, raw_path: str) -> tuple[int, bytes]:
    """Send a request line exactly as given, so no client library normalises the path first."""
    host, port = url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {raw_path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    status = int(response.split(b" ", 2)[1])
    return status, response


@pytest.mark.parametrize("raw_path", ["/v1/%252e%252e/dashboard", "/v1/models%3fx=1", "/v1/models%23frag", "/v1/a%5c..%5cb"])
async def test_double_encoded_paths_are_refused_before_reaching_upstream(gateway, fake_upstream, raw_path):
    for _ in range(2):  # the second time the gateway remembers the path's verdict
        status, response = await raw_request(gateway.url, raw_path)
        assert status == 400 and b"invalid_path" in response
    assert fake_upstream.count() == 0


async def test_dot_segments_resolve_the_same_way_every_time(gateway, fake_upstream):
    for _ in range(2):
        status, response = await raw_request(gateway.url, "/v1/images/../../health")
        assert status == 200 and b'"status"' in response
    assert fake_upstream.count() == 0


async def slow_raw_post(url: str, path: str, body: bytes) -> tuple[bytes, bytes]:
    """POST through a socket with a small receive buffer, read in small pieces with pauses: the
    gateway's writes fill the socket and wait in the transport's queue. Returns (head, body)."""
    host, port = url.split("//")[1].split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
    received = bytearray()
    while len(received) < length:
        piece = await reader.read(16 * 1024)
        assert piece, "the connection ended before the whole body"
        received += piece
        if len(received) % (256 * 1024) < 16 * 1024:
            await asyncio.sleep(0.01)
    writer.close()
    return head, bytes(received)


async def test_a_large_answer_reaches_a_slow_reader_whole_from_the_upstream_and_from_the_cache(gateway_kit, custom_upstream):
    # On uvloop the head and the body go to the transport unjoined (one vectored write); a client
    # that reads slowly leaves them queued there, and must still get every byte in order.
    answer = msgspec.json.encode({"created": 1, "data": [{"b64_json": base64.b64encode(os.urandom(3 * 1024 * 1024)).decode()}],
                                  "usage": {"total_tokens": 10, "input_tokens": 4, "output_tokens": 6}})

    async def upstream(request: web.Request) -> web.StreamResponse:
        return web.Response(body=answer, content_type="application/json")

    gateway = await gateway_kit.start({"upstream": {"base_url": await custom_upstream(upstream)}})
    request_body = msgspec.json.encode({"model": "gpt-image-1.5", "prompt": "a large answer, slowly read"})
    cache = gateway.gateway.plugins.hooks.pm.get_plugin("cache")
    for cache_status in ("miss", "hit"):
        head, body = await slow_raw_post(gateway.url, "/v1/images/generations", request_body)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert f"x-gatekeeper-cache: {cache_status}".encode() in head.lower()
        assert body == answer
        await asyncio.gather(*cache._tasks)  # the entry is stored once the audit has hashed the image


async def test_head_and_body_are_written_unjoined_on_uvloop_and_as_aiohttp_chooses_on_asyncio(gateway):
    if type(asyncio.get_running_loop()).__module__.startswith("uvloop"):
        assert http_writer.SKIP_WRITELINES is False
    else:  # asyncio's writelines is unsafe or no faster before 3.12.9 (CVE-2024-12254): aiohttp's call
        assert http_writer.SKIP_WRITELINES is (http_writer.IS_PY313_BEFORE_313_2 or http_writer.IS_PY_BEFORE_312_9)
