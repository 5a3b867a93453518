"""`gatekeeper_http_requests_total`: every /v1 request in Prometheus, by API and status,
metered or not, answered or refused; a path outside OpenAI's APIs counts as `other`."""

from __future__ import annotations

import re

import aiohttp
import openai

from gatekeeper.testing.kit import CLIENT_KEY

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


def counts(metrics: str) -> dict[tuple[str, str], float]:
    return {(api, status): float(value) for api, status, value in re.findall(
        r'^gatekeeper_http_requests_total\{api="([^"]+)",status="([^"]+)"\} (\S+)$', metrics, re.M)}


async def test_every_v1_request_is_counted_by_api_and_status(gateway_kit):
    gateway = await gateway_kit.start({"server": {"max_body_bytes": 100_000}})
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        for _ in range(2):
            await client.images.generate(model="gpt-image-1.5", prompt="a lighthouse")
        await client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
        await client.models.list()
    async with aiohttp.ClientSession() as session:
        for path, body in (("/v1/images/generations", b"x" * 200_000), ("/v1/nonsense/route", b"{}"),
                           ("/v1/x-" + "a" * 50, b"{}")):
            async with session.post(gateway.url + path, data=body, headers=AUTH) as response:
                await response.read()
        async with session.get(gateway.url + "/v1/models", headers={"Authorization": "Bearer sk-wrong"}) as response:
            assert response.status == 401
        async with session.get(gateway.url + "/metrics") as response:
            metrics = await response.text()
    assert counts(metrics) == {
        ("files", "200"): 1, ("images", "200"): 2, ("images", "413"): 1, ("models", "200"): 1, ("models", "401"): 1,
        ("other", "404"): 2,
    }


async def test_the_in_flight_gauge_is_the_cores_and_stays_without_metering(gateway_kit):
    gateway = await gateway_kit.start({"plugins": {"blocked": ["metering"]}})
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/metrics") as response:
            metrics = await response.text()
    assert re.search(r"^gatekeeper_in_flight_requests 0\.0$", metrics, re.M)
    assert "gatekeeper_requests_total" not in metrics  # metering's own counters went with it
