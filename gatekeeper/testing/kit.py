"""Start a real gateway in front of the fake upstream, for tests and for plugin authors.

`GatewayKit.start(overrides, plugins=[...])` builds a config from `base_config` deep-merged with
``overrides``, registers extra plugins just for that gateway, and listens on a free loopback
port with the same runner ``gatekeeper serve`` uses.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from gatekeeper.config import parse_config
from gatekeeper.server import RunningGateway, start_gateway

__all__ = ["GatewayKit", "UPSTREAM_KEY", "CLIENT_KEY", "ADMIN_KEY", "base_config", "deep_merge"]

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
    }


class GatewayKit:
    def __init__(self, upstream_url: str, workdir: Path) -> None:
        self.upstream_url = upstream_url
        self.workdir = workdir
        self.running: list[RunningGateway] = []

    def config_dict(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        return deep_merge(base_config(self.upstream_url, self.workdir), overrides or {})

    async def start(self, overrides: dict[str, Any] | None = None, *, plugins: list[Any] | None = None) -> RunningGateway:
        config = parse_config(self.config_dict(overrides), path=str(self.workdir / "test-config.toml"))
        running = await start_gateway(config, extra_plugins=plugins)
        self.running.append(running)
        return running

    async def stop_all(self) -> None:
        while self.running:
            await self.running.pop().stop()
