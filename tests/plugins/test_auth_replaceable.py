"""Auth is replaceable: with `auth` blocked, docs/auth.md's front-proxy plugin decides who calls."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import msgspec
import pytest
from aiohttp import web

from gatekeeper import hookimpl
from gatekeeper.app import PRINCIPAL
from gatekeeper.testing.kit import CLIENT_KEY, UPSTREAM_KEY

DOCS = Path(__file__).resolve().parents[2] / "docs" / "auth.md"
IDENTITY = {"x-forwarded-user": "ada", "x-tenant": "research"}


def docs_example() -> str:
    """The front-proxy plugin exactly as docs/auth.md shows it."""
    match = re.search(r"```python\n(# front_proxy_identity\.py.*?)```", DOCS.read_text(), re.DOTALL)
    assert match, "docs/auth.md lost its front_proxy_identity.py example"
    return match.group(1)


class PrincipalRecorder:
    name = "principal-recorder"

    def __init__(self) -> None:
        self.principals = []

    @hookimpl
    def exchange_complete(self, flow) -> None:
        self.principals.append(flow.principal)


class WhoAmI:
    name = "whoami"

    @hookimpl
    def register_routes(self):
        async def whoami(request: web.Request) -> web.Response:
            return web.json_response({"key_id": request[PRINCIPAL].key_id})

        return [web.get("/admin/whoami", whoami)]


@pytest.fixture
def start(gateway_kit, tmp_path):
    """Start a gateway with `auth` blocked and the docs' plugin loaded from a file, as a user would."""

    async def start(plugins=(), source: str | None = None):
        plugin_file = tmp_path / "front_proxy_identity.py"
        plugin_file.write_text(source or docs_example())
        return await gateway_kit.start({"plugins": {"blocked": ["auth"], "paths": [str(plugin_file)]}},
                                       plugins=list(plugins))

    return start


async def call(gateway, path: str, headers: dict) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + path, headers=headers) as response:
            return response.status, await response.read()


async def test_the_proxys_tenant_reaches_the_later_stages(start, fake_upstream):
    recorder = PrincipalRecorder()
    gateway = await start([recorder])
    status, _ = await call(gateway, "/v1/models", IDENTITY)
    assert status == 200
    (principal,) = recorder.principals
    assert (principal.key_id, principal.tenant, principal.labels) == ("user:ada", "research", {"user": "ada"})


async def test_the_upstream_still_gets_only_the_injected_key(start, fake_upstream):
    gateway = await start()
    await call(gateway, "/v1/models", {**IDENTITY, "Authorization": "Bearer sk-client-own"})
    assert fake_upstream.calls[-1].headers.getall("Authorization") == [f"Bearer {UPSTREAM_KEY}"]


async def test_the_built_in_auth_is_not_loaded(start):
    gateway = await start()
    names = [plugin.name for plugin in gateway.gateway.plugins.loaded]
    assert "auth" not in names and "gatekeeper_path_plugin_front_proxy_identity" in names
    status, _ = await call(gateway, "/v1/models", {"Authorization": f"Bearer {CLIENT_KEY}"})
    assert status == 401  # a gateway key means nothing now; only the proxy's identity counts


async def test_without_the_proxys_identity_the_request_gets_401(start, fake_upstream):
    gateway = await start()
    status, body = await call(gateway, "/v1/models", {"x-forwarded-user": "ada"})
    assert status == 401
    assert msgspec.json.decode(body)["error"]["code"] == "invalid_api_key"
    assert fake_upstream.count() == 0


async def test_identity_headers_from_an_untrusted_peer_get_401(start, fake_upstream):
    source = docs_example().replace('ip_network("127.0.0.1/32")', 'ip_network("10.0.0.0/8")')
    gateway = await start(source=source)
    status, _ = await call(gateway, "/v1/models", IDENTITY)
    assert status == 401
    assert fake_upstream.count() == 0


async def test_the_proxys_admin_group_opens_admin_routes(start):
    gateway = await start([WhoAmI()])
    status, body = await call(gateway, "/admin/whoami", {**IDENTITY, "x-forwarded-groups": "staff, gatekeeper-admins"})
    assert status == 200
    assert msgspec.json.decode(body) == {"key_id": "user:ada"}
    assert (await call(gateway, "/admin/whoami", IDENTITY))[0] == 403
