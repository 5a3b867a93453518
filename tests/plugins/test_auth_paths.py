"""Auth is decided on the path the router uses: dot segments, %2e and // tricks get nowhere.

Requests are written on a raw socket so that no client library normalises the target first.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from aiohttp import web

from gatekeeper import hookimpl
from gatekeeper.app import PRINCIPAL
from gatekeeper.testing.kit import ADMIN_KEY, CLIENT_KEY


class WhoAmI:
    name = "whoami"

    @hookimpl
    def register_routes(self):
        async def whoami(request: web.Request) -> web.Response:
            return web.json_response({"key_id": request[PRINCIPAL].key_id})

        return [web.get("/admin/whoami", whoami)]


async def raw_get(gateway, target: str, key: str | None = None) -> tuple[int, bytes]:
    """GET `target` exactly as written; returns the status and body."""
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
    if key is not None:
        head += f"Authorization: Bearer {key}\r\n"
    writer.write((head + "\r\n").encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    status_line, _, rest = response.partition(b"\r\n")
    _, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), body


@pytest.fixture
async def gateway(gateway_kit):
    return await gateway_kit.start(plugins=[WhoAmI()])


TO_ADMIN = [
    "/v1/../admin/whoami",
    "/v1/%2e%2e/admin/whoami",
    "/v1/%2E%2E/admin/whoami",
    "/v1/.%2e/admin/whoami",
    "//admin/whoami",
    "///admin//whoami",
    "/v1/models/../../admin/whoami",
    "/v1%2f..%2fadmin/whoami",
    "/./admin/./whoami",
    "/admin/whoami/.",
]


@pytest.mark.parametrize("target", TO_ADMIN)
async def test_tricks_towards_admin_without_a_key_get_401(gateway, fake_upstream, target):
    status, body = await raw_get(gateway, target)
    assert status == 401
    assert msgspec.json.decode(body)["error"]["code"] == "invalid_api_key"
    assert fake_upstream.count() == 0


@pytest.mark.parametrize("target", TO_ADMIN)
async def test_tricks_towards_admin_with_a_client_key_get_403(gateway, fake_upstream, target):
    status, body = await raw_get(gateway, target, CLIENT_KEY)
    assert status == 403
    assert msgspec.json.decode(body)["error"]["code"] == "admin_required"
    assert fake_upstream.count() == 0


@pytest.mark.parametrize("target", TO_ADMIN)
async def test_tricks_towards_admin_reach_the_admin_route_only_with_an_admin_key(gateway, target):
    status, body = await raw_get(gateway, target, ADMIN_KEY)
    assert status == 200
    assert msgspec.json.decode(body) == {"key_id": "admin-1"}


TO_V1 = ["/admin/../v1/models", "/admin/%2e%2e/v1/models", "//v1//models", "/admin/whoami/../../v1/models"]


@pytest.mark.parametrize("target", TO_V1)
async def test_tricks_from_admin_towards_v1_refuse_an_admin_key(gateway, fake_upstream, target):
    status, body = await raw_get(gateway, target, ADMIN_KEY)
    assert status == 401
    assert msgspec.json.decode(body)["error"]["code"] == "invalid_api_key"
    assert fake_upstream.count() == 0


@pytest.mark.parametrize("target", TO_V1)
async def test_tricks_from_admin_towards_v1_are_plain_v1_requests_for_a_client_key(gateway, fake_upstream, target):
    status, _ = await raw_get(gateway, target, CLIENT_KEY)
    assert status == 200
    assert [call.path for call in fake_upstream.calls] == ["/v1/models"]


async def test_dot_segments_cannot_climb_above_the_root(gateway):
    status, _ = await raw_get(gateway, "/../../../admin/whoami", CLIENT_KEY)
    assert status == 403
