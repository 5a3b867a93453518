"""Bad input at every layer gets an OpenAI-shaped answer with an x-request-id, never a traceback,
and never reaches the upstream: bodies that are not JSON, heads aiohttp cannot parse, bodies whose
framing or compression is broken, and `Expect` headers. Found by throwing mutated requests at a
running gateway; each case here is one it answered wrongly."""

from __future__ import annotations

import asyncio
import gzip
import logging

import aiohttp
import msgspec
import pytest
from aiohttp import web
from multidict import CIMultiDict
from structlog.testing import capture_logs

from gatekeeper import hookimpl
from gatekeeper.testing.kit import ADMIN_KEY, CLIENT_KEY, UPSTREAM_KEY

AUTH = f"Authorization: Bearer {CLIENT_KEY}\r\n"
IMAGE_REQUEST = b'{"model":"gpt-image-1","prompt":"a fox in the snow","quality":"low"}'


def assert_openai_error(status: int, headers, body: bytes, expected_status: int, code: str | None) -> dict:
    assert status == expected_status
    error = msgspec.json.decode(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code
    assert headers["x-request-id"].startswith("req_gk_")
    return error


async def exchange(url: str, head: str) -> tuple[int, dict[str, str], bytes]:
    """Send `head` exactly as given; the answer, read by its Content-Length (the connection may
    stay open: the server can wait for a body it will not read)."""
    host, port = url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head.encode("latin-1"))
    try:
        return await asyncio.wait_for(read_answer(reader), 5)
    finally:
        writer.close()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split(" ")[1]), headers, body


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=body, headers={"Authorization": f"Bearer {CLIENT_KEY}", **headers}) as response:
            return response.status, response.headers.copy(), await response.read()


# ------------------------------------------------------------------ bodies that are not JSON


@pytest.mark.parametrize("body", [
    b'{"model":"gpt-image-1","prompt":"\xed\xa0\x80"}',  # a surrogate encoded as if it were UTF-8
    b'{"model":"gpt-image-1","prompt":"caf\xe9"}',  # Latin-1, not UTF-8
    b'{"model":"gpt-image-1","prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # past the recursion limit
], ids=["surrogate", "latin-1", "nested-100k"])
async def test_a_json_body_that_is_not_utf8_or_nests_too_deep_is_a_400_like_any_bad_json(gateway, fake_upstream, body):
    with capture_logs() as logs:
        status, headers, answer = await post(gateway.base_url + "/images/generations", body,
                                             {"Content-Type": "application/json"})
    error = assert_openai_error(status, headers, answer, 400, None)
    assert "could not parse the JSON body" in error["message"]
    assert fake_upstream.count() == 0
    assert [entry for entry in logs if entry["log_level"] == "error"] == []  # no "pipeline error", no hook failing


async def test_a_chat_body_that_is_not_utf8_is_left_to_the_upstream_to_refuse_as_openai_would(gateway, fake_upstream):
    """The gateway reads chat bodies only to meter them: the upstream's own 400 is what the app gets."""
    with capture_logs() as logs:
        status, headers, answer = await post(gateway.base_url + "/chat/completions",
                                             b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"\xff"}]}',
                                             {"Content-Type": "application/json"})
    assert status == 400 and "could not parse the JSON body" in msgspec.json.decode(answer)["error"]["message"]
    assert fake_upstream.count() == 1
    assert headers["x-request-id"].startswith("req_") and not headers["x-request-id"].startswith("req_gk_")
    assert [entry for entry in logs if entry["log_level"] == "error"] == []


# ------------------------------------------------------------------ heads aiohttp cannot parse


@pytest.mark.parametrize("head", [
    f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n{AUTH}X-Long: {'a' * 20_000}\r\nContent-Length: 2\r\n\r\n{{}}",
    f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n{AUTH}Bad Name: x\r\nContent-Length: 2\r\n\r\n{{}}",
    f"GE(T /v1/models HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n",
    f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n{AUTH}Transfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n",
], ids=["header-line-too-long", "space-in-header-name", "bad-method", "bad-chunk-size"])
async def test_a_request_aiohttp_cannot_parse_gets_an_openai_shaped_400_that_quotes_none_of_it(
        gateway, fake_upstream, head):
    with capture_logs() as logs:
        status, headers, body = await exchange(gateway.url, head)
    error = assert_openai_error(status, headers, body, 400, "invalid_http_request")
    assert error["message"].startswith("The gateway could not parse this HTTP request")
    assert b"aaaa" not in body and CLIENT_KEY.encode() not in body
    assert fake_upstream.count() == 0
    refusals = [entry for entry in logs if entry["event"] == "refused a malformed HTTP request"]
    assert [entry["request_id"] for entry in refusals] == [headers["x-request-id"]]


async def test_the_header_limit_is_named_in_the_answer(gateway):
    head = f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{AUTH}X-Long: {'a' * 20_000}\r\n\r\n"
    _, _, body = await exchange(gateway.url, head)
    assert "longer than 16384 bytes" in msgspec.json.decode(body)["error"]["message"]


# ------------------------------------------------------------------ compressed bodies


async def test_a_gzipped_body_reaches_the_upstream_decoded_and_without_its_content_encoding(gateway, fake_upstream):
    status, headers, _ = await post(gateway.base_url + "/images/generations", gzip.compress(IMAGE_REQUEST),
                                    {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert (status, headers["x-gatekeeper-cache"]) == (200, "MISS")
    sent = fake_upstream.calls[-1]
    assert sent.body == IMAGE_REQUEST and "Content-Encoding" not in sent.headers
    # Decoded, it is the same request as the plain one: one cache entry for both.
    status, headers, _ = await post(gateway.base_url + "/images/generations", IMAGE_REQUEST,
                                    {"Content-Type": "application/json"})
    assert (status, headers["x-gatekeeper-cache"]) == (200, "HIT")


async def test_a_body_that_will_not_decompress_is_a_400_with_no_traceback_logged(gateway, fake_upstream, caplog):
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    with capture_logs() as logs:
        status, headers, body = await post(gateway.base_url + "/images/generations", IMAGE_REQUEST,
                                           {"Content-Type": "application/json", "Content-Encoding": "gzip"})
        await asyncio.sleep(0.05)  # aiohttp drains the rest of the body after the answer
    assert_openai_error(status, headers, body, 400, "invalid_request_body")
    assert fake_upstream.count() == 0
    assert [entry for entry in logs if entry["log_level"] == "error"] == []
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []


# ------------------------------------------------------------------ Expect


async def test_expect_100_continue_gets_continue_for_a_body_the_gateway_will_read(gateway, fake_upstream):
    head = (f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n{AUTH}Expect: 100-continue\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(IMAGE_REQUEST)}\r\n\r\n")
    host, port = gateway.url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head.encode())
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(IMAGE_REQUEST)
    status, _, _ = await asyncio.wait_for(read_answer(reader), 5)
    writer.close()
    assert status == 200
    assert "Expect" not in fake_upstream.calls[-1].headers  # answered by the gateway, not passed on


async def test_expect_100_continue_gets_the_refusal_and_no_continue_for_a_body_over_the_limit(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start({"server": {"max_body_bytes": 1024}})
    head = (f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n{AUTH}Expect: 100-continue\r\n"
            f"Content-Type: application/json\r\nContent-Length: 4096\r\n\r\n")
    status, headers, body = await exchange(gateway.url, head)
    assert_openai_error(status, headers, body, 413, "request_too_large")
    assert fake_upstream.count() == 0


async def test_an_expectation_other_than_100_continue_is_ignored_as_nginx_ignores_it(gateway, fake_upstream):
    status, _, _ = await post(gateway.base_url + "/images/generations", IMAGE_REQUEST,
                              {"Content-Type": "application/json", "Expect": "no-store"})
    assert status == 200
    assert "Expect" not in fake_upstream.calls[-1].headers


# ------------------------------------------------------------------ a handler that raises


class RaisingRoute:
    name = "raising-route"

    @hookimpl
    def register_routes(self) -> list[web.RouteDef]:
        async def broken(request: web.Request) -> web.Response:
            raise RuntimeError("a bug in a plugin's admin route")

        return [web.get("/admin/broken", broken)]


async def test_a_route_that_raises_gets_an_openai_shaped_500_and_its_traceback_only_in_the_log(gateway_kit):
    gateway = await gateway_kit.start(plugins=[RaisingRoute()])
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            async with session.get(gateway.url + "/admin/broken",
                                   headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as response:
                status, headers, body = response.status, response.headers.copy(), await response.read()
    assert_openai_error(status, headers, body, 500, "gateway_error")
    assert b"RuntimeError" not in body and b"Traceback" not in body
    (failure,) = [entry for entry in logs if entry["event"] == "request handler failed"]
    assert failure["request_id"] == headers["x-request-id"]
    assert isinstance(failure["exc_info"], RuntimeError)


# ------------------------------------------------------------------ answers that are not JSON


@pytest.mark.parametrize("answer", [
    b'{"created":1,"data":[{"b64_json":"\xff\xfe"}],"usage":{"total_tokens":1,"input_tokens":1,"output_tokens":0}}',
    b'{"created":1,"data":[{"b64_json":"aGk="}],"usage":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
], ids=["not-utf8", "nested-100k"])
async def test_an_upstream_answer_that_is_not_utf8_or_nests_too_deep_is_relayed_as_it_came(
        gateway_kit, custom_upstream, answer):
    async def upstream(request: web.Request) -> web.Response:
        return web.Response(body=answer, content_type="application/json")

    gateway = await gateway_kit.start({"upstream": {"base_url": await custom_upstream(upstream)}})
    with capture_logs() as logs:
        status, _, body = await post(gateway.base_url + "/images/generations", IMAGE_REQUEST,
                                     {"Content-Type": "application/json"})
        await asyncio.sleep(0.05)  # metering, audit and the cache finish after the answer
    assert (status, body) == (200, answer)
    assert [entry for entry in logs if entry["log_level"] == "error"] == []  # no stage failed on it


async def test_a_websocket_upgrade_is_refused_plainly_and_never_forwarded(gateway, fake_upstream):
    head = (f"GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: x\r\n{AUTH}Connection: Upgrade\r\n"
            "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    status, headers, body = await exchange(gateway.url, head)
    error = assert_openai_error(status, headers, body, 501, "websocket_unsupported")
    assert "Realtime API" in error["message"]
    assert fake_upstream.count() == 0


async def test_a_realtime_client_secret_is_minted_through_the_gateway_and_audited(
        gateway_kit, custom_upstream, tmp_path):
    # The way to the Realtime API from behind the gateway: the REST call that mints a short-lived
    # secret goes through it (the gateway's key upstream, the tenant in the audit); the app then
    # opens its session with OpenAI directly.
    async def upstream(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
        return web.json_response({"value": "ek_test_123", "expires_at": 1795806847,
                                  "session": {"type": "realtime", "model": "gpt-realtime"}})

    gateway = await gateway_kit.start({"upstream": {"base_url": await custom_upstream(upstream)}})
    status, _, body = await post(gateway.base_url + "/realtime/client_secrets",
                                 b'{"session":{"type":"realtime","model":"gpt-realtime"}}',
                                 {"Content-Type": "application/json"})
    assert status == 200 and msgspec.json.decode(body)["value"] == "ek_test_123"
    audit = (tmp_path / "audit" / "gatekeeper-audit.jsonl").read_bytes()
    records = [msgspec.json.decode(line) for line in audit.splitlines()]
    assert [(r["path"], r["tenant"], r["status"]) for r in records] == [("/v1/realtime/client_secrets", "test", 200)]
