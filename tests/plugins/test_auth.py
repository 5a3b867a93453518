"""The auth plugin: client keys become tenants, admin keys open /admin, the upstream key stays hidden."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import re

import aiohttp
import msgspec
import openai
import pytest
from aiohttp import web
from multidict import CIMultiDict

from gatekeeper import hookimpl
from gatekeeper.app import PRINCIPAL
from gatekeeper.config import ConfigError, parse_config
from gatekeeper.flow import Principal
from gatekeeper.plugins import build_hooks
from gatekeeper.testing.kit import ADMIN_KEY, CLIENT_KEY, UPSTREAM_KEY

PNG = b"\x89PNG\r\n\x1a\nsmall"
IMAGE_REQUEST = {"model": "gpt-image-1.5", "prompt": "a red fox"}
OTHER_KEY = "sk-gk-test-other-0002"


async def call(gateway, method: str, path: str, *, headers=None, json=None) -> tuple[int, CIMultiDict, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, gateway.url + path, headers=headers, json=json) as response:
            return response.status, response.headers.copy(), await response.read()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def error_of(body: bytes) -> dict:
    error = msgspec.json.decode(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def auth_plugin(gateway):
    return gateway.gateway.plugins.hooks.pm.get_plugin("auth")


class PrincipalRecorder:
    """Records the principal every completed flow carried into the later stages."""

    name = "principal-recorder"

    def __init__(self) -> None:
        self.principals: list[Principal | None] = []

    @hookimpl
    def exchange_complete(self, flow) -> None:
        self.principals.append(flow.principal)


class WhoAmI:
    """An /admin route that answers with the principal the core let through."""

    name = "whoami"

    @hookimpl
    def register_routes(self):
        async def whoami(request: web.Request) -> web.Response:
            principal = request[PRINCIPAL]
            return web.json_response({"key_id": principal.key_id, "tenant": principal.tenant,
                                      "is_admin": principal.is_admin})

        return [web.get("/admin/whoami", whoami)]


def keys(*entries: dict) -> dict:
    return {"auth": {"keys": [{"id": "test-1", "key": CLIENT_KEY, "tenant": "test", "department": "qa"}, *entries]}}


# ---------------------------------------------------------------- 401s


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/images/generations"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/files"),  # a pass-through route the gateway knows nothing about
])
async def test_every_v1_route_needs_a_key(gateway, fake_upstream, method, path):
    status, headers, body = await call(gateway, method, path, json=IMAGE_REQUEST if method == "POST" else None)
    assert status == 401
    assert error_of(body)["code"] == "invalid_api_key"
    assert headers["x-request-id"] and headers["x-should-retry"] == "false"
    assert fake_upstream.count() == 0


@pytest.mark.parametrize("authorization", [
    pytest.param(["Bearer"], id="bearer-with-nothing-after"),
    pytest.param(["Bearer    "], id="bearer-with-only-spaces"),
    pytest.param([f"Bearer {CLIENT_KEY}", f"Bearer {CLIENT_KEY}"], id="two-authorization-headers"),
    pytest.param([f"Bearer {CLIENT_KEY}", "Bearer sk-gk-other"], id="two-different-authorization-headers"),
    pytest.param([f"Basic {CLIENT_KEY}"], id="wrong-scheme"),
    pytest.param([CLIENT_KEY], id="key-without-scheme"),
    pytest.param(["Bearer sk-gk-wrong-key-31337"], id="unknown-key"),
    pytest.param([f"Bearer {CLIENT_KEY}x"], id="key-with-a-suffix"),
    pytest.param([f"Bearer {UPSTREAM_KEY}"], id="the-upstream-key"),
    pytest.param([""], id="empty-header"),
])
async def test_bad_authorization_gets_401_invalid_api_key_and_no_upstream_call(gateway, fake_upstream, authorization):
    headers = CIMultiDict(("Authorization", value) for value in authorization)
    status, _, body = await call(gateway, "POST", "/v1/images/generations", headers=headers, json=IMAGE_REQUEST)
    assert status == 401
    error = error_of(body)
    assert (error["code"], error["type"]) == ("invalid_api_key", "invalid_request_error")
    assert fake_upstream.count() == 0


@pytest.mark.parametrize("presented", ["sk-gk-wrong-key-31337", CLIENT_KEY + "x", UPSTREAM_KEY, ADMIN_KEY])
async def test_a_refused_key_is_never_echoed(gateway, presented):
    status, headers, body = await call(gateway, "POST", "/v1/images/generations", headers=bearer(presented),
                                       json=IMAGE_REQUEST)
    assert status == 401
    assert presented.encode() not in body
    assert not any(presented in value for value in headers.values())


async def test_a_refused_key_never_reaches_the_log(gateway, capfd):
    await call(gateway, "GET", "/v1/models", headers=bearer("sk-gk-secret-wrong-key-777"))
    out, err = capfd.readouterr()
    assert "sk-gk-secret-wrong-key-777" not in out + err


async def test_sdk_sees_authentication_error_for_a_wrong_key(gateway):
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key="sk-gk-nope", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as raised:
            await client.images.generate(**IMAGE_REQUEST)
    assert raised.value.code == "invalid_api_key"
    assert raised.value.request_id


async def test_sdk_sees_authentication_error_for_the_upstream_key(gateway, fake_upstream):
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=UPSTREAM_KEY, max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    assert fake_upstream.count() == 0


async def test_presenting_the_upstream_key_is_logged_as_a_leak_without_the_key(gateway):
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        await call(gateway, "GET", "/v1/models", headers=bearer(UPSTREAM_KEY))
    (warning,) = [entry for entry in logs if entry["log_level"] == "warning"]
    assert "presented the upstream api_key" in warning["event"]
    assert UPSTREAM_KEY not in repr(logs)


async def test_an_admin_key_is_refused_on_v1(gateway, fake_upstream):
    status, _, body = await call(gateway, "GET", "/v1/models", headers=bearer(ADMIN_KEY))
    assert status == 401
    assert error_of(body)["code"] == "invalid_api_key"
    assert fake_upstream.count() == 0


# ---------------------------------------------------------------- expiry


def utc_today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


async def test_a_key_is_refused_from_its_expiry_date_on(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start(keys({"id": "old", "key": OTHER_KEY, "tenant": "t", "expires": utc_today()}))
    status, _, body = await call(gateway, "GET", "/v1/models", headers=bearer(OTHER_KEY))
    assert status == 401
    error = error_of(body)
    assert error["code"] == "invalid_api_key" and "expired" in error["message"]
    assert fake_upstream.count() == 0


async def test_a_key_still_works_the_day_before_it_expires(gateway_kit):
    tomorrow = utc_today() + datetime.timedelta(days=1)
    gateway = await gateway_kit.start(keys({"id": "soon", "key": OTHER_KEY, "tenant": "t", "expires": tomorrow}))
    status, _, _ = await call(gateway, "GET", "/v1/models", headers=bearer(OTHER_KEY))
    assert status == 200


async def test_expires_can_be_a_toml_date(tmp_path, fake_upstream):
    config_file = tmp_path / "config.toml"
    config_file.write_text(f"""
[upstream]
base_url = "{fake_upstream.base_url}"
api_key = "{UPSTREAM_KEY}"
[[auth.keys]]
id = "dated"
key = "{OTHER_KEY}"
tenant = "t"
expires = 2001-01-01
""")
    from gatekeeper.config import load_config

    plugin = build_hooks(load_config(config_file)).hooks.pm.get_plugin("auth")
    (record,) = plugin.table.clients.values()
    assert record.expires_at == datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC).timestamp()


# ---------------------------------------------------------------- principals


async def test_a_client_key_becomes_the_flows_principal(gateway_kit):
    recorder = PrincipalRecorder()
    gateway = await gateway_kit.start(plugins=[recorder])
    status, _, _ = await call(gateway, "POST", "/v1/images/generations", headers=bearer(CLIENT_KEY), json=IMAGE_REQUEST)
    assert status == 200
    assert recorder.principals == [Principal(key_id="test-1", tenant="test", labels={"department": "qa"})]


async def test_labels_table_and_department_both_reach_the_principal(gateway_kit):
    recorder = PrincipalRecorder()
    gateway = await gateway_kit.start(keys({"id": "design-1", "key": OTHER_KEY, "tenant": "design",
                                            "department": "marketing", "labels": {"cost_center": "cc-42"}}),
                                      plugins=[recorder])
    await call(gateway, "GET", "/v1/models", headers=bearer(OTHER_KEY))
    (principal,) = recorder.principals
    assert (principal.key_id, principal.tenant) == ("design-1", "design")
    assert principal.labels == {"cost_center": "cc-42", "department": "marketing"}
    assert principal.is_admin is False


async def test_a_key_given_as_sha256_works(gateway_kit):
    digest = hashlib.sha256(OTHER_KEY.encode()).hexdigest().upper()  # hex case does not matter
    gateway = await gateway_kit.start(keys({"id": "hashed", "key_sha256": digest, "tenant": "t"}))
    status, _, _ = await call(gateway, "GET", "/v1/models", headers=bearer(OTHER_KEY))
    assert status == 200


async def test_the_bearer_scheme_is_case_insensitive(gateway):
    status, _, _ = await call(gateway, "GET", "/v1/models", headers={"Authorization": f"bearer {CLIENT_KEY}"})
    assert status == 200


async def test_only_digests_of_keys_are_kept_in_memory(gateway):
    plugin = auth_plugin(gateway)
    kept = repr(vars(plugin)) + repr(plugin.table.clients) + repr(plugin.table.admins)
    assert CLIENT_KEY not in kept and ADMIN_KEY not in kept
    assert hashlib.sha256(CLIENT_KEY.encode()).hexdigest() in plugin.table.clients
    assert hashlib.sha256(ADMIN_KEY.encode()).hexdigest() in plugin.table.admins


# ---------------------------------------------------------------- admin routes


async def test_an_admin_key_opens_admin_routes(gateway_kit):
    gateway = await gateway_kit.start(plugins=[WhoAmI()])
    status, _, body = await call(gateway, "GET", "/admin/whoami", headers=bearer(ADMIN_KEY))
    assert status == 200
    assert msgspec.json.decode(body) == {"key_id": "admin-1", "tenant": "admin", "is_admin": True}


async def test_a_client_key_on_an_admin_route_gets_403(gateway_kit):
    gateway = await gateway_kit.start(plugins=[WhoAmI()])
    status, _, body = await call(gateway, "GET", "/admin/whoami", headers=bearer(CLIENT_KEY))
    assert status == 403
    assert error_of(body)["code"] == "admin_required"


@pytest.mark.parametrize("headers", [None, bearer("sk-gk-wrong"), bearer(UPSTREAM_KEY)], ids=["none", "wrong", "upstream"])
async def test_an_admin_route_without_a_valid_key_gets_401(gateway_kit, headers):
    gateway = await gateway_kit.start(plugins=[WhoAmI()])
    status, _, body = await call(gateway, "GET", "/admin/whoami", headers=headers)
    assert status == 401
    assert error_of(body)["code"] == "invalid_api_key"


# ---------------------------------------------------------------- what the upstream sees


async def test_upstream_sees_exactly_one_authorization_and_the_configured_org_and_project(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start({"upstream": {"organization": "org-gateway", "project": "proj_gateway"}})
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0,
                                  organization="org-client", project="proj_client") as client:
        await client.images.generate(**IMAGE_REQUEST)
    sent = fake_upstream.calls[-1].headers
    assert sent.getall("Authorization") == [f"Bearer {UPSTREAM_KEY}"]
    assert sent.getall("OpenAI-Organization") == ["org-gateway"]
    assert sent.getall("OpenAI-Project") == ["proj_gateway"]


async def test_client_org_and_project_never_reach_the_upstream_when_none_is_configured(gateway, fake_upstream):
    headers = CIMultiDict([("Authorization", f"Bearer {CLIENT_KEY}"), ("OpenAI-Organization", "org-client"),
                           ("OpenAI-Project", "proj_client"), ("OpenAI-Organization", "org-client-2")])
    status, _, _ = await call(gateway, "POST", "/v1/images/generations", headers=headers, json=IMAGE_REQUEST)
    assert status == 200
    sent = fake_upstream.calls[-1].headers
    assert sent.getall("Authorization") == [f"Bearer {UPSTREAM_KEY}"]
    assert sent.getall("OpenAI-Organization", []) == []
    assert sent.getall("OpenAI-Project", []) == []


# ---------------------------------------------------------------- model allow-list


def restricted(**extra) -> dict:
    return keys({"id": "design-1", "key": OTHER_KEY, "tenant": "design", "models": ["gpt-image-*"], **extra})


async def test_a_model_inside_the_allow_list_passes(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start(restricted())
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=OTHER_KEY, max_retries=0) as client:
        result = await client.images.generate(model="gpt-image-1-mini", prompt="allowed")
    assert result.data
    assert fake_upstream.count("/v1/images/generations") == 1


async def test_a_model_outside_the_allow_list_gets_403(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start(restricted())
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=OTHER_KEY, max_retries=0) as client:
        with pytest.raises(openai.PermissionDeniedError) as raised:
            await client.images.generate(model="dall-e-3", prompt="not allowed")
    assert (raised.value.code, raised.value.param, raised.value.type) == ("model_not_allowed", "model", "invalid_request_error")
    assert fake_upstream.count() == 0


async def test_the_allow_list_applies_to_multipart_requests(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start(restricted())
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=OTHER_KEY, max_retries=0) as client:
        with pytest.raises(openai.PermissionDeniedError):
            await client.images.edit(model="dall-e-2", image=("in.png", PNG, "image/png"), prompt="edit")
    assert fake_upstream.count() == 0


async def test_a_post_without_a_model_on_a_restricted_key_gets_403(gateway_kit, fake_upstream):
    # Without `model` the upstream would pick its default (dall-e-2 for generations): fail closed.
    gateway = await gateway_kit.start(restricted())
    status, _, body = await call(gateway, "POST", "/v1/images/generations", headers=bearer(OTHER_KEY),
                                 json={"prompt": "no model"})
    assert status == 403
    assert error_of(body)["code"] == "model_not_allowed"
    assert fake_upstream.count() == 0


async def test_a_restricted_key_can_still_list_models(gateway_kit):
    gateway = await gateway_kit.start(restricted())
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=OTHER_KEY, max_retries=0) as client:
        models = await client.models.list()
    assert models.data


async def test_a_key_without_models_may_use_any_model(openai_client, fake_upstream):
    await openai_client.images.generate(model="dall-e-3", prompt="anything goes")
    assert fake_upstream.count("/v1/images/generations") == 1


# ---------------------------------------------------------------- rpm


async def test_requests_past_rpm_get_429_with_retry_after(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start(restricted(rpm=2))
    for _ in range(2):
        status, _, _ = await call(gateway, "GET", "/v1/models", headers=bearer(OTHER_KEY))
        assert status == 200
    status, headers, body = await call(gateway, "GET", "/v1/models", headers=bearer(OTHER_KEY))
    assert status == 429
    assert error_of(body)["code"] == "rate_limit_exceeded"
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["x-should-retry"] == "true"
    assert fake_upstream.count() == 2


async def test_sdk_sees_rate_limit_error_past_rpm(gateway_kit):
    gateway = await gateway_kit.start(restricted(rpm=1))
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=OTHER_KEY, max_retries=0) as client:
        await client.models.list()
        with pytest.raises(openai.RateLimitError) as raised:
            await client.models.list()
    assert raised.value.code == "rate_limit_exceeded"
    assert raised.value.response.headers["retry-after"].isdigit()


async def test_rpm_is_counted_per_key(gateway_kit):
    gateway = await gateway_kit.start(restricted(rpm=1))
    assert (await call(gateway, "GET", "/v1/models", headers=bearer(OTHER_KEY)))[0] == 200
    assert (await call(gateway, "GET", "/v1/models", headers=bearer(OTHER_KEY)))[0] == 429
    assert (await call(gateway, "GET", "/v1/models", headers=bearer(CLIENT_KEY)))[0] == 200


async def test_a_request_refused_for_its_model_does_not_use_up_rpm(gateway_kit):
    gateway = await gateway_kit.start(restricted(rpm=1))
    status, _, _ = await call(gateway, "POST", "/v1/images/generations", headers=bearer(OTHER_KEY),
                              json={"model": "dall-e-3", "prompt": "refused"})
    assert status == 403
    assert (await call(gateway, "GET", "/v1/models", headers=bearer(OTHER_KEY)))[0] == 200


def test_the_rpm_window_slides_a_minute_after_each_request(monkeypatch):
    from gatekeeper_plugins import auth

    now = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: now[0])
    limiter = auth.MemoryRateLimiter()
    assert limiter.acquire("k", 2) is None
    now[0] += 20
    assert limiter.acquire("k", 2) is None
    assert limiter.acquire("k", 2) == pytest.approx(40.0)
    now[0] += 40  # the first request is now exactly a minute old
    assert limiter.acquire("k", 2) is None
    assert limiter.acquire("k", 2) == pytest.approx(20.0)


# ---------------------------------------------------------------- config validation


def load(auth: dict, **upstream) -> None:
    raw = {"upstream": {"api_key": UPSTREAM_KEY, **upstream}, "auth": auth}
    build_hooks(parse_config(raw, path="gk.toml"))


def test_the_upstream_key_as_a_client_key_is_refused_at_load_naming_the_key_id():
    with pytest.raises(ConfigError) as raised:
        load({"keys": [{"id": "sneaky", "key": UPSTREAM_KEY, "tenant": "t"}]})
    assert "sneaky" in str(raised.value) and "upstream" in str(raised.value) and "gk.toml" in str(raised.value)
    assert UPSTREAM_KEY not in str(raised.value)


def test_the_upstream_key_given_as_sha256_is_refused_at_load():
    digest = hashlib.sha256(UPSTREAM_KEY.encode()).hexdigest()
    with pytest.raises(ConfigError, match="sneaky"):
        load({"keys": [{"id": "sneaky", "key_sha256": digest, "tenant": "t"}]})


def test_the_upstream_key_as_an_admin_key_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"admin_keys\[0\].*upstream"):
        load({"admin_keys": [UPSTREAM_KEY]})


def test_a_named_upstreams_key_is_refused_as_a_client_key():
    raw = {"upstreams": {"backup": {"api_key": "sk-backup-upstream-key"}},
           "auth": {"keys": [{"id": "sneaky", "key": "sk-backup-upstream-key", "tenant": "t"}]}}
    with pytest.raises(ConfigError, match="sneaky"):
        build_hooks(parse_config(raw, path="gk.toml"))


@pytest.mark.parametrize(("entry", "message"), [
    ({"id": "a", "tenant": "t"}, "exactly one of `key` and `key_sha256`"),
    ({"id": "a", "tenant": "t", "key": OTHER_KEY, "key_sha256": "0" * 64}, "exactly one of `key` and `key_sha256`"),
    ({"id": "a", "tenant": "t", "key_sha256": "abc"}, "64 hex digits"),
    ({"id": "a", "tenant": "t", "key": ""}, "empty"),
    ({"id": "a", "tenant": "t", "key": "sk gk"}, "whitespace"),
    ({"id": "admin-9", "tenant": "t", "key": OTHER_KEY}, "must not start with 'admin-'"),
    ({"id": "a", "tenant": "", "key": OTHER_KEY}, "tenant must not be empty"),
    ({"id": "a", "tenant": "t", "key": OTHER_KEY, "models": []}, "models is an empty list"),
    ({"id": "a", "tenant": "t", "key": OTHER_KEY, "rpm": 0}, "rpm must be at least 1"),
    ({"id": "a", "tenant": "t", "key": OTHER_KEY, "department": "x", "labels": {"department": "y"}}, "department"),
    ({"id": "a", "tenant": "t", "key": OTHER_KEY, "expires": "soon"}, r"\[auth.keys\[0\].expires\]"),
    ({"id": "a", "tenant": "t", "key": OTHER_KEY, "colour": "red"}, r"\[auth.keys\[0\].colour\]"),
])
def test_a_bad_key_entry_is_refused_naming_the_entry_and_file(entry, message):
    with pytest.raises(ConfigError, match=message) as raised:
        load({"keys": [entry]})
    assert "gk.toml" in str(raised.value)
    assert OTHER_KEY not in str(raised.value)


def test_two_entries_with_the_same_id_are_refused():
    with pytest.raises(ConfigError, match="ids must be unique"):
        load({"keys": [{"id": "a", "tenant": "t", "key": OTHER_KEY}, {"id": "a", "tenant": "t", "key": CLIENT_KEY}]})


def test_the_same_key_under_two_ids_is_refused():
    with pytest.raises(ConfigError, match="client key id 'b' is the same key as client key id 'a'"):
        load({"keys": [{"id": "a", "tenant": "t", "key": OTHER_KEY}, {"id": "b", "tenant": "t", "key": OTHER_KEY}]})


def test_a_key_listed_as_both_admin_and_client_key_is_refused():
    with pytest.raises(ConfigError, match="same key as admin_keys"):
        load({"admin_keys": [OTHER_KEY], "keys": [{"id": "a", "tenant": "t", "key": OTHER_KEY}]})


def test_auth_section_is_validated_even_when_auth_is_blocked():
    raw = {"plugins": {"blocked": ["auth"]}, "auth": {"keys": [{"id": "a", "tenant": "t", "key": OTHER_KEY, "rpm": "x"}]}}
    with pytest.raises(ConfigError, match=r"auth.keys\[0\].rpm"):
        build_hooks(parse_config(raw, path="gk.toml"))


# ---------------------------------------------------------------- live reload


async def test_reload_swaps_the_key_table_while_a_request_is_in_flight(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start()
    fake_upstream.inject(path="/v1/models", status=200, delay_s=1.0)
    in_flight = asyncio.create_task(call(gateway, "GET", "/v1/models", headers=bearer(CLIENT_KEY)))
    while fake_upstream.count("/v1/models") == 0:
        await asyncio.sleep(0.01)
    fresh = parse_config(gateway_kit.config_dict({"auth": {"keys": [{"id": "new-1", "key": OTHER_KEY, "tenant": "n"}]}}),
                         path="reloaded.toml")
    await gateway.gateway.hooks.call_all("reload_config", gateway=gateway.gateway, config=fresh)
    assert (await call(gateway, "GET", "/v1/models", headers=bearer(OTHER_KEY)))[0] == 200
    assert (await call(gateway, "GET", "/v1/models", headers=bearer(CLIENT_KEY)))[0] == 401
    status, _, _ = await in_flight  # admitted under the old table, it finishes normally
    assert status == 200


async def test_an_invalid_reload_keeps_the_old_keys(gateway_kit):
    gateway = await gateway_kit.start()
    fresh = parse_config(gateway_kit.config_dict({"auth": {"keys": [{"id": "x", "tenant": "t"}]}}), path="bad.toml")
    with pytest.raises(ConfigError):
        auth_plugin(gateway).reload_config(fresh)
    assert (await call(gateway, "GET", "/v1/models", headers=bearer(CLIENT_KEY)))[0] == 200


async def test_ready_reports_how_many_keys_are_loaded(gateway):
    status, _, body = await call(gateway, "GET", "/ready")
    assert status == 200
    assert msgspec.json.decode(body)["plugins"]["auth"] == {"ready": True, "client_keys": 1, "admin_keys": 1}


def test_the_commented_auth_example_in_config_toml_is_valid(tmp_path):
    from pathlib import Path

    from gatekeeper.config import load_config

    shipped = (Path(__file__).resolve().parents[2] / "config.toml").read_text()
    start = shipped.index("\n[auth]\n") + 1
    following = re.search(r"(?m)^\[", shipped[start + 1:])  # the next section, if any
    section = shipped[start:start + 1 + following.start()] if following else shipped[start:]
    uncommented = re.sub(r"(?m)^# (?=\[\[auth\.keys\]\]|[a-z_]+ = )", "", section)
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'[upstream]\napi_key = "{UPSTREAM_KEY}"\n' + uncommented)
    environ = {"GATEKEEPER_ADMIN_KEY": ADMIN_KEY, "DESIGN_KEY": OTHER_KEY}
    plugin = build_hooks(load_config(config_file, environ=environ)).hooks.pm.get_plugin("auth")
    (record,) = plugin.table.clients.values()
    assert record.principal == Principal(key_id="design-1", tenant="design", models=("gpt-image-*",),
                                         labels={"cost_center": "cc-42", "department": "marketing"})
    assert record.rpm == 60 and len(plugin.table.admins) == 1
