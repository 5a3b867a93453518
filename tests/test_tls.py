"""HTTPS from the gateway itself: ``[server] tls_cert_file`` / ``tls_key_file``, reloaded on SIGHUP."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from certificates import self_signed
from gateway_processes import free_port, serve_config
from gatekeeper.config import ConfigError, parse_config
from gatekeeper.server import start_gateway
from gatekeeper.testing.kit import CLIENT_KEY

HEALTHCHECK = Path(__file__).resolve().parents[1] / "deploy" / "healthcheck.py"


def served_certificate(port: int) -> bytes:
    """The DER certificate a new TLS connection to 127.0.0.1:port is given."""
    unchecked = ssl.create_default_context()
    unchecked.check_hostname, unchecked.verify_mode = False, ssl.CERT_NONE
    with unchecked.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5)) as tls:
        return tls.getpeercert(binary_form=True)


def der(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


async def test_the_sdk_talks_to_the_gateway_over_https_with_only_base_url_changed(gateway_kit, tmp_path):
    cert, key = self_signed(tmp_path, "gatekeeper")
    gateway = await gateway_kit.start({"server": {"tls_cert_file": str(cert), "tls_key_file": str(key)}})
    assert gateway.url.startswith("https://127.0.0.1:")
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0,
                                  http_client=openai.DefaultAsyncHttpxClient(verify=ssl.create_default_context(
                                      cafile=str(cert)))) as client:
        result = await client.images.generate(model="gpt-image-1.5", prompt="a fox over TLS")
    assert result.data[0].b64_json and result.usage.output_tokens > 0


async def test_plain_http_to_the_https_port_gets_no_answer(gateway_kit, tmp_path):
    cert, key = self_signed(tmp_path, "gatekeeper")
    gateway = await gateway_kit.start({"server": {"tls_cert_file": str(cert), "tls_key_file": str(key)}})
    plain = gateway.base_url.replace("https://", "http://")
    async with openai.AsyncOpenAI(base_url=plain, api_key=CLIENT_KEY, max_retries=0) as client:
        with pytest.raises(openai.APIConnectionError):
            await client.models.list()


@pytest.mark.parametrize(("server", "message"), [
    ({"tls_cert_file": "cert.pem"}, "tls_cert_file and tls_key_file go together"),
    ({"tls_cert_file": "c.pem", "tls_key_file": "k.pem", "unix_socket": "/tmp/gk.sock"}, "tls_cert_file is for TCP"),
])
def test_half_a_tls_setting_is_a_config_error(server, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"server": server})


async def test_a_certificate_that_will_not_load_stops_the_start_naming_the_file(tmp_path):
    cert, _ = self_signed(tmp_path, "one")
    _, other_key = self_signed(tmp_path, "two")
    config = parse_config({"server": {"port": 0, "tls_cert_file": str(cert), "tls_key_file": str(other_key)}})
    with pytest.raises(ConfigError, match=f"cannot load {cert}"):
        await start_gateway(config)


async def test_sighup_serves_a_rotated_certificate_to_new_connections_and_the_healthcheck_speaks_https(tmp_path):
    first, first_key = self_signed(tmp_path, "first")
    second, second_key = self_signed(tmp_path, "second")
    live, live_key = tmp_path / "live.pem", tmp_path / "live-key.pem"
    live.write_bytes(first.read_bytes())
    live_key.write_bytes(first_key.read_bytes())
    port = free_port()
    config = tmp_path / "gatekeeper.toml"
    config.write_text(serve_config("http://127.0.0.1:9/v1", port, server='tls_cert_file = "live.pem"\n'
                                   'tls_key_file = "live-key.pem"', sections=f'''
[auth]
keys = [{{ id = "app", key = "{CLIENT_KEY}", tenant = "t" }}]

[plugins]
blocked = ["metering", "audit"]
'''))
    log = (tmp_path / "gatekeeper.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "gatekeeper", "serve", "--config", str(config)],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        health = [sys.executable, str(HEALTHCHECK), "--tls", "--port", str(port)]
        deadline = time.monotonic() + 30
        while subprocess.run(health, capture_output=True).returncode != 0:
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "gatekeeper.log").read_text()
            await asyncio.sleep(0.1)
        assert served_certificate(port) == der(first)
        live.write_bytes(second.read_bytes())
        live_key.write_bytes(second_key.read_bytes())
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while served_certificate(port) != der(second):
            assert time.monotonic() < deadline, (tmp_path / "gatekeeper.log").read_text()
            await asyncio.sleep(0.1)
        # A bad pair on disk: the reload is refused, and the certificate served stays the good one.
        live_key.write_bytes(first_key.read_bytes())
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while b"reload refused" not in (tmp_path / "gatekeeper.log").read_bytes():
            assert time.monotonic() < deadline, (tmp_path / "gatekeeper.log").read_text()
            await asyncio.sleep(0.1)
        assert served_certificate(port) == der(second)
        assert subprocess.run(health, capture_output=True).returncode == 0
        assert subprocess.run([*health[:2], "--port", str(port)], capture_output=True).returncode == 1  # plain HTTP
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        log.close()
