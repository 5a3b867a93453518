"""The canary guard really fails tests: leaks in headers, bodies, streams and captured output are caught."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import aiohttp
from aiohttp import web

from gatekeeper.testing.kit import CANARY_SIGHTINGS, CLIENT_KEY, UPSTREAM_KEY, CanaryGuard

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


async def get(url: str) -> bytes:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers=AUTH) as response:
            return await response.read()


def take_sightings() -> list[str]:
    """Return what the guard saw and clear it, so that this (deliberately leaky) test passes."""
    seen = list(CANARY_SIGHTINGS)
    CANARY_SIGHTINGS.clear()
    return seen


async def test_guard_flags_the_upstream_authorization_echoed_in_a_response_header(gateway_kit, custom_upstream):
    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []},
                                 headers={"x-echo-authorization": request.headers["Authorization"]})

    gateway = await gateway_kit.start({"upstream": {"base_url": await custom_upstream(echo)}})
    await get(gateway.base_url + "/models")
    assert take_sightings() == ["GET /v1/models: response headers"]


async def test_guard_flags_the_key_in_a_small_response_body(gateway_kit, custom_upstream):
    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": f"bad key {request.headers['Authorization']}"}}, status=401)

    gateway = await gateway_kit.start({"upstream": {"base_url": await custom_upstream(echo)}})
    body = await get(gateway.base_url + "/models")
    assert UPSTREAM_KEY.encode() in body  # the leak really reached the client
    assert "GET /v1/models: response body" in take_sightings()


async def test_guard_flags_the_key_split_across_streamed_chunks(gateway_kit, custom_upstream):
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        secret = request.headers["Authorization"].encode()
        await response.write(b"data: " + secret[:15])
        await response.write(secret[15:] + b"\n\n")
        await response.write_eof()
        return response

    gateway = await gateway_kit.start({"upstream": {"base_url": await custom_upstream(stream)}})
    await get(gateway.base_url + "/models")
    assert take_sightings() == ["GET /v1/models: streamed response body"]


async def test_guard_finds_the_key_across_a_chunk_boundary_and_passes_chunks_unchanged():
    canary = UPSTREAM_KEY.encode()
    sent = [b"data: " + canary[:10], canary[10:-1], canary[-1:] + b"\n\n"]

    async def chunks():
        for chunk in sent:
            yield chunk

    flow = SimpleNamespace(method="POST", path="/v1/responses")
    received = [chunk async for chunk in CanaryGuard().scan(flow, chunks())]
    assert received == sent
    assert take_sightings() == ["POST /v1/responses: streamed response body"]


async def test_guard_stays_quiet_for_clean_traffic(gateway):
    await get(gateway.base_url + "/models")
    assert CANARY_SIGHTINGS == []


LEAKY_TESTS = '''
import sys
import aiohttp
from gatekeeper.testing.kit import CLIENT_KEY, UPSTREAM_KEY


def test_prints_the_key_to_stdout():
    print("debug:", UPSTREAM_KEY)


def test_writes_the_key_to_stderr():
    sys.stderr.write(UPSTREAM_KEY + "\\n")


async def test_lets_the_gateway_leak_the_key(gateway_kit, custom_upstream):
    from aiohttp import web

    async def echo(request):
        return web.json_response({}, headers={"x-echo": request.headers["Authorization"]})

    gateway = await gateway_kit.start({"upstream": {"base_url": await custom_upstream(echo)}})
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.base_url + "/models", headers={"Authorization": "Bearer " + CLIENT_KEY}) as r:
            await r.read()


async def test_clean(gateway_kit):
    gateway = await gateway_kit.start()
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.base_url + "/models", headers={"Authorization": "Bearer " + CLIENT_KEY}) as r:
            assert r.status == 200
'''


def test_the_conftest_guards_fail_leaky_tests_and_pass_clean_ones(tmp_path):
    shutil.copy(Path(__file__).parents[1] / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_leaky.py").write_text(LEAKY_TESTS)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-c", "/dev/null",
         "--rootdir", str(tmp_path), "-o", "asyncio_mode=auto", str(tmp_path / "test_leaky.py")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    report = result.stdout
    assert result.returncode == 1, report + result.stderr
    assert "FAILED test_leaky.py::test_prints_the_key_to_stdout" in report
    assert "FAILED test_leaky.py::test_writes_the_key_to_stderr" in report
    assert "ERROR test_leaky.py::test_lets_the_gateway_leak_the_key" in report
    assert "the upstream key reached a client: GET /v1/models: response headers" in report
    # The gateway leak is an error at teardown; its call phase and test_clean pass.
    assert "2 failed, 2 passed, 1 error" in report
