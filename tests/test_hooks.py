"""Each hook, exercised through a real gateway: when it fires and what its result does.

Test plugins registered with `gateway_kit.start(plugins=[...])` are called before the built-ins.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time

import aiohttp
import openai
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from gateway_processes import free_port, serve_config
from gatekeeper import hookimpl
from gatekeeper.app import PRINCIPAL
from gatekeeper.config import ConfigError, parse_config
from gatekeeper.errors import GatewayError, StartupError
from gatekeeper.flow import Flow, GatewayResponse, Principal
from gatekeeper.testing.kit import CLIENT_KEY

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
GENERATE = {"model": "gpt-image-1.5", "prompt": "a hook test", "quality": "low"}


async def post(url, body=None, headers=None):
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body, headers={**AUTH, **(headers or {})}) as response:
            return response.status, response.headers.copy(), await response.read()


class Recorder:
    def __init__(self):
        self.calls: list[tuple[str, object]] = []

    def names(self):
        return [name for name, _ in self.calls]


async def test_hook_startup_and_hook_shutdown_run_once_each(gateway_kit):
    class Lifecycle(Recorder):
        @hookimpl
        async def startup(self, gateway):
            self.calls.append(("startup", gateway.started))

        @hookimpl
        def shutdown(self, gateway):
            self.calls.append(("shutdown", gateway.started))

    plugin = Lifecycle()
    running = await gateway_kit.start(plugins=[plugin])
    assert plugin.calls == [("startup", False)]  # runs before the gateway reports started
    await running.stop()
    gateway_kit.running.remove(running)
    assert plugin.calls == [("startup", False), ("shutdown", False)]


async def test_a_failed_startup_names_its_plugin_and_shuts_down_the_plugins_it_reached(gateway_kit):
    class Started(Recorder):
        name = "started-first"

        @hookimpl(tryfirst=True)
        async def startup(self, gateway):
            self.calls.append(("startup", None))

        @hookimpl
        async def shutdown(self, gateway):
            self.calls.append(("shutdown", None))

    class Failing(Recorder):
        name = "flaky-db"

        @hookimpl
        async def startup(self, gateway):
            raise ConnectionRefusedError(111, "Connection refused")

        @hookimpl
        def shutdown(self, gateway):
            self.calls.append(("shutdown", None))

    class NeverReached(Recorder):
        name = "never-reached"

        @hookimpl(trylast=True)
        def startup(self, gateway):
            self.calls.append(("startup", None))

        @hookimpl
        def shutdown(self, gateway):
            self.calls.append(("shutdown", None))

    first, failing, last = Started(), Failing(), NeverReached()
    with pytest.raises(StartupError) as raised:
        await gateway_kit.start(plugins=[first, failing, last])
    assert raised.value.plugin == "flaky-db" and isinstance(raised.value.error, ConnectionRefusedError)
    assert first.names() == ["startup", "shutdown"]
    assert failing.names() == ["shutdown"]  # it may have opened something before it failed
    assert last.names() == []


async def test_a_config_error_from_a_startup_hook_stays_a_config_error(gateway_kit):
    class Picky:
        name = "picky"

        @hookimpl
        def startup(self, gateway):
            raise ConfigError("[picky] region must be one of eu, us")

    with pytest.raises(ConfigError, match="region must be one of"):
        await gateway_kit.start(plugins=[Picky()])


def test_gatekeeper_serve_says_which_plugin_could_not_start_in_one_line_and_exits_1(tmp_path):
    """The usage database is down at start-up: no traceback, and no password from its URL."""
    config = tmp_path / "gatekeeper.toml"
    config.write_text(serve_config(f"http://127.0.0.1:{free_port()}/v1", free_port(), sections=f'''
[auth]
keys = [{{ id = "app", key = "{CLIENT_KEY}", tenant = "t" }}]

[metering]
database = "postgresql://gk:pg-s3cret-pass@127.0.0.1:{free_port()}/usage"

[audit]
path = "{tmp_path}/audit/gatekeeper-audit.jsonl"
'''))
    started = time.monotonic()
    served = subprocess.run([sys.executable, "-m", "gatekeeper", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    output = served.stdout + served.stderr
    assert served.returncode == 1 and time.monotonic() - started < 30
    assert "Traceback" not in output and "Unclosed" not in output and "pg-s3cret-pass" not in output
    [line] = [json.loads(line) for line in output.splitlines() if "could not start" in line]
    assert (line["event"], line["plugin"], line["level"]) == ("gateway could not start", "metering", "error")
    assert line["error"].startswith(("ConnectionRefusedError: ", "OSError: "))


@pytest.mark.parametrize("listen", ["port", "unix_socket"])
def test_gatekeeper_serve_that_cannot_listen_says_so_in_one_line_and_exits_1(tmp_path, listen):
    """Its port is taken (or its socket's folder is missing): the plugins that started shut down,
    so the process ends instead of hanging on their threads."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        where = f'unix_socket = "{tmp_path}/missing/gatekeeper.sock"' if listen == "unix_socket" else ""
        config = tmp_path / "gatekeeper.toml"
        config.write_text(serve_config(f"http://127.0.0.1:{free_port()}/v1", port, server=where, sections=f'''
[audit]
path = "{tmp_path}/audit/gatekeeper-audit.jsonl"
'''))
        served = subprocess.run([sys.executable, "-m", "gatekeeper", "serve", "--config", str(config)],
                                capture_output=True, text=True, timeout=60)
    output = served.stdout + served.stderr
    assert served.returncode == 1 and "Traceback" not in output
    [line] = [json.loads(line) for line in output.splitlines() if "could not start" in line]
    expected = f"unix:{tmp_path}/missing/gatekeeper.sock" if listen == "unix_socket" else f"127.0.0.1:{port}"
    assert (line["event"], line["address"], line["level"]) == ("gateway could not start", expected, "error")


class FailsToShutDown:
    name = "fails-to-shut-down"

    @hookimpl
    async def shutdown(self) -> None:
        raise RuntimeError("a plugin bug at shutdown")


async def test_a_plugin_that_fails_to_shut_down_costs_no_other_plugin_its_shutdown(gateway_kit, tmp_path):
    """Registered last, its shutdown runs first; metering still writes its queued row and the audit
    its record, and the failure is one log line that names the plugin."""
    gateway = await gateway_kit.start({"metering": {"flush_interval_ms": 600_000}}, plugins=[FailsToShutDown()])
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0)
    await client.images.generate(model="gpt-image-1.5", prompt="the last request before a shutdown")
    await client.close()
    with capture_logs() as logs:
        await gateway_kit.stop_all()
    (failure,) = [entry for entry in logs if entry["event"] == "a plugin failed to shut down"]
    assert failure["plugin"] == "fails-to-shut-down"
    with sqlite3.connect(tmp_path / "usage.db") as usage:
        assert usage.execute("SELECT count(*) FROM gatekeeper_usage").fetchone() == (1,)
    records = (tmp_path / "audit" / "gatekeeper-audit.jsonl").read_text().splitlines()
    assert json.loads(records[-1])["outcome"] == "ok"


class FailsToReload:
    name = "fails-to-reload"

    @hookimpl
    def reload_config(self) -> None:
        raise RuntimeError("a plugin bug on reload")


async def test_a_plugin_that_fails_to_reload_keeps_no_other_plugin_from_its_new_settings(gateway_kit):
    gateway = await gateway_kit.start(plugins=[FailsToReload()])
    fresh_dict = gateway_kit.config_dict()
    fresh_dict["auth"]["keys"].append({"id": "new-1", "key": "sk-gk-added-on-reload-0001", "tenant": "new"})
    fresh = parse_config(fresh_dict, path=gateway.gateway.config.path)
    with capture_logs() as logs:
        await gateway.gateway.reload(fresh)
    (failure,) = [entry for entry in logs if entry["event"] == "a plugin failed to reload its config"]
    assert failure["plugin"] == "fails-to-reload"
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="sk-gk-added-on-reload-0001", max_retries=0)
    assert (await client.models.list()).data  # auth took the key added on reload
    await client.close()


class FailsToComplete:
    name = "fails-to-complete"

    @hookimpl
    def exchange_complete(self, flow: Flow) -> None:
        raise RuntimeError("a plugin bug at the end of a request")


async def test_a_plugin_that_fails_at_exchange_complete_costs_the_request_neither_its_record_nor_its_entry(
        gateway_kit, tmp_path):
    gateway = await gateway_kit.start(plugins=[FailsToComplete()])
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0)
    with capture_logs() as logs:
        first = await client.images.with_raw_response.generate(model="gpt-image-1.5", prompt="a fox")
        again = await client.images.with_raw_response.generate(model="gpt-image-1.5", prompt="a fox")
    await client.close()
    assert (first.headers["x-gatekeeper-cache"], again.headers["x-gatekeeper-cache"]) == ("MISS", "HIT")
    failures = [entry for entry in logs if entry["event"] == "exchange_complete hook failed"]
    assert [entry["plugin"] for entry in failures] == ["fails-to-complete"] * 2
    records = [json.loads(line) for line in (tmp_path / "audit" / "gatekeeper-audit.jsonl").read_text().splitlines()]
    assert [(r["request_id"], r["outcome"]) for r in records if r["type"] == "request"] == [
        (first.headers["x-gatekeeper-request-id"], "ok"), (again.headers["x-gatekeeper-request-id"], "cache_hit")]


class AdminByHeader:
    """Trusts `x-test-role: admin`, so admin routes can be tested without the auth plugin."""

    @hookimpl
    def authenticate(self, flow):
        if flow.headers.get("x-test-role") == "admin":
            return Principal(key_id="test-admin", tenant="admin", is_admin=True)
        if flow.headers.get("x-test-role") == "user":
            return Principal(key_id="test-user", tenant="t")
        return None


async def test_hook_register_routes_serves_admin_routes_only_to_admins(gateway_kit):
    class Routes:
        @hookimpl
        def register_routes(self, gateway):
            async def whoami(request):
                return web.json_response({"key_id": request[PRINCIPAL].key_id})
            return [web.get("/admin/whoami", whoami)]

    running = await gateway_kit.start(plugins=[Routes(), AdminByHeader()])
    async with aiohttp.ClientSession() as session:
        async with session.get(running.url + "/admin/whoami", headers={"x-test-role": "admin"}) as response:
            assert response.status == 200 and (await response.json()) == {"key_id": "test-admin"}
        async with session.get(running.url + "/admin/whoami", headers={"x-test-role": "user"}) as response:
            assert response.status == 403
        async with session.get(running.url + "/admin/whoami") as response:
            assert response.status == 401


def test_hook_register_commands_adds_a_cli_command_from_an_entry_point(tmp_path, monkeypatch, capsys):
    (tmp_path / "gk_hello_plugin.py").write_text(textwrap.dedent('''
        from gatekeeper import hookimpl

        @hookimpl
        def register_commands(subparsers):
            hello = subparsers.add_parser("hello", help="say hello")
            hello.add_argument("--name", default="world")
            hello.set_defaults(func=lambda args: print(f"hello {args.name}") or 0)
    '''))
    dist = tmp_path / "gk_hello_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gk-hello-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[gatekeeper]\nhello = gk_hello_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from gatekeeper.cli import main

    assert main(["hello", "--name", "plugins"]) == 0
    assert capsys.readouterr().out.strip() == "hello plugins"


async def test_hook_ready_check_makes_ready_fail_when_a_plugin_is_not_ready(gateway_kit):
    class NotReady:
        @hookimpl
        def ready_check(self, gateway):
            return {"ready": False, "why": "warming up"}

    running = await gateway_kit.start(plugins=[NotReady()])
    async with aiohttp.ClientSession() as session:
        async with session.get(running.url + "/ready") as response:
            body = await response.json()
    assert response.status == 503
    assert body["ready"] is False
    assert {"ready": False, "why": "warming up"} in body["plugins"].values()


def test_hook_reload_config_runs_on_sighup_with_the_new_config(tmp_path, fake_upstream_process):
    marker = tmp_path / "reloaded.txt"
    plugin_file = tmp_path / "reload_probe.py"
    plugin_file.write_text(textwrap.dedent(f'''
        from gatekeeper import hookimpl

        @hookimpl
        def reload_config(gateway, config):
            open({str(marker)!r}, "w").write(str(config.server.max_concurrency))
    '''))
    config = tmp_path / "gk.toml"
    body = (f'[server]\nport = {fake_upstream_process["gateway_port"]}\nmax_concurrency = 10\n'
            f'[upstream]\nbase_url = "{fake_upstream_process["url"]}"\napi_key = "sk-x"\n'
            f'[plugins]\nbuiltins = ["forward"]\npaths = ["{plugin_file}"]\n')
    config.write_text(body)
    process = subprocess.Popen([sys.executable, "-m", "gatekeeper", "serve", "--config", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{fake_upstream_process['gateway_port']}/ready")
        config.write_text(body.replace("max_concurrency = 10", "max_concurrency = 77"))
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.read_text() == "77"
    finally:
        process.terminate()
        process.wait(timeout=15)


def wait_http(url: str, timeout: float = 20.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


@pytest.fixture
def fake_upstream_process():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "gatekeeper", "fake-upstream", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models")
        yield {"url": f"http://127.0.0.1:{port}/v1", "gateway_port": free_port()}
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_hook_authenticate_principal_reaches_later_stages(gateway_kit):
    seen = []

    class HeaderAuth:
        @hookimpl
        def authenticate(self, flow):
            return Principal(key_id="k1", tenant=flow.headers.get("x-team", "none"))

        @hookimpl
        def check_request(self, flow):
            seen.append((flow.principal.tenant, flow.principal.key_id))

    running = await gateway_kit.start(plugins=[HeaderAuth()])
    status, _, _ = await post(running.base_url + "/images/generations", GENERATE, {"x-team": "design"})
    assert status == 200 and seen == [("design", "k1")]


async def test_hook_normalize_request_canonical_form_is_kept_on_the_flow(gateway_kit):
    seen = []

    class Canon:
        @hookimpl(trylast=True)
        def normalize_request(self, flow):
            seen.append(flow.canonical)

    running = await gateway_kit.start(plugins=[Canon()])
    await post(running.base_url + "/images/generations", GENERATE)
    assert len(seen) == 1  # it ran once; with the normalize built-in it holds canonical bytes


async def test_hook_check_request_refusal_never_reaches_upstream(gateway_kit, fake_upstream):
    class Policy:
        @hookimpl
        def check_request(self, flow):
            raise GatewayError(400, "Not today.", code="moderation_blocked", param="prompt")

    running = await gateway_kit.start(plugins=[Policy()])
    status, headers, body = await post(running.base_url + "/images/generations", GENERATE)
    assert status == 400 and b"moderation_blocked" in body and headers["x-request-id"]
    assert fake_upstream.count() == 0


class ServeFromMemory:
    def __init__(self):
        self.before_forward_calls = 0

    @hookimpl
    def cache_lookup(self, flow):
        if flow.headers.get("x-test-hit"):
            flow.cache_status = "HIT"
            return GatewayResponse(200, {"content-type": "application/json"}, body=b'{"created":1,"data":[]}')
        return None

    @hookimpl
    def before_forward(self, flow):
        self.before_forward_calls += 1


async def test_hook_cache_lookup_hit_answers_without_upstream(gateway_kit, fake_upstream):
    plugin = ServeFromMemory()
    running = await gateway_kit.start(plugins=[plugin])
    status, headers, body = await post(running.base_url + "/images/generations", GENERATE, {"x-test-hit": "1"})
    assert (status, body) == (200, b'{"created":1,"data":[]}')
    assert headers["x-gatekeeper-cache"] == "HIT"
    assert fake_upstream.count() == 0


async def test_hook_before_forward_runs_on_misses_only(gateway_kit):
    plugin = ServeFromMemory()
    running = await gateway_kit.start(plugins=[plugin])
    await post(running.base_url + "/images/generations", GENERATE, {"x-test-hit": "1"})
    assert plugin.before_forward_calls == 0
    await post(running.base_url + "/images/generations", {**GENERATE, "prompt": "a miss"})
    assert plugin.before_forward_calls == 1


async def test_hook_forward_request_plugin_takes_over_from_the_builtin(gateway_kit, fake_upstream):
    class LocalModel:
        @hookimpl
        async def forward_request(self, flow):
            return GatewayResponse(200, {"content-type": "application/json"}, body=b'{"answered":"locally"}')

    running = await gateway_kit.start(plugins=[LocalModel()])
    status, _, body = await post(running.base_url + "/chat/completions", {"model": "local", "messages": []})
    assert (status, body) == (200, b'{"answered":"locally"}')
    assert fake_upstream.count() == 0


async def test_hook_wrap_response_stream_observer_sees_exactly_the_bytes_sent(gateway_kit, fake_upstream):
    observed: list[bytes] = []

    class Observer:
        @hookimpl
        def wrap_response_stream(self, flow, chunks):
            async def observe():
                async for chunk in chunks:
                    observed.append(chunk)
                    yield chunk
            return observe()

    running = await gateway_kit.start(plugins=[Observer()])
    fake_upstream.stream_interval_s = 0.01
    status, _, body = await post(running.base_url + "/images/generations", {**GENERATE, "stream": True, "partial_images": 2})
    assert status == 200 and body.count(b"event: ") == 3
    assert b"".join(observed) == body


class EndRecorder(Recorder):
    @hookimpl
    def exchange_complete(self, flow):
        self.calls.append(("complete", (flow.status, flow.outcome)))

    @hookimpl
    def exchange_error(self, flow, error):
        self.calls.append(("error", (flow.status, flow.outcome)))


async def test_hook_exchange_complete_fires_once_after_a_full_response(gateway_kit):
    plugin = EndRecorder()
    running = await gateway_kit.start(plugins=[plugin])
    await post(running.base_url + "/images/generations", {**GENERATE, "prompt": "complete once"})
    assert plugin.calls == [("complete", (200, "ok"))]


async def test_hook_exchange_error_fires_once_instead_of_complete_on_refusal(gateway_kit):
    plugin = EndRecorder()
    running = await gateway_kit.start({"upstream": {"base_url": "http://127.0.0.1:9/v1"}}, plugins=[plugin])
    status, _, _ = await post(running.base_url + "/images/generations", {**GENERATE, "prompt": "down"})
    assert status == 502
    assert plugin.calls == [("error", (502, "upstream_error"))]


async def test_exchange_error_fires_once_when_the_client_disconnects_mid_stream(gateway_kit, fake_upstream):
    plugin = EndRecorder()
    running = await gateway_kit.start(plugins=[plugin])
    fake_upstream.stream_interval_s = 0.3
    async with aiohttp.ClientSession() as session:
        response = await session.post(running.base_url + "/images/generations", headers=AUTH,
                                       json={**GENERATE, "prompt": "walk away", "stream": True, "partial_images": 3})
        await response.content.readline()
        response.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 5
    while not plugin.calls and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert plugin.calls == [("error", (200, "client_abort"))]


async def test_a_plugin_bug_becomes_an_openai_shaped_500_without_traceback(gateway_kit):
    class Buggy:
        @hookimpl
        def check_request(self, flow):
            raise ZeroDivisionError("secret internals")

    plugin = EndRecorder()
    running = await gateway_kit.start(plugins=[Buggy(), plugin])
    status, headers, body = await post(running.base_url + "/images/generations", GENERATE)
    assert status == 500 and b"gateway_error" in body
    assert b"secret internals" not in body and b"Traceback" not in body
    assert plugin.calls and plugin.calls[0][0] == "error"


async def test_requests_refused_before_their_body_is_read_still_end_in_exchange_error(gateway_kit, fake_upstream):
    plugin = EndRecorder()
    running = await gateway_kit.start({"server": {"max_body_bytes": 64}}, plugins=[plugin])
    status, _, _ = await post(running.base_url + "/images/generations", {**GENERATE, "prompt": "x" * 200})
    assert status == 413
    assert plugin.calls == [("error", (413, "rejected"))]
    assert fake_upstream.count() == 0
