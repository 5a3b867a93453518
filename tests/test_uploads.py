"""File uploads stream upstream as they arrive (`[server] upload_paths`, `max_upload_bytes`).

POST /v1/files and POST /v1/uploads/{id}/parts carry files of up to 512 MB that no stage reads:
the gateway forwards them chunk by chunk instead of holding them whole under `max_body_bytes`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket

import aiohttp
import msgspec
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from gatekeeper import hookimpl
from gatekeeper.config import ConfigError, parse_config
from gatekeeper.server import start_gateway
from gatekeeper.testing.kit import CLIENT_KEY, UPSTREAM_KEY
from gatekeeper.uploads import upload_path_pattern

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
FILE_ANSWER = {"id": "file-abc", "object": "file", "bytes": 0, "created_at": 1, "filename": "a.jsonl",
               "purpose": "batch", "status": "processed"}


class RecordingUpstream:
    """An upstream that reads the body as it arrives and remembers what it got."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.calls = 0
        self.broken = 0  # bodies that ended before their end
        self.received = 0
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.first_half_in = asyncio.Event()
        self.half = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        self.headers.append(dict(request.headers))
        parts = []
        try:
            async for chunk in request.content.iter_any():
                parts.append(chunk)
                self.received += len(chunk)
                if self.half and self.received >= self.half:
                    self.first_half_in.set()
        except ConnectionResetError:
            self.broken += 1
            return web.Response(status=400)  # nobody is left to read it
        body = b"".join(parts)
        self.bodies.append(body)
        answer = {**FILE_ANSWER, "bytes": len(body)} if self.status == 200 else {
            "error": {"message": "The server had an error.", "type": "server_error", "param": None, "code": None}}
        return web.json_response(answer, status=self.status, headers={"x-request-id": f"req_up_{self.calls}"})


@pytest.fixture
def gateway_for(gateway_kit, custom_upstream):
    """``await gateway_for(upstream, server_settings, **upstream_settings)``: a kit gateway whose
    one upstream is `upstream` (a RecordingUpstream)."""
    async def start(upstream: RecordingUpstream, server: dict | None = None, plugins=(), **settings):
        return await gateway_kit.start({"server": server or {},
                                        "upstream": {"base_url": await custom_upstream(upstream.handle), **settings}},
                                       plugins=list(plugins))
    return start


async def send(url: str, data, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as session:
        headers = {**AUTH, "Content-Type": "application/jsonl", **(headers or {})}
        async with session.post(url, data=data, headers=headers) as response:
            return response.status, response.headers.copy(), await response.read()


def error_of(body: bytes) -> dict:
    error = msgspec.json.decode(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


async def test_an_upload_larger_than_max_body_bytes_goes_upstream_whole_with_its_length(gateway_for):
    upstream = RecordingUpstream()
    gateway = await gateway_for(upstream, {"max_body_bytes": 1024})
    payload = os.urandom(300_000)
    status, headers, body = await send(gateway.base_url + "/files", payload)
    assert status == 200, body
    assert msgspec.json.decode(body)["bytes"] == len(payload)
    assert upstream.bodies == [payload]
    assert upstream.headers[0]["Content-Length"] == str(len(payload))  # not re-chunked
    assert upstream.headers[0]["Authorization"] != AUTH["Authorization"]  # the gateway's key went upstream
    assert headers["x-request-id"] == "req_up_1"
    # Any other route still reads its body first, bounded by max_body_bytes.
    status, _, body = await send(gateway.base_url + "/chat/completions", payload)
    assert status == 413 and error_of(body)["code"] == "request_too_large"


async def test_the_upstream_gets_the_first_bytes_before_the_client_has_sent_the_rest(gateway_for):
    upstream = RecordingUpstream()
    upstream.half = 200_000
    gateway = await gateway_for(upstream)
    first, rest = os.urandom(upstream.half), os.urandom(100_000)

    async def body():
        yield first
        # A gateway that buffered the body would send nothing upstream before this returns.
        await asyncio.wait_for(upstream.first_half_in.wait(), 5)
        yield rest

    status, _, answer = await send(gateway.base_url + "/files", body())
    assert status == 200, answer
    assert upstream.bodies == [first + rest]
    assert "Content-Length" not in upstream.headers[0]  # the client sent it chunked; so does the gateway


async def test_upload_parts_and_container_files_stream_and_other_upload_routes_do_not(gateway_for):
    upstream = RecordingUpstream()
    gateway = await gateway_for(upstream, {"max_body_bytes": 1024})
    part = os.urandom(10_000)
    status, _, _ = await send(gateway.base_url + "/uploads/upload_abc/parts", part)
    assert status == 200 and upstream.bodies == [part]
    status, _, _ = await send(gateway.base_url + "/containers/cntr_abc/files", part)
    assert status == 200 and upstream.bodies == [part, part]
    status, _, body = await send(gateway.base_url + "/uploads/upload_abc/complete", part)
    assert status == 413 and error_of(body)["code"] == "request_too_large"


async def test_an_upload_declared_over_max_upload_bytes_is_refused_before_it_is_read(gateway_for):
    upstream = RecordingUpstream()
    gateway = await gateway_for(upstream, {"max_upload_bytes": 50_000})
    status, headers, body = await send(gateway.base_url + "/files", os.urandom(60_000))
    assert status == 413 and headers["x-request-id"]
    error = error_of(body)
    assert error["code"] == "request_too_large" and "50000 bytes" in error["message"]
    assert upstream.calls == 0


async def test_a_chunked_upload_that_grows_past_max_upload_bytes_is_cut_with_413(gateway_for):
    upstream = RecordingUpstream()
    gateway = await gateway_for(upstream, {"max_upload_bytes": 50_000})

    async def body():
        for _ in range(8):
            yield os.urandom(10_000)

    status, headers, answer = await send(gateway.base_url + "/files", body())
    assert status == 413 and headers["x-request-id"]
    assert error_of(answer)["code"] == "request_too_large"
    assert upstream.bodies == []  # the upstream never got a complete body
    # The client's fault is not the upstream's: the next upload goes through at once.
    status, _, _ = await send(gateway.base_url + "/files", os.urandom(1_000))
    assert status == 200


async def test_a_client_that_stops_sending_gets_408(gateway_for):
    upstream = RecordingUpstream()
    gateway = await gateway_for(upstream, {"body_timeout_s": 0.3})

    async def body():
        yield b"x" * 1000
        await asyncio.sleep(2)
        yield b"y"

    status, _, answer = await send(gateway.base_url + "/files", body())
    assert status == 408 and error_of(answer)["code"] == "request_timeout"


async def test_an_upload_is_sent_once_and_an_upstream_error_is_relayed(gateway_for):
    upstream = RecordingUpstream(status=500)
    gateway = await gateway_for(upstream, max_retries=2, retry_backoff_s=0.01)
    payload = os.urandom(5_000)
    status, headers, body = await send(gateway.base_url + "/files", payload)
    assert status == 500 and error_of(body)["type"] == "server_error"
    assert upstream.calls == 1  # no copy of the body was kept to send again
    assert headers["x-request-id"] == "req_up_1"
    # A buffered request to the same upstream is retried as configured.
    await send(gateway.base_url + "/chat/completions", b"{}")
    assert upstream.calls == 1 + 3


def test_upload_paths_match_whole_paths_and_star_is_one_segment():
    pattern = upload_path_pattern(["/v1/files", "/v1/uploads/*/parts"])
    assert pattern is not None
    matched = [path for path in ("/v1/files", "/v1/files/file-1", "/v1/files2", "/v1/uploads/upload_1/parts",
                                 "/v1/uploads/a/b/parts", "/v1/uploads/upload_1/complete", "/v1/uploads//parts")
               if pattern.match(path)]
    assert matched == ["/v1/files", "/v1/uploads/upload_1/parts"]
    assert upload_path_pattern([]) is None


@pytest.mark.parametrize("path", ["files", "/files", "/v1/files/", "/v1//files"])
def test_upload_paths_must_be_paths_under_v1(path):
    with pytest.raises(ConfigError, match="upload_paths"):
        parse_config({"server": {"upload_paths": [path]}})


async def test_hashing_the_payload_shows_no_byte_changed(gateway_for):
    upstream = RecordingUpstream()
    gateway = await gateway_for(upstream)
    payload = os.urandom(3 * 1024 * 1024 + 17)
    status, _, _ = await send(gateway.base_url + "/files", payload)
    assert status == 200
    assert hashlib.sha256(upstream.bodies[0]).digest() == hashlib.sha256(payload).digest()


async def test_expect_100_continue_is_answered_for_an_upload_within_max_upload_bytes(gateway_for):
    # curl sends Expect: 100-continue with any upload over 1 MB; the upload limit decides, not max_body_bytes.
    upstream = RecordingUpstream()
    gateway = await gateway_for(upstream, {"max_body_bytes": 1024})
    payload = os.urandom(4096)
    host, port = gateway.url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write((f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
                  "Expect: 100-continue\r\nContent-Type: application/jsonl\r\n"
                  f"Content-Length: {len(payload)}\r\n\r\n").encode())
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(payload)
    status_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 200")
    assert upstream.bodies == [payload]


async def test_a_client_that_hangs_up_mid_upload_ends_as_an_abort_and_the_upstream_gets_no_whole_body(
        gateway_for, tmp_path):
    upstream = RecordingUpstream()
    upstream.half = 50_000
    gateway = await gateway_for(upstream)
    host, port = gateway.url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write((f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
                  f"Content-Type: application/jsonl\r\nContent-Length: 200000\r\n\r\n").encode() + os.urandom(60_000))
    await asyncio.wait_for(upstream.first_half_in.wait(), 5)
    writer.close()
    for _ in range(100):  # the flow ends once aiohttp has seen the connection go
        audit = tmp_path / "audit" / "gatekeeper-audit.jsonl"
        records = [msgspec.json.decode(line) for line in audit.read_bytes().splitlines()]
        if records:
            break
        await asyncio.sleep(0.05)
    assert [(r["path"], r["outcome"]) for r in records] == [("/v1/files", "client_abort")]
    assert upstream.bodies == [] and upstream.broken == 1


async def test_an_upload_fails_over_when_the_first_upstream_refuses_the_connection(gateway_kit, custom_upstream):
    # Nothing of the body was read for the refused attempt, so the next upstream gets all of it.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    upstream = RecordingUpstream()
    raw = gateway_kit.config_dict()
    raw.pop("upstream")
    raw["upstreams"] = {"dead": {"base_url": dead, "api_key": UPSTREAM_KEY, "priority": 1, "max_retries": 1},
                        "alive": {"base_url": await custom_upstream(upstream.handle), "api_key": UPSTREAM_KEY}}
    gateway = await start_gateway(parse_config(raw, path=str(gateway_kit.workdir / "test.toml")))
    gateway_kit.running.append(gateway)
    payload = os.urandom(100_000)
    status, _, body = await send(gateway.base_url + "/files", payload)
    assert status == 200, body
    assert upstream.bodies == [payload]


# ------------------------------------------------------------------ through the official SDK


async def test_the_sdk_uploads_a_file_over_max_body_bytes_and_reads_it_back(gateway_kit, fake_upstream):
    import openai

    gateway = await gateway_kit.start({"server": {"max_body_bytes": 65536}})
    line = b'{"custom_id":"r%d","method":"POST","url":"/v1/embeddings","body":{}}\n'
    data = b"".join(line % i for i in range(20_000))
    assert len(data) > 65536 * 10
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        created = await client.files.create(file=("batch.jsonl", data), purpose="batch")
        assert (created.bytes, created.filename, created.purpose) == (len(data), "batch.jsonl", "batch")
        assert fake_upstream.upload_bytes_received > len(data)  # the multipart body, file and all
        assert (await client.files.retrieve(created.id)).id == created.id
        assert (await client.files.content(created.id)).read() == data
        assert (await client.files.delete(created.id)).deleted is True
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(created.id)


async def test_the_sdk_uploads_a_file_in_parts_through_the_gateway(gateway_kit, fake_upstream):
    import openai

    gateway = await gateway_kit.start({"server": {"max_body_bytes": 65536}})
    data = os.urandom(300_000)
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        upload = await client.uploads.upload_file_chunked(
            file=data, filename="training.jsonl", bytes=len(data), mime_type="text/jsonl", purpose="fine-tune",
            part_size=100_000)
        assert upload.status == "completed" and upload.file is not None
        assert (await client.files.content(upload.file.id)).read() == data
    parts = [call for call in fake_upstream.calls if call.path.endswith("/parts")]
    assert len(parts) == 3


async def test_a_gzip_upload_goes_upstream_decoded_and_a_broken_one_is_a_400(gateway_for, caplog):
    import gzip

    upstream = RecordingUpstream()
    gateway = await gateway_for(upstream)
    payload = os.urandom(50_000)
    status, _, _ = await send(gateway.base_url + "/files", gzip.compress(payload), {"Content-Encoding": "gzip"})
    assert status == 200 and upstream.bodies == [payload]
    assert "Content-Encoding" not in upstream.headers[0]
    assert upstream.headers[0].get("Content-Length") != str(len(gzip.compress(payload)))  # not the compressed length
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        status, headers, body = await send(gateway.base_url + "/files", b"\x1f\x8b not gzip at all" * 100,
                                           {"Content-Encoding": "gzip"})
        await asyncio.sleep(0.05)
    assert status == 400 and headers["x-request-id"]
    assert error_of(body)["code"] == "invalid_request_body"
    # The client's broken body is neither a gateway error nor the upstream's failure.
    assert [entry for entry in logs if entry["log_level"] in ("warning", "error")] == []
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []


class BodyReader:
    """A plugin that wrongly reads the request body of every flow in check_request."""

    name = "body-reader"

    @hookimpl
    async def check_request(self, flow) -> None:
        await flow.request.read()


async def test_an_upload_whose_body_a_plugin_took_fails_instead_of_going_upstream_empty(gateway_for):
    upstream = RecordingUpstream()
    gateway = await gateway_for(upstream, plugins=[BodyReader()])
    # Without the check, the upstream would wait for a body that never comes.
    status, headers, body = await asyncio.wait_for(send(gateway.base_url + "/files", os.urandom(50_000)), 10)
    assert status == 500 and error_of(body)["code"] == "gateway_error" and headers["x-request-id"]
    assert upstream.bodies == []  # never a short or empty upload


async def test_expect_100_continue_gets_the_413_and_no_continue_for_an_upload_over_max_upload_bytes(gateway_for):
    upstream = RecordingUpstream()
    gateway = await gateway_for(upstream, {"max_upload_bytes": 10_000})
    host, port = gateway.url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write((f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
                  "Expect: 100-continue\r\nContent-Type: application/jsonl\r\nContent-Length: 20000\r\n\r\n").encode())
    status_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 413")  # not 100 Continue: the client need not send the body
    assert upstream.calls == 0
