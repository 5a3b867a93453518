"""pytest fixtures for gatekeeper's tests and for plugin authors (loaded via the ``pytest11`` entry point).

- ``fake_upstream``: a running `FakeUpstream` (contract-exact fake OpenAI API) with fault injection.
- ``gateway_kit``: starts gateways in front of it: ``await gateway_kit.start({"cache": {...}}, plugins=[p])``.
- ``gateway``: one gateway with the default test config.
- ``openai_client``: an ``openai.AsyncOpenAI`` pointed at ``gateway`` with the test client key.
- ``custom_upstream``: starts a one-handler upstream for odd cases: ``url = await custom_upstream(handler)``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
import pytest_asyncio

from gatekeeper.server import RunningGateway
from gatekeeper.testing.fake_upstream import FakeUpstream
from gatekeeper.testing.kit import CLIENT_KEY, UPSTREAM_KEY, GatewayKit


@pytest_asyncio.fixture
async def fake_upstream() -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream(api_key=UPSTREAM_KEY)
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.stop()


@pytest_asyncio.fixture
async def gateway_kit(fake_upstream: FakeUpstream, tmp_path) -> AsyncIterator[GatewayKit]:
    kit = GatewayKit(fake_upstream.base_url, tmp_path)
    try:
        yield kit
    finally:
        await kit.stop_all()


@pytest_asyncio.fixture
async def gateway(gateway_kit: GatewayKit) -> RunningGateway:
    return await gateway_kit.start()


@pytest_asyncio.fixture
async def openai_client(gateway: RunningGateway):
    import openai

    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        yield client


@pytest_asyncio.fixture
async def custom_upstream():
    """Start a one-handler aiohttp upstream on loopback: ``base_url = await custom_upstream(handler)``."""
    runners: list[web.AppRunner] = []

    async def start(handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"

    yield start
    for runner in runners:
        await runner.cleanup()
