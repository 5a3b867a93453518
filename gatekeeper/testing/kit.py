"""Start a real gateway in front of the fake upstream, for tests and for plugin authors.

`GatewayKit.start(overrides, plugins=[...])` builds a config from `base_config` deep-merged with
``overrides``, registers extra plugins just for that gateway, and listens on a free loopback
port with the same runner ``gatekeeper serve`` uses. Every kit gateway also carries
`CanaryGuard`, which records any response that contains `UPSTREAM_KEY` in `CANARY_SIGHTINGS`
(tests/conftest.py fails the test that caused one).
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gatekeeper import hookimpl
from gatekeeper.config import parse_config
from gatekeeper.server import RunningGateway, start_gateway

if TYPE_CHECKING:
    from gatekeeper.app import Gateway
    from gatekeeper.flow import Flow

__all__ = ["GatewayKit", "UPSTREAM_KEY", "CLIENT_KEY", "ADMIN_KEY", "CANARY_SIGHTINGS", "CanaryGuard", "base_config",
           "deep_merge"]

# A canary: tests assert this value never shows up in a response, an error or a log line.
UPSTREAM_KEY = "sk-canary-upstream-3f9a6c1e0b7d4e2a"
CLIENT_KEY = "sk-gk-test-client-0001"
ADMIN_KEY = "sk-gk-test-admin-0001"


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def base_config(upstream_url: str, workdir: Path) -> dict[str, Any]:
    """The config every test gateway starts from: all built-ins, embedded storage in `workdir`."""
    return {
        "server": {"host": "127.0.0.1", "port": 0, "log_format": "json"},
        "upstream": {"base_url": upstream_url, "api_key": UPSTREAM_KEY, "max_retries": 0},
        "auth": {
            "admin_keys": [ADMIN_KEY],
            "keys": [{"id": "test-1", "key": CLIENT_KEY, "tenant": "test", "department": "qa"}],
        },
        "cache": {"backend": "memory"},
        "audit": {"path": str(workdir / "audit" / "gatekeeper-audit.jsonl"), "fsync": "always"},
        "metering": {"database": f"sqlite:///{workdir}/usage.db"},
    }


# Where the canary was seen on its way to a client ("GET /v1/models: response headers", ...);
# tests/conftest.py fails any test that leaves an entry here.
CANARY_SIGHTINGS: list[str] = []
_CANARY = UPSTREAM_KEY.encode()


class CanaryGuard:
    """A test-only plugin in every kit gateway: records any response that carries UPSTREAM_KEY.

    It sees every response's headers and in-memory body as aiohttp prepares it (admin routes and
    errors included) and scans streamed bodies chunk by chunk, across chunk boundaries.
    """

    name = "canary-guard"

    @hookimpl
    def register_routes(self, gateway: Gateway) -> None:
        # aiohttp freezes an app's signals when it starts; this hook runs while it is being built.
        gateway.app.on_response_prepare.append(self.check_prepared)

    async def check_prepared(self, request: web.Request, response: web.StreamResponse) -> None:
        where = f"{request.method} {request.raw_path}"
        if any(UPSTREAM_KEY in name or UPSTREAM_KEY in value for name, value in response.headers.items()):
            CANARY_SIGHTINGS.append(f"{where}: response headers")
        body = getattr(response, "body", None)
        if isinstance(body, (bytes, bytearray)) and _CANARY in body:
            CANARY_SIGHTINGS.append(f"{where}: response body")

    @hookimpl(trylast=True)
    def wrap_response_stream(self, flow: Flow, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes] | None:
        response = flow.response
        if response is not None and response.body is not None:
            if _CANARY in response.body:
                CANARY_SIGHTINGS.append(f"{flow.method} {flow.path}: response body")
            return None  # returning None keeps the one-write path the gateway uses without observers
        return self.scan(flow, chunks)

    async def scan(self, flow: Flow, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        tail = b""
        seen = False
        async for chunk in chunks:
            if not seen and _CANARY in tail + chunk:
                seen = True
                CANARY_SIGHTINGS.append(f"{flow.method} {flow.path}: streamed response body")
            tail = (tail + chunk)[-(len(_CANARY) - 1):]
            yield chunk


class GatewayKit:
    def __init__(self, upstream_url: str, workdir: Path) -> None:
        self.upstream_url = upstream_url
        self.workdir = workdir
        self.running: list[RunningGateway] = []

    def config_dict(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        return deep_merge(base_config(self.upstream_url, self.workdir), overrides or {})

    async def start(self, overrides: dict[str, Any] | None = None, *, plugins: list[Any] | None = None) -> RunningGateway:
        config = parse_config(self.config_dict(overrides), path=str(self.workdir / "test-config.toml"))
        running = await start_gateway(config, extra_plugins=[*(plugins or []), CanaryGuard()])
        self.running.append(running)
        return running

    async def stop_all(self) -> None:
        while self.running:
            await self.running.pop().stop()
