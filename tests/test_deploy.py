"""The deployment files hold together without a Docker engine (CI has none): the Dockerfile, the
container's env-driven config, the health-check script, docker-compose.yml and the Kubernetes
sidecar manifest are parsed and checked against each other, and the parts that run outside a
container (config, health check, sample app) are run for real. docs/deployment.md gives the
manual ``docker build`` / ``docker compose config`` check."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
import yaml

from gateway_processes import free_port
from gatekeeper import hookimpl
from gatekeeper.config import ConfigError, load_config
from gatekeeper.plugins import build_hooks

ROOT = Path(__file__).resolve().parent.parent
CONTAINER_CONFIG = ROOT / "deploy" / "gatekeeper.toml"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
REQUIRED_ENV = {"OPENAI_API_KEY": "sk-upstream-deploy-test", "GATEKEEPER_CLIENT_KEY": "sk-gk-deploy-client",
                "GATEKEEPER_ADMIN_KEY": "sk-gk-deploy-admin"}


# ---------------------------------------------------------------- Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def instructions(name: str) -> list[str]:
    return [arguments for instruction, arguments in dockerfile() if instruction == name]


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"not exec form: {arguments}"
    return value


def final_stage() -> list[tuple[str, str]]:
    steps = dockerfile()
    last_from = max(i for i, (instruction, _) in enumerate(steps) if instruction == "FROM")
    return steps[last_from:]


def test_every_stage_builds_from_python_3_11_slim():
    assert [arguments.split()[0] for arguments in instructions("FROM")] == ["python:3.11-slim", "python:3.11-slim"]


def test_the_image_runs_as_a_non_root_numeric_user():
    users = [arguments for instruction, arguments in final_stage() if instruction == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0 and (not gid or (gid.isdigit() and int(gid) != 0))


def test_the_command_serves_the_baked_config_file():
    assert exec_form(instructions("CMD")[-1]) == ["gatekeeper", "serve", "--config", "/etc/gatekeeper/config.toml"]
    assert "deploy/gatekeeper.toml /etc/gatekeeper/config.toml" in instructions("COPY")


def test_the_healthcheck_runs_the_health_script_on_health():
    [healthcheck] = instructions("HEALTHCHECK")
    command = exec_form(healthcheck.split(" CMD ", 1)[1].strip())
    script = command[1]
    assert command[:2] == ["python", script] and command[2:] == ["--path", "/health"]
    assert f"deploy/healthcheck.py {script}" in instructions("COPY")


def test_every_copied_source_exists_and_is_not_dockerignored():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for arguments in instructions("COPY"):
        if arguments.startswith("--from="):
            continue
        for source in arguments.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            assert source.rstrip("/") not in ignored, f"COPY {source} is excluded by .dockerignore"


def test_the_exposed_port_is_the_one_the_container_config_listens_on():
    config = load_config(CONTAINER_CONFIG, environ=REQUIRED_ENV)
    assert instructions("EXPOSE") == [str(config.server.port)]
    assert config.server.host == "0.0.0.0"


# ---------------------------------------------------------------- the container's config


def container_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**REQUIRED_ENV, "GATEKEEPER_AUDIT_PATH": str(tmp_path / "audit" / "gatekeeper-audit.jsonl"),
            "GATEKEEPER_METERING_DATABASE": f"sqlite:///{tmp_path / 'usage.db'}", **extra}


def test_the_container_config_needs_nothing_but_environment_variables(tmp_path):
    config = load_config(CONTAINER_CONFIG, environ=container_env(tmp_path))
    loaded = [plugin.name for plugin in build_hooks(config).loaded]
    assert loaded == ["auth", "normalize", "cache", "forward", "metering", "audit"]
    assert config.upstream.api_key == REQUIRED_ENV["OPENAI_API_KEY"]


@pytest.mark.parametrize("variable", sorted(REQUIRED_ENV))
def test_a_missing_required_variable_is_an_error_that_names_it(tmp_path, variable):
    environ = container_env(tmp_path)
    del environ[variable]
    with pytest.raises(ConfigError, match=rf"environment variable {variable} is not set"):
        load_config(CONTAINER_CONFIG, environ=environ)


def test_one_variable_moves_the_container_onto_a_unix_socket(tmp_path):
    config = load_config(CONTAINER_CONFIG, environ=container_env(tmp_path, GATEKEEPER_UNIX_SOCKET="/run/gatekeeper/gk.sock"))
    assert config.server.unix_socket == "/run/gatekeeper/gk.sock"
    assert not load_config(CONTAINER_CONFIG, environ=container_env(tmp_path)).server.unix_socket


def required_variables() -> set[str]:
    """Variables the container config uses without a default."""
    return set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)\}", CONTAINER_CONFIG.read_text()))


def test_the_required_variables_are_the_documented_ones():
    assert required_variables() == set(REQUIRED_ENV)
    assert all(name in (ROOT / "docs" / "deployment.md").read_text() for name in required_variables())


# ---------------------------------------------------------------- the health-check script


def health(*args: str) -> int:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True, timeout=20).returncode


async def test_the_health_script_passes_on_a_healthy_gateway_and_fails_on_none(gateway_kit):
    running = await gateway_kit.start()
    port = running.url.rsplit(":", 1)[1]
    assert await asyncio.to_thread(health, "--port", port) == 0
    await running.stop()
    gateway_kit.running.remove(running)
    assert await asyncio.to_thread(health, "--port", port) == 1


async def test_the_health_script_fails_readiness_when_a_plugin_is_not_ready(gateway_kit):
    class NotReady:
        @hookimpl
        def ready_check(self, gateway):
            return {"ready": False}

    running = await gateway_kit.start(plugins=[NotReady()])
    port = running.url.rsplit(":", 1)[1]
    assert await asyncio.to_thread(health, "--port", port, "--path", "/health") == 0
    assert await asyncio.to_thread(health, "--port", port, "--path", "/ready") == 1


async def test_the_health_script_reaches_a_socket_named_by_the_environment(gateway_kit, tmp_path):
    path = str(tmp_path / "gk.sock")
    await gateway_kit.start({"server": {"unix_socket": path}})
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(HEALTHCHECK), "--path", "/ready"],
        env={**os.environ, "GATEKEEPER_UNIX_SOCKET": path}, capture_output=True, timeout=20)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- docker-compose.yml


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


def test_compose_runs_gatekeeper_redis_postgres_and_a_sample_app():
    assert {"gatekeeper", "redis", "postgres", "app"} <= set(compose()["services"])
    assert service("gatekeeper")["build"] == "."


def test_the_sample_app_reaches_openai_through_the_gateway():
    app, gatekeeper = service("app"), service("gatekeeper")
    assert app["environment"]["OPENAI_BASE_URL"] == "http://gatekeeper:8080/v1"
    assert app["environment"]["OPENAI_API_KEY"] == gatekeeper["environment"]["GATEKEEPER_CLIENT_KEY"]
    assert "/app/sample_app.py" in " ".join(app["command"])
    assert "./deploy/sample_app.py:/app/sample_app.py:ro" in app["volumes"]


def test_compose_starts_each_service_after_what_it_needs_is_healthy():
    assert service("app")["depends_on"] == {"gatekeeper": {"condition": "service_healthy"}}
    assert service("gatekeeper")["depends_on"] == {"redis": {"condition": "service_healthy"},
                                                   "postgres": {"condition": "service_healthy"}}
    assert service("redis")["healthcheck"]["test"] and service("postgres")["healthcheck"]["test"]


def test_compose_shares_redis_and_postgres_through_the_services():
    environment = service("gatekeeper")["environment"]
    postgres = service("postgres")["environment"]
    assert environment["GATEKEEPER_CACHE_BACKEND"] == "redis"
    assert environment["REDIS_URL"] == "redis://redis:6379/0"
    assert environment["GATEKEEPER_METERING_DATABASE"] == (
        f"postgresql://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}@postgres:5432/{postgres['POSTGRES_DB']}")


def test_compose_gives_gatekeeper_every_variable_its_config_requires():
    assert required_variables() <= set(service("gatekeeper")["environment"])


def test_compose_keeps_the_audit_log_on_a_volume():
    audit_dir = str(Path(load_config(CONTAINER_CONFIG, environ=REQUIRED_ENV).sections["audit"]["path"]).parent)
    assert f"audit:{audit_dir}" in service("gatekeeper")["volumes"]
    assert "audit" in compose()["volumes"]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", value)
    assert match, value
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def test_compose_waits_longer_than_the_gateway_may_drain():
    drain = load_config(CONTAINER_CONFIG, environ=REQUIRED_ENV).server.shutdown_timeout_s
    # aiohttp waits up to shutdown_timeout_s for handlers, then as long again after cancelling their requests.
    assert seconds(service("gatekeeper")["stop_grace_period"]) > 2 * drain


def compose_value(expression: str) -> str:
    """What compose makes of ``${VAR:-default}`` / ``${VAR:?message}`` with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", expression)


def test_the_compose_wiring_serves_the_sample_app_end_to_end(tmp_path):
    """The compose environment, with host names pointed at local Redis and PostgreSQL, runs
    `gatekeeper serve` on the container config and the sample app against it: its second call is a hit."""
    suffix = uuid.uuid4().hex[:10]
    table, prefix = f"gk_compose_{suffix}", f"gk:compose:{suffix}"
    port = free_port()
    with FakeUpstreamProcess() as upstream_url:
        environment = {name: compose_value(str(value)) for name, value in service("gatekeeper")["environment"].items()}
        environment.update({
            "OPENAI_API_KEY": "sk-compose-upstream", "OPENAI_UPSTREAM_URL": upstream_url,
            "REDIS_URL": environment["REDIS_URL"].replace("//redis:", "//127.0.0.1:"),
            "GATEKEEPER_METERING_DATABASE": POSTGRES_DSN, "GATEKEEPER_METERING_TABLE": table,
            "GATEKEEPER_CACHE_KEY_PREFIX": prefix,
            "GATEKEEPER_AUDIT_PATH": str(tmp_path / "audit" / "gatekeeper-audit.jsonl"),
        })
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gatekeeper", "serve", "--config", str(CONTAINER_CONFIG), "--port", str(port)],
            env={**os.environ, **environment}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: health("--port", str(port), "--path", "/ready") == 0, "the gateway never became ready")
            app_env = {name: compose_value(str(value)) for name, value in service("app")["environment"].items()}
            app_env["OPENAI_BASE_URL"] = app_env["OPENAI_BASE_URL"].replace("//gatekeeper:8080", f"//127.0.0.1:{port}")
            result = subprocess.run([sys.executable, str(ROOT / "deploy" / "sample_app.py")],
                                    env={**os.environ, **app_env}, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            first, second = result.stdout.splitlines()
            assert first.endswith("cache MISS") and second.endswith("cache HIT")
        finally:
            gateway.send_signal(signal.SIGTERM)
            assert gateway.wait(timeout=30) == 0
            cleanup_shared_state(table, prefix)


# ---------------------------------------------------------------- the Kubernetes sidecar manifest


def manifest(kind: str) -> dict[str, Any]:
    documents = [doc for doc in yaml.safe_load_all((ROOT / "deploy" / "kubernetes-sidecar.yaml").read_text()) if doc]
    [found] = [doc for doc in documents if doc["kind"] == kind]
    return found


def pod() -> dict[str, Any]:
    return manifest("Deployment")["spec"]["template"]["spec"]


def sidecar() -> dict[str, Any]:
    [gatekeeper] = [c for c in pod()["initContainers"] if c["name"] == "gatekeeper"]
    return gatekeeper


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def test_the_gateway_is_a_native_sidecar_of_the_app():
    assert sidecar()["restartPolicy"] == "Always"
    assert [c["name"] for c in pod()["containers"]] == ["app"]


def test_gateway_and_app_share_the_socket_on_an_in_memory_volume():
    socket_path = env_of(sidecar())["GATEKEEPER_UNIX_SOCKET"]
    [volume] = [v for v in pod()["volumes"] if "emptyDir" in v]
    assert volume["emptyDir"]["medium"] == "Memory"
    [app] = pod()["containers"]
    for container in (sidecar(), app):
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts[volume["name"]] == str(Path(socket_path).parent)
    assert env_of(app)["GATEKEEPER_SOCKET"] == socket_path


def test_the_socket_volumes_group_is_the_images_group():
    user = [arguments for instruction, arguments in final_stage() if instruction == "USER"][-1]
    assert str(pod()["securityContext"]["fsGroup"]) == user.partition(":")[2]
    assert str(sidecar()["securityContext"]["runAsUser"]) == user.partition(":")[0]
    assert sidecar()["securityContext"]["runAsNonRoot"] is True


def test_the_pod_waits_longer_than_the_gateway_may_drain():
    drain = load_config(CONTAINER_CONFIG, environ=REQUIRED_ENV).server.shutdown_timeout_s
    assert pod()["terminationGracePeriodSeconds"] > 2 * drain


def test_the_sidecar_keeps_secrets_in_a_secret():
    assert {"secretRef": {"name": "gatekeeper"}} in sidecar()["envFrom"]
    assert not set(REQUIRED_ENV) & set(env_of(sidecar()))  # never a literal value in the manifest
    [app] = pod()["containers"]
    assert env_of(app)["OPENAI_API_KEY"] == {"secretKeyRef": {"name": "gatekeeper", "key": "GATEKEEPER_CLIENT_KEY"}}


def test_each_replica_writes_its_own_audit_file():
    env = env_of(sidecar())
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "$(POD_NAME)" in env["GATEKEEPER_AUDIT_PATH"]


def test_the_sidecar_probes_work_against_a_real_sidecar_on_its_socket(tmp_path):
    """Each probe command of the manifest, run as printed (the script from deploy/), exits 0."""
    socket_path = str(tmp_path / "gk.sock")
    environment = {**os.environ, **container_env(tmp_path), "GATEKEEPER_UNIX_SOCKET": socket_path,
                   "OPENAI_UPSTREAM_URL": "http://127.0.0.1:9/v1"}
    gateway = subprocess.Popen([sys.executable, "-m", "gatekeeper", "serve", "--config", str(CONTAINER_CONFIG)],
                               env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: os.path.exists(socket_path), "the sidecar never created its socket")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = sidecar()[probe]["exec"]["command"]
            assert command[1] == "/usr/local/bin/gatekeeper-healthcheck"
            runnable = [sys.executable, str(HEALTHCHECK), *command[2:]]
            result = subprocess.run(runnable, env=environment, capture_output=True, text=True, timeout=20)
            assert result.returncode == 0, f"{probe}: {shlex.join(command)}: {result.stderr}"
    finally:
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(timeout=30) == 0


# ---------------------------------------------------------------- helpers


def wait_until(condition, message: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(message)


class FakeUpstreamProcess:
    """`gatekeeper fake-upstream` in its own process, for gateways that are subprocesses too."""

    def __enter__(self) -> str:
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, "-m", "gatekeeper", "fake-upstream", "--port", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: health("--port", str(self.port), "--path", "/v1/models") == 0, "the fake never answered")
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc_info: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def cleanup_shared_state(table: str, prefix: str) -> None:
    async def clean() -> None:
        connection = await asyncpg.connect(POSTGRES_DSN)
        try:
            await connection.execute(f'DROP TABLE IF EXISTS "{table}"')
        finally:
            await connection.close()
        client = aioredis.from_url("redis://127.0.0.1:6379/0")
        try:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()

    asyncio.run(clean())
