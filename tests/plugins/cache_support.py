"""Shared helpers for the cache and normalize tests: backends, raw requests, multipart bodies.

`cache_overrides` is a fixture parametrised over both backends, so every test that takes it
runs against the in-process LRU and against the real Redis at 127.0.0.1:6379 (under a key
prefix of its own, deleted afterwards).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import msgspec
import pytest
import pytest_asyncio
import redis.asyncio as redis
from multidict import CIMultiDictProxy

from gateway_processes import free_port
from gatekeeper.testing.kit import ADMIN_KEY, CLIENT_KEY

REDIS_URL = "redis://127.0.0.1:6379/0"
OTHER_KEY = "sk-gk-test-other-0002"
GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
TWO_TENANTS = {
    "auth": {
        "keys": [
            {"id": "test-1", "key": CLIENT_KEY, "tenant": "test"},
            {"id": "other-1", "key": OTHER_KEY, "tenant": "other"},
        ]
    }
}


def bearer(key: str = CLIENT_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Reply(msgspec.Struct):
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def cache(self) -> str | None:
        return self.headers.get("x-gatekeeper-cache")

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


async def post(gateway: Any, path: str, *, json: Any = None, data: bytes | None = None,
               headers: dict[str, str] | None = None, key: str = CLIENT_KEY) -> Reply:
    """One raw request through the gateway; returns status, headers and the exact body bytes."""
    all_headers = {**bearer(key), **(headers or {})}
    if json is not None:
        data = msgspec.json.encode(json)
        all_headers.setdefault("Content-Type", "application/json")
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.url + path, data=data, headers=all_headers) as response:
            return Reply(response.status, response.headers, await response.read())


async def admin(gateway: Any, method: str, path: str) -> Reply:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, gateway.url + path, headers=bearer(ADMIN_KEY)) as response:
            return Reply(response.status, response.headers, await response.read())


def multipart(fields: list[tuple[str, str | bytes]], boundary: str | None = None) -> tuple[bytes, str]:
    """A multipart body as the SDK builds it: files (bytes) get a filename and a content type."""
    boundary = boundary or secrets.token_hex(16)
    chunks = []
    for index, (name, value) in enumerate(fields):
        chunks.append(f"--{boundary}\r\n".encode())
        if isinstance(value, bytes):
            chunks.append(f'Content-Disposition: form-data; name="{name}"; filename="f{index}.png"\r\n'
                          "Content-Type: image/png\r\n\r\n".encode())
            chunks.append(value)
        else:
            chunks.append(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode())
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def unique_prefix() -> str:
    return f"gk:test:{secrets.token_hex(6)}"


async def delete_prefix(prefix: str, url: str = REDIS_URL) -> None:
    client = redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + ":*", count=1000)]
        if keys:
            await client.unlink(*keys)
    finally:
        await client.aclose()


@pytest_asyncio.fixture(params=["memory", "redis"])
async def cache_overrides(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """Config overrides selecting one backend; Redis gets a key prefix of its own per test."""
    if request.param == "memory":
        yield {"cache": {"backend": "memory"}}
        return
    prefix = unique_prefix()
    try:
        yield {"cache": {"backend": "redis", "redis_url": REDIS_URL, "key_prefix": prefix}}
    finally:
        await delete_prefix(prefix)


def merge(*parts: dict[str, Any]) -> dict[str, Any]:
    from gatekeeper.testing.kit import deep_merge

    merged: dict[str, Any] = {}
    for part in parts:
        merged = deep_merge(merged, part)
    return merged


class RedisServer:
    """A redis-server of the test's own, on a free port, that the test may kill and restart."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.from_url(self.url)
        try:
            for _ in range(100):
                with contextlib.suppress(Exception):
                    if await client.ping():
                        return
                await asyncio.sleep(0.05)
            raise RuntimeError("redis-server did not start")
        finally:
            await client.aclose()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server
    finally:
        server.kill()
