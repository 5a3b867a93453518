"""Operating keys: `gatekeeper keys new` / `keys hash`, and SIGHUP reloading keys under load."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import aiohttp
import pytest
from gateway_processes import GatewayProcess, free_port, serve_config

from gatekeeper.cli import main
from gatekeeper.testing.kit import ADMIN_KEY, CLIENT_KEY, UPSTREAM_KEY

GATEKEEPER = str(Path(sys.executable).parent / "gatekeeper")


def keys_new(capsys, *args: str) -> tuple[str, dict]:
    """Run `gatekeeper keys new`; return the printed key and the parsed [[auth.keys]] block."""
    assert main(["keys", "new", *args]) == 0
    out = capsys.readouterr().out
    (key,) = [line for line in out.splitlines() if line.startswith("sk-gk-")]
    block = tomllib.loads(out[out.index("[[auth.keys]]"):])
    (entry,) = block["auth"]["keys"]
    return key, entry


def test_keys_new_prints_a_fresh_key_and_its_config_block(capsys):
    key, entry = keys_new(capsys, "--tenant", "design", "--id", "design-2")
    assert entry == {"id": "design-2", "tenant": "design", "key_sha256": hashlib.sha256(key.encode()).hexdigest()}
    assert len(key) == len("sk-gk-") + 43  # secrets.token_urlsafe(32)


def test_keys_new_never_repeats_a_key(capsys):
    first, _ = keys_new(capsys, "--tenant", "t")
    second, _ = keys_new(capsys, "--tenant", "t")
    assert first != second


def test_keys_new_names_the_key_after_the_tenant_by_default(capsys):
    _, entry = keys_new(capsys, "--tenant", "design")
    assert entry["id"].startswith("design-") and entry["tenant"] == "design"


def test_keys_new_quotes_tenant_and_id_as_toml_strings(capsys):
    _, entry = keys_new(capsys, "--tenant", 'Design "EU" \\ team', "--id", "d\u00e9sign-1")
    assert (entry["tenant"], entry["id"]) == ('Design "EU" \\ team', "d\u00e9sign-1")


def test_keys_new_needs_a_tenant(capsys):
    with pytest.raises(SystemExit):
        main(["keys", "new"])


async def test_a_key_from_keys_new_authenticates_once_pasted_into_the_config(capsys, gateway_kit):
    key, entry = keys_new(capsys, "--tenant", "design", "--id", "design-2")
    gateway = await gateway_kit.start({"auth": {"keys": [entry]}})
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.base_url + "/models", headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status == 200


def test_keys_hash_prints_the_sha256_of_the_key_on_stdin():
    result = subprocess.run([GATEKEEPER, "keys", "hash"], input="sk-gk-some-key\n", capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hashlib.sha256(b"sk-gk-some-key").hexdigest()
    assert "sk-gk-some-key" not in result.stdout + result.stderr


def test_keys_hash_refuses_empty_input():
    result = subprocess.run([GATEKEEPER, "keys", "hash"], input="\n", capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "no key" in result.stderr


# ---------------------------------------------------------------- SIGHUP


def config_text(upstream_url: str, port: int, keys_toml: str) -> str:
    return serve_config(upstream_url, port, sections=f'[auth]\nadmin_keys = ["{ADMIN_KEY}"]\n{keys_toml}')


CLIENT_ENTRY = f'[[auth.keys]]\nid = "test-1"\nkey = "{CLIENT_KEY}"\ntenant = "test"\n'
NEW_KEY = "sk-gk-added-by-reload-0003"
NEW_ENTRY = f'[[auth.keys]]\nid = "new-1"\nkey_sha256 = "{hashlib.sha256(NEW_KEY.encode()).hexdigest()}"\ntenant = "new"\n'


async def get_status(url: str, key: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as response:
            await response.read()
            return response.status


async def status_is(url: str, key: str, expected: int) -> bool:
    return await get_status(url, key) == expected


async def _maybe_await(value):
    return await value if inspect.isawaitable(value) else value


async def eventually(check, timeout: float = 10.0) -> None:
    """Wait until `check()` (a bool, or an awaitable of one) is true."""
    deadline = time.monotonic() + timeout
    while not await _maybe_await(check()):
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.05)


@pytest.fixture
async def served(tmp_path, fake_upstream):
    """A real `gatekeeper serve --config FILE` process, ready; yields it and its config file."""
    port = free_port()
    config_file = tmp_path / "config.toml"
    config_file.write_text(config_text(fake_upstream.base_url, port, CLIENT_ENTRY))
    gateway = GatewayProcess(config_file, port, tmp_path / "gatekeeper.log")
    try:
        await gateway.start()
        yield gateway, config_file
    finally:
        await gateway.stop()
        output = gateway.log_text()
        assert UPSTREAM_KEY not in output and CLIENT_KEY not in output and NEW_KEY not in output


async def test_sighup_reloads_keys_without_dropping_a_request_in_flight(served, fake_upstream):
    gateway, config_file = served
    url = gateway.url
    fake_upstream.inject(path="/v1/models", status=200, delay_s=1.5)
    in_flight = asyncio.create_task(get_status(url, CLIENT_KEY))
    await eventually(lambda: fake_upstream.count("/v1/models") == 1)

    config_file.write_text(config_text(fake_upstream.base_url, gateway.port, NEW_ENTRY))
    gateway.process.send_signal(signal.SIGHUP)
    await eventually(lambda: status_is(url, NEW_KEY, 200))

    assert await get_status(url, CLIENT_KEY) == 401  # dropped from the file, so refused from now on
    assert not in_flight.done()  # still waiting on the slow upstream, across the reload
    assert await in_flight == 200
    assert "auth keys reloaded" in gateway.log_text()


async def test_sighup_with_an_invalid_config_keeps_the_old_keys(served, fake_upstream):
    gateway, config_file = served
    config_file.write_text(config_text(fake_upstream.base_url, 1, '[[auth.keys]]\nid = "broken"\ntenant = "t"\n'))
    gateway.process.send_signal(signal.SIGHUP)
    await eventually(lambda: "reload refused" in gateway.log_text())
    assert await get_status(gateway.url, CLIENT_KEY) == 200
    assert "broken" in gateway.log_text()  # the log names the bad entry


async def test_admin_keys_lists_who_may_call_by_key_id_and_never_a_key(gateway_kit):
    other = "sk-gk-test-print-9999"
    gateway = await gateway_kit.start({"auth": {"keys": [
        {"id": "test-1", "key": CLIENT_KEY, "tenant": "test", "department": "qa"},
        {"id": "print-1", "key_sha256": hashlib.sha256(other.encode()).hexdigest(), "tenant": "print",
         "models": ["gpt-image-*"], "rpm": 30, "expires": "2020-01-01"},
    ]}})
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
            assert r.status == 200
            body = await r.read()
        async with session.get(gateway.url + "/admin/keys", headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as r:
            assert r.status == 403
    listed = json.loads(body)
    assert listed == {"admin_keys": 1, "client_keys": [
        {"id": "print-1", "tenant": "print", "labels": {}, "models": ["gpt-image-*"], "rpm": 30,
         "expires": "2020-01-01", "expired": True},
        {"id": "test-1", "tenant": "test", "labels": {"department": "qa"}, "models": None, "rpm": None,
         "expires": None, "expired": False},
    ]}
    for secret in (CLIENT_KEY, other, ADMIN_KEY, hashlib.sha256(other.encode()).hexdigest(),
                   hashlib.sha256(CLIENT_KEY.encode()).hexdigest()):
        assert secret.encode() not in body
