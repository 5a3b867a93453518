"""A sidecar gateway on a unix socket (`[server] unix_socket`): reachable with aiohttp and the openai
SDK over the socket, usable by the app container's group, and cleaned up on a graceful stop."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time

import aiohttp
import httpx2
import openai
import pytest

from gatekeeper.testing.kit import CLIENT_KEY

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
GENERATE = {"model": "gpt-image-1-mini", "prompt": "a fox on a socket", "quality": "low"}


@pytest.fixture
def socket_path(tmp_path):
    # A short path: unix socket paths are limited to about 100 bytes.
    directory = tmp_path / "run"
    directory.mkdir()
    return str(directory / "gk.sock")


def sdk_over_socket(path: str) -> openai.AsyncOpenAI:
    transport = httpx2.AsyncHTTPTransport(uds=path)
    return openai.AsyncOpenAI(base_url="http://gatekeeper/v1", api_key=CLIENT_KEY, max_retries=0,
                              http_client=openai.DefaultAsyncHttpxClient(transport=transport))


async def test_the_gateway_serves_on_the_configured_unix_socket(gateway_kit, socket_path):
    running = await gateway_kit.start({"server": {"unix_socket": socket_path}})
    assert running.url == f"unix:{socket_path}"
    assert stat.S_ISSOCK(os.stat(socket_path).st_mode)


async def test_aiohttp_reaches_health_and_the_api_over_the_socket(gateway_kit, fake_upstream, socket_path):
    await gateway_kit.start({"server": {"unix_socket": socket_path}})
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path)) as session:
        async with session.get("http://gatekeeper/health") as response:
            assert response.status == 200
        async with session.post("http://gatekeeper/v1/images/generations", json=GENERATE, headers=AUTH) as response:
            assert response.status == 200
            assert (await response.json())["data"][0]["b64_json"]
    assert fake_upstream.count("/v1/images/generations") == 1


async def test_the_openai_sdk_generates_over_the_socket(gateway_kit, fake_upstream, socket_path):
    await gateway_kit.start({"server": {"unix_socket": socket_path}})
    async with sdk_over_socket(socket_path) as client:
        result = await client.images.generate(**GENERATE)
    assert result.data[0].b64_json and result.usage.output_tokens == 272


async def test_the_openai_sdk_streams_over_the_socket(gateway_kit, fake_upstream, socket_path):
    await gateway_kit.start({"server": {"unix_socket": socket_path}})
    fake_upstream.stream_interval_s = 0.01
    async with sdk_over_socket(socket_path) as client:
        stream = await client.images.generate(**{**GENERATE, "model": "gpt-image-1.5"}, stream=True, partial_images=2)
        events = [event.type async for event in stream]
    assert events == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]


async def test_the_socket_is_open_to_its_group_and_closed_to_others(gateway_kit, socket_path):
    """The app container connects as a member of the pod's shared group (Kubernetes fsGroup)."""
    await gateway_kit.start({"server": {"unix_socket": socket_path}})
    assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o660


def health_over_socket(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(path)
        client.sendall(b"GET /health HTTP/1.1\r\nHost: gatekeeper\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    return answer.partition(b"\r\n")[0]


def start_sidecar(config, socket_path: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "gatekeeper", "serve", "--config", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, "gatekeeper serve exited early"
        try:
            if health_over_socket(socket_path) == b"HTTP/1.1 200 OK":
                return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError("the sidecar never answered on its socket")


@pytest.fixture
def sidecar_config(tmp_path, socket_path):
    config = tmp_path / "sidecar.toml"
    config.write_text(f'[server]\nunix_socket = "{socket_path}"\n[upstream]\nbase_url = "http://127.0.0.1:9/v1"\n'
                      f'api_key = "sk-sidecar-upstream"\n[plugins]\nbuiltins = ["forward"]\n')
    return config


def test_gatekeeper_serve_on_a_socket_exits_0_on_sigterm(sidecar_config, socket_path):
    process = start_sidecar(sidecar_config, socket_path)
    try:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_restarted_sidecar_takes_over_the_socket_a_killed_one_left(sidecar_config, socket_path):
    crashed = start_sidecar(sidecar_config, socket_path)
    crashed.kill()
    crashed.wait()
    assert os.path.exists(socket_path)  # a stale socket file, as after an OOM kill
    restarted = start_sidecar(sidecar_config, socket_path)
    try:
        assert health_over_socket(socket_path) == b"HTTP/1.1 200 OK"
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(timeout=15)
