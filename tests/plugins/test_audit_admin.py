"""``GET /admin/audit``: compliance reads this process's records over HTTP with an admin key,
filtered as ``gatekeeper audit search`` filters them, without a shell on the host."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest
from multidict import CIMultiDict

from gatekeeper.testing.kit import ADMIN_KEY, CLIENT_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def get(gateway, query: str = "", headers=ADMIN) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/admin/audit" + query, headers=headers) as response:
            return response.status, response.headers.copy(), await response.read()


async def generate_some(gateway) -> list[str]:
    """Three requests (two generations and one the upstream refuses); their gateway request ids."""
    ids = []
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        for prompt in ("a fox", "a heron"):
            raw = await client.images.with_raw_response.generate(model="gpt-image-1.5", prompt=prompt)
            ids.append(raw.headers["x-gatekeeper-request-id"])
        with pytest.raises(openai.BadRequestError) as refused:
            await client.images.generate(model="gpt-image-1.5", prompt="")
        ids.append(refused.value.response.headers["x-gatekeeper-request-id"])
    return ids


async def test_the_records_come_as_stored_oldest_first(gateway, tmp_path):
    ids = await generate_some(gateway)
    status, headers, body = await get(gateway)
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
    assert headers["x-gatekeeper-truncated"] == "false"
    stored = (tmp_path / "audit" / "gatekeeper-audit.jsonl").read_bytes()
    assert body == stored  # byte for byte: a compliance copy verifies like the file
    assert [json.loads(line)["request_id"] for line in body.splitlines()] == ids


async def test_filters_and_limit(gateway):
    ids = await generate_some(gateway)
    _, _, body = await get(gateway, f"?request_id={ids[1]}")
    assert [json.loads(line)["request_id"] for line in body.splitlines()] == [ids[1]]
    _, _, body = await get(gateway, "?outcome=upstream_error&tenant=test&since=1h")  # the upstream refused it
    assert [json.loads(line)["request_id"] for line in body.splitlines()] == [ids[2]]
    _, headers, body = await get(gateway, "?limit=2")
    assert len(body.splitlines()) == 2 and headers["x-gatekeeper-truncated"] == "true"
    _, _, body = await get(gateway, "?until=2000-01-01")
    assert body == b""


@pytest.mark.parametrize(("query", "param"), [
    ("?since=yesterday", "since"), ("?limit=0", "limit"), ("?limit=many", "limit"), ("?prompt=fox", "prompt"),
])
async def test_a_bad_query_is_a_400_naming_the_parameter(gateway, query, param):
    status, headers, body = await get(gateway, query)
    error = json.loads(body)["error"]
    assert (status, error["code"], error["param"]) == (400, "invalid_audit_query", param)
    assert headers["x-request-id"]


async def test_only_an_admin_key_may_read_the_audit(gateway):
    status, _, body = await get(gateway, headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert status == 403 and json.loads(body)["error"]["code"] == "admin_required"
    status, _, body = await get(gateway, headers={})
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
