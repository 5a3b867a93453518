"""`gatekeeper serve` in processes of their own, as production runs it: for tests of replicas and of
shutdown, where the thing under test is the process (its signals, its exit code, what it flushed)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from gatekeeper.testing.kit import UPSTREAM_KEY

__all__ = ["GatewayProcess", "free_port", "serve_config"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_config(upstream_url: str, port: int, *, server: str = "", sections: str = "") -> str:
    """A config for `gatekeeper serve` on loopback `port` with JSON logs, forwarding to the test
    upstream at `upstream_url` with no retries. `server` holds more [server] lines; `sections`
    the test's own sections ([auth] and the rest)."""
    return f'''
[server]
host = "127.0.0.1"
port = {port}
log_format = "json"
{server}

[upstream]
base_url = "{upstream_url}"
api_key = "{UPSTREAM_KEY}"
max_retries = 0

{sections}'''


class GatewayProcess:
    """One ``gatekeeper serve --config <file>`` process on a loopback port; its log goes to a file."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config = config
        self.port = port
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    async def start(self, timeout: float = 30.0) -> None:
        """Start the process and return once ``/ready`` answers 200."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gatekeeper", "serve", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"gatekeeper serve exited with {self.process.returncode}:\n{self.log_text()}")
                try:
                    async with session.get(self.url + "/ready") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"gatekeeper serve was not ready within {timeout} s:\n{self.log_text()}")

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return await asyncio.to_thread(self.process.wait, timeout)

    async def stop(self) -> int | None:
        """SIGTERM and wait; a process that does not stop in time is killed (and None returned)."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.terminate()
        try:
            return await self.wait()
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait)
            return None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
