"""Browser apps: ``[server] cors_allow_origins`` answers preflights and marks /v1 responses, as
api.openai.com does; off by default, and the upstream's own CORS headers never pass through."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from gatekeeper.testing.kit import CLIENT_KEY

APP = "https://app.example.com"
GENERATE = {"model": "gpt-image-1.5", "prompt": "a fox in a browser", "quality": "low"}
# What a browser sends before the openai JS SDK's POST (it adds x-stainless-* headers).
PREFLIGHT = {"Origin": APP, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os,x-stainless-lang"}


async def send(method: str, url: str, headers: dict, body: dict | None = None) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, headers=headers, json=body) as response:
            return response.status, dict(response.headers), await response.read()


def audit_records(tmp_path) -> list[bytes]:
    path = tmp_path / "audit" / "gatekeeper-audit.jsonl"
    return path.read_bytes().splitlines() if path.exists() else []


async def test_a_preflight_is_answered_without_a_key_and_is_not_a_request(gateway_kit, fake_upstream, tmp_path):
    gateway = await gateway_kit.start({"server": {"cors_allow_origins": ["*"]}})
    status, headers, _ = await send("OPTIONS", gateway.base_url + "/images/generations", PREFLIGHT)
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert headers["Access-Control-Allow-Headers"] == PREFLIGHT["Access-Control-Request-Headers"]
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert fake_upstream.count() == 0 and audit_records(tmp_path) == []


async def test_responses_to_a_browser_are_readable_hits_misses_errors_and_streams(gateway_kit, fake_upstream):
    gateway = await gateway_kit.start({"server": {"cors_allow_origins": ["*"]}})
    url = gateway.base_url + "/images/generations"
    browser = {"Origin": APP, "Authorization": f"Bearer {CLIENT_KEY}"}
    answers = [await send("POST", url, browser, GENERATE), await send("POST", url, browser, GENERATE),
               await send("POST", url, {"Origin": APP}, GENERATE),  # no key: 401
               await send("POST", url, browser, {**GENERATE, "stream": True, "partial_images": 1})]
    assert [status for status, _, _ in answers] == [200, 200, 401, 200]
    assert [headers.get("x-gatekeeper-cache") for _, headers, _ in answers[:2]] == ["MISS", "HIT"]
    for _, headers, _ in answers:
        assert headers["Access-Control-Allow-Origin"] == "*"
        assert headers["Access-Control-Expose-Headers"] == "*"  # x-request-id, retry-after: the SDK reads them
    assert b"image_generation.completed" in answers[3][2]


async def test_only_listed_origins_are_answered_and_the_answer_varies_by_origin(gateway_kit):
    gateway = await gateway_kit.start({"server": {"cors_allow_origins": [APP]}})
    url = gateway.base_url + "/images/generations"
    allowed = await send("OPTIONS", url, PREFLIGHT)
    refused = await send("OPTIONS", url, {**PREFLIGHT, "Origin": "https://evil.example"})
    response = await send("POST", url, {"Origin": APP, "Authorization": f"Bearer {CLIENT_KEY}"}, GENERATE)
    assert allowed[1]["Access-Control-Allow-Origin"] == APP and allowed[1]["Vary"] == "Origin"
    assert "Access-Control-Allow-Origin" not in refused[1]
    assert response[1]["Access-Control-Allow-Origin"] == APP and "Origin" in response[1]["Vary"]


async def test_metrics_and_readiness_stay_unreadable_to_other_origins(gateway_kit):
    gateway = await gateway_kit.start({"server": {"cors_allow_origins": ["*"]}})
    for path in ("/metrics", "/ready", "/health"):
        status, headers, _ = await send("GET", gateway.url + path, {"Origin": APP})
        assert status == 200 and "Access-Control-Allow-Origin" not in headers


async def test_off_by_default_and_the_upstreams_cors_headers_never_reach_the_browser(gateway_kit, custom_upstream):
    async def upstream(request: web.Request) -> web.Response:
        return web.json_response({"created": 1, "data": [{"url": "https://example.com/fox.png"}]},
                                 headers={"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": "*"})

    gateway = await gateway_kit.start({"upstream": {"base_url": await custom_upstream(upstream)}})
    url = gateway.base_url + "/images/generations"
    preflight = await send("OPTIONS", url, PREFLIGHT)
    answer = await send("POST", url, {"Origin": APP, "Authorization": f"Bearer {CLIENT_KEY}"}, GENERATE)
    assert preflight[0] == 401  # an OPTIONS like any other request: it needs a key
    assert answer[0] == 200
    assert not [name for name in answer[1] if name.lower().startswith("access-control-")]
