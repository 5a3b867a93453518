"""An egress proxy between the gateway and its upstream: ``[upstream] proxy``, or the standard
HTTPS_PROXY / HTTP_PROXY / NO_PROXY variables, read as the OpenAI SDK reads them."""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import subprocess
import sys

import openai
import pytest
from aiohttp import web
from certificates import self_signed
from gateway_processes import GatewayProcess, free_port, serve_config
from structlog.testing import capture_logs
from yarl import URL

from gatekeeper.config import ConfigError, UpstreamConfig, parse_config
from gatekeeper.demo import DEMO_CLIENT_KEY, demo_config
from gatekeeper.server import start_gateway
from gatekeeper.testing.kit import CLIENT_KEY, UPSTREAM_KEY
from gatekeeper_plugins.forward_routing import egress_proxy

GENERATIONS = "/v1/images/generations"
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy", "ALL_PROXY",
                   "all_proxy", "REQUEST_METHOD")


class ForwardProxy:
    """A plain HTTP forward proxy on loopback, one request (or CONNECT tunnel) per connection, that
    keeps the head of every request it relays: the request line's target and the headers."""

    def __init__(self, credentials: str | None = None) -> None:
        self.credentials = credentials  # "user:password" it requires, or None
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # method, target, headers (lower-case names)
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, target, _ = head[0].split(" ")
            fields = [line.partition(":") for line in head[1:] if line]
            headers = {name.strip().lower(): value.strip() for name, _, value in fields}
            self.requests.append((method, target, headers))
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if self.credentials is not None and headers.get("proxy-authorization") != (
                    "Basic " + base64.b64encode(self.credentials.encode()).decode()):
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n"
                             b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                return
            if method == "CONNECT":  # an https:// upstream: a tunnel the TLS goes through, end to end
                host, _, port = target.rpartition(":")
                upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
                return
            url = URL(target)  # absolute-form: the proxy learns the upstream from the request line
            upstream_reader, upstream_writer = await asyncio.open_connection(url.host, url.port)
            kept = [f"{name}:{value}\r\n" for name, _, value in fields
                    if name.strip().lower() not in ("proxy-authorization", "connection", "proxy-connection")]
            request_head = f"{method} {url.raw_path_qs} HTTP/1.1\r\n{''.join(kept)}Connection: close\r\n\r\n"
            upstream_writer.write(request_head.encode("latin-1") + body)
            writer.write(await upstream_reader.read())  # the whole answer: the upstream closes after it
            upstream_writer.close()
        finally:
            await writer.drain()
            writer.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except ConnectionError:
        pass
    finally:
        sink.close()


@pytest.fixture
def proxy_environment(monkeypatch):
    """No proxy variable from the machine running the tests; each test sets its own."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
async def forward_proxy():
    proxies: list[ForwardProxy] = []

    async def start(credentials: str | None = None) -> tuple[ForwardProxy, str]:
        proxy = ForwardProxy(credentials)
        proxies.append(proxy)
        return proxy, await proxy.start()

    yield start
    for proxy in proxies:
        await proxy.stop()


def sdk(gateway) -> openai.AsyncOpenAI:
    # The SDK reads the proxy variables too: this app talks to the gateway directly.
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0,
                              http_client=openai.DefaultAsyncHttpxClient(trust_env=False))


async def test_an_upstream_with_a_proxy_is_reached_through_it_with_the_proxys_credentials(
        gateway_kit, fake_upstream, forward_proxy, proxy_environment):
    proxy, address = await forward_proxy(credentials="egress:pr0xy-s3cret")
    with capture_logs() as logs:
        gateway = await gateway_kit.start({"upstream": {"proxy": f"http://egress:pr0xy-s3cret@{address}"}})
        async with sdk(gateway) as client:
            result = await client.images.generate(model="gpt-image-1.5", prompt="a fox behind a proxy")
    assert result.data[0].b64_json and result.usage.output_tokens > 0
    [(method, target, headers)] = proxy.requests
    assert (method, target) == ("POST", fake_upstream.base_url + "/images/generations")
    assert headers["proxy-authorization"] == "Basic " + base64.b64encode(b"egress:pr0xy-s3cret").decode()
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"  # the upstream's key, sent on through the proxy
    assert fake_upstream.count(GENERATIONS) == 1
    assert "pr0xy-s3cret" not in fake_upstream.calls[-1].headers.get("authorization", "")
    described = " ".join(gateway.gateway.plugins.describe())
    assert f"via proxy http://{address}" in described and "pr0xy-s3cret" not in described
    assert "pr0xy-s3cret" not in repr(logs)


async def test_the_proxy_variables_of_the_environment_apply_when_no_proxy_is_configured(
        gateway_kit, fake_upstream, forward_proxy, proxy_environment):
    proxy, address = await forward_proxy()
    proxy_environment.setenv("HTTP_PROXY", f"http://{address}")  # the fake upstream is http://
    gateway = await gateway_kit.start()
    async with sdk(gateway) as client:
        await client.images.generate(model="gpt-image-1.5", prompt="a fox behind the environment's proxy")
    assert [(method, target) for method, target, _ in proxy.requests] == [
        ("POST", fake_upstream.base_url + "/images/generations")]
    assert "proxy-authorization" not in proxy.requests[0][2]


async def test_no_proxy_naming_the_upstreams_host_sends_it_direct(
        gateway_kit, fake_upstream, forward_proxy, proxy_environment):
    proxy, address = await forward_proxy()
    proxy_environment.setenv("HTTP_PROXY", f"http://{address}")
    proxy_environment.setenv("NO_PROXY", "localhost,127.0.0.1")
    gateway = await gateway_kit.start()
    async with sdk(gateway) as client:
        await client.images.generate(model="gpt-image-1.5", prompt="a fox that goes direct")
    assert proxy.requests == [] and fake_upstream.count(GENERATIONS) == 1


async def test_an_empty_proxy_goes_direct_whatever_the_environment_says(
        gateway_kit, fake_upstream, forward_proxy, proxy_environment):
    proxy, address = await forward_proxy()
    proxy_environment.setenv("HTTP_PROXY", f"http://{address}")
    gateway = await gateway_kit.start({"upstream": {"proxy": ""}})
    async with sdk(gateway) as client:
        await client.images.generate(model="gpt-image-1.5", prompt="a fox that ignores the environment")
    assert proxy.requests == [] and fake_upstream.count(GENERATIONS) == 1


async def test_the_demo_reaches_its_loopback_upstream_on_a_machine_with_a_proxy(
        fake_upstream, proxy_environment, tmp_path):
    proxy_environment.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    config = parse_config(demo_config(fake_upstream.base_url, UPSTREAM_KEY, "127.0.0.1", free_port(), tmp_path))
    gateway = await start_gateway(config)
    try:
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DEMO_CLIENT_KEY, max_retries=0,
                                    http_client=openai.DefaultAsyncHttpxClient(trust_env=False))
        async with client:
            result = await client.images.generate(model="gpt-image-1.5", prompt="a demo fox")
    finally:
        await gateway.stop()
    assert result.data and fake_upstream.count(GENERATIONS) == 1


async def test_a_configured_proxy_wins_over_no_proxy(gateway_kit, fake_upstream, forward_proxy, proxy_environment):
    proxy, address = await forward_proxy()
    proxy_environment.setenv("NO_PROXY", "127.0.0.1")
    gateway = await gateway_kit.start({"upstream": {"proxy": f"http://{address}"}})
    async with sdk(gateway) as client:
        await client.images.generate(model="gpt-image-1.5", prompt="a fox sent the configured way")
    assert len(proxy.requests) == 1


async def test_a_proxy_that_refuses_the_gateway_is_a_502_in_openais_shape(
        gateway_kit, fake_upstream, forward_proxy, proxy_environment):
    proxy, address = await forward_proxy(credentials="egress:right")
    gateway = await gateway_kit.start({"upstream": {"proxy": f"http://egress:wrong@{address}", "max_retries": 1,
                                                    "retry_backoff_s": 0.01}})
    async with sdk(gateway) as client:
        with pytest.raises(openai.APIStatusError) as raised:
            await client.images.generate(model="gpt-image-1.5", prompt="a fox the proxy turns away")
    # The proxy's own 407 is not the upstream's answer: relayed as it is, the app would take it for OpenAI's.
    assert raised.value.status_code == 502 and raised.value.body["code"] == "upstream_proxy_error"
    assert "wrong" not in str(raised.value.body)
    assert len(proxy.requests) == 2  # nothing reached the upstream, so it was safe to try again
    assert fake_upstream.count(GENERATIONS) == 0


@pytest.mark.parametrize("proxy", ["socks5://127.0.0.1:1080", "https://proxy.example:3128", "proxy.example:3128"])
def test_a_proxy_that_is_not_an_http_url_is_a_config_error(proxy):
    with pytest.raises(ConfigError, match=r"\[upstream\] proxy must be an http://host:port URL"):
        parse_config({"upstream": {"base_url": "https://api.openai.com/v1", "proxy": proxy}})


def test_https_proxy_serves_https_upstreams_and_http_proxy_http_ones(proxy_environment):
    proxy_environment.setenv("HTTPS_PROXY", "http://egress:s3cret@proxy.corp.example:3128")
    proxy_environment.setenv("HTTP_PROXY", "http://plain.corp.example:8080")
    credentials = "Basic " + base64.b64encode(b"egress:s3cret").decode()
    assert egress_proxy(UpstreamConfig(base_url="https://api.openai.com/v1")) == (
        URL("http://proxy.corp.example:3128"), {"Proxy-Authorization": credentials})
    assert egress_proxy(UpstreamConfig(base_url="http://relay.internal/v1")) == (
        URL("http://plain.corp.example:8080"), None)
    proxy_environment.setenv("NO_PROXY", ".internal")
    assert egress_proxy(UpstreamConfig(base_url="http://relay.internal/v1")) == (None, None)


def test_an_https_proxy_in_the_environment_is_a_config_error_at_start_up_not_bypassed(proxy_environment, tmp_path):
    config = tmp_path / "gatekeeper.toml"
    config.write_text(serve_config("https://api.openai.com/v1", free_port()))
    checked = subprocess.run([sys.executable, "-m", "gatekeeper", "check-config", "--config", str(config)],
                             capture_output=True, text=True,
                             env={**os.environ, "HTTPS_PROXY": "https://egress:s3cret@proxy.corp.example:3128"})
    assert checked.returncode == 2
    assert ("config error: the HTTPS_PROXY environment variable names https://proxy.corp.example:3128: "
            "only http:// proxies are supported") in checked.stderr
    assert "s3cret" not in checked.stderr + checked.stdout


async def test_an_https_upstream_is_reached_through_a_connect_tunnel_of_the_environments_proxy(
        forward_proxy, proxy_environment, tmp_path):
    """The deployment this is for: `gatekeeper serve` with HTTPS_PROXY set, and OpenAI behind TLS."""
    certificate, key = self_signed(tmp_path, "upstream")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(certificate, key)
    answer = {"created": 1, "data": [{"b64_json": base64.b64encode(b"an image").decode()}],
              "usage": {"input_tokens": 9, "output_tokens": 272, "total_tokens": 281}}
    seen: list[str] = []

    async def generations(request: web.Request) -> web.Response:
        seen.append(request.headers["Authorization"])
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post("/v1/images/generations", generations)
    runner = web.AppRunner(app)
    await runner.setup()
    upstream_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port, ssl_context=tls).start()
    proxy, address = await forward_proxy(credentials="egress:pr0xy-s3cret")
    proxy_environment.setenv("HTTPS_PROXY", f"http://egress:pr0xy-s3cret@{address}")
    proxy_environment.setenv("SSL_CERT_FILE", str(certificate))  # the process trusts the test's own CA
    port = free_port()
    config = tmp_path / "gatekeeper.toml"
    config.write_text(serve_config(f"https://127.0.0.1:{upstream_port}/v1", port, sections=f'''
[auth]
keys = [{{ id = "proxied-app", key = "{CLIENT_KEY}", tenant = "proxied" }}]

[plugins]
blocked = ["metering", "audit"]
'''))
    gateway = GatewayProcess(config, port, tmp_path / "gatekeeper.log")
    try:
        await gateway.start()
        async with sdk(gateway) as client:
            result = await client.images.generate(model="gpt-image-1.5", prompt="a fox behind a tunnel")
    finally:
        await gateway.stop()
        await runner.cleanup()
    assert base64.b64decode(result.data[0].b64_json) == b"an image" and result.usage.output_tokens == 272
    [(method, target, headers)] = proxy.requests
    assert (method, target) == ("CONNECT", f"127.0.0.1:{upstream_port}")
    assert headers["proxy-authorization"] == "Basic " + base64.b64encode(b"egress:pr0xy-s3cret").decode()
    assert seen == [f"Bearer {UPSTREAM_KEY}"]  # the key went inside the tunnel, to the upstream alone
    assert "pr0xy-s3cret" not in gateway.log_text()
