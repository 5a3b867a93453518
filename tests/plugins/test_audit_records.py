"""One audit record per request, answered or refused, through a real gateway and the openai SDK."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gatekeeper import hookimpl
from gatekeeper.errors import GatewayError
from gatekeeper.flow import Flow
from gatekeeper.server import RunningGateway
from gatekeeper.testing.fake_upstream import FakeUpstream, png_bytes
from gatekeeper.testing.kit import CLIENT_KEY, UPSTREAM_KEY, GatewayKit

GATEKEEPER = [sys.executable, "-m", "gatekeeper"]
PINNED_FIELDS = {
    "seq", "time_start", "time_end", "latency_ms", "request_id", "upstream_request_id", "openai_organization",
    "openai_project", "tenant", "key_id", "client_ip", "method", "path", "model", "params", "prompt_sha256",
    "input_image_sha256", "output_image_sha256", "c2pa", "status", "outcome", "cache", "attempts", "usage",
    "cost_usd", "prev",
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def record_of(path: Path, request_id: str) -> dict[str, Any]:
    matches = [r for r in read_records(path) if r.get("request_id") == request_id]
    assert len(matches) == 1, f"expected one record for {request_id}, found {len(matches)}"
    return matches[0]


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "gatekeeper-audit.jsonl"


@pytest.fixture
async def sdk(gateway: RunningGateway) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        yield client


@pytest.fixture
async def upstream_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[GatewayKit]]]:
    """Start a fake upstream with options (c2pa, organization, project) and a gateway kit on it."""
    started: list[tuple[FakeUpstream, GatewayKit]] = []

    async def start(**options: Any) -> GatewayKit:
        upstream = FakeUpstream(api_key=UPSTREAM_KEY, **options)
        kit = GatewayKit(await upstream.start(), tmp_path)
        started.append((upstream, kit))
        return kit

    yield start
    for upstream, kit in started:
        await kit.stop_all()
        await upstream.stop()


# ------------------------------------------------------------------ answered requests


async def test_generation_record_says_who_asked_what_and_which_upstream_ids_answered(sdk, audit_path):
    raw = await sdk.images.with_raw_response.generate(
        model="gpt-image-1.5", prompt="a red fox in the snow", size="1024x1024", quality="low", n=2)
    response = raw.parse()
    record = record_of(audit_path, raw.headers["x-gatekeeper-request-id"])
    assert record["type"] == "request"
    assert record["upstream_request_id"] == raw.headers["x-request-id"]
    assert record["openai_organization"] == "org-fake"
    assert (record["tenant"], record["key_id"], record["client_ip"]) == ("test", "test-1", "127.0.0.1")
    assert (record["method"], record["path"], record["model"]) == ("POST", "/v1/images/generations", "gpt-image-1.5")
    assert record["params"] == {"size": "1024x1024", "quality": "low", "n": 2, "output_format": None,
                                "background": None}
    assert record["prompt_sha256"] == sha("a red fox in the snow".encode())
    assert record["output_image_sha256"] == [sha(base64.b64decode(item.b64_json)) for item in response.data]
    assert (record["status"], record["outcome"], record["attempts"]) == (200, "ok", 1)
    assert record["time_start"] <= record["time_end"]
    assert record["latency_ms"] > 0


async def test_every_pinned_field_is_in_every_request_record(sdk, audit_path):
    await sdk.images.generate(model="gpt-image-1.5", prompt="fields")
    with pytest.raises(openai.BadRequestError):
        await sdk.images.generate(model="no-such-model", prompt="fields")
    records = read_records(audit_path)
    assert len(records) == 2
    for record in records:
        assert PINNED_FIELDS <= set(record)
        assert "prompt" not in record


async def test_the_record_carries_the_usage_and_cost_metering_set(gateway_kit, audit_path):
    class SeenByAudit:
        """Runs after metering (tryfirst) and before audit: sees exactly what audit sees."""

        name = "test-seen-by-audit"
        usage: Any = None
        cost: Any = None

        @hookimpl
        def exchange_complete(self, flow: Flow) -> None:
            self.usage, self.cost = flow.usage, flow.cost_usd

    seen = SeenByAudit()
    gateway = await gateway_kit.start(plugins=[seen])
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        raw = await client.images.with_raw_response.generate(model="gpt-image-1.5", prompt="priced", quality="low")
    record = record_of(audit_path, raw.headers["x-gatekeeper-request-id"])
    assert record["usage"] == raw.parse().usage.model_dump(exclude_none=True) == seen.usage
    assert seen.cost is not None and seen.cost > 0
    assert Decimal(record["cost_usd"]) == seen.cost


async def test_the_openai_project_header_is_recorded(upstream_factory, audit_path):
    kit = await upstream_factory(organization="org-audit", project="proj_audit")
    gateway = await kit.start()
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        raw = await client.images.with_raw_response.generate(model="gpt-image-1.5", prompt="billed")
    record = record_of(audit_path, raw.headers["x-gatekeeper-request-id"])
    assert (record["openai_organization"], record["openai_project"]) == ("org-audit", "proj_audit")


async def test_a_stream_record_hashes_the_completed_images_only(sdk, audit_path):
    stream = await sdk.images.generate(model="gpt-image-1.5", prompt="streamed", stream=True, partial_images=2)
    completed, partials = [], []
    async for event in stream:
        (completed if event.type == "image_generation.completed" else partials).append(event.b64_json)
    assert len(partials) == 2
    records = read_records(audit_path)
    assert records[-1]["output_image_sha256"] == [sha(base64.b64decode(completed[0]))]
    assert records[-1]["outcome"] == "ok"


async def test_an_image_made_by_the_responses_image_generation_tool_is_recorded_like_any_other(sdk, audit_path, tmp_path):
    """An app that asks for images through the Responses API leaves the same trail (contract 4.4)."""
    raw = await sdk.responses.with_raw_response.create(
        model="gpt-4.1", input="draw a lighthouse", tools=[{"type": "image_generation"}])
    (call,) = [item for item in raw.parse().output if item.type == "image_generation_call"]
    record = record_of(audit_path, raw.headers["x-gatekeeper-request-id"])
    assert (record["path"], record["model"]) == ("/v1/responses", "gpt-4.1")
    assert record["output_image_sha256"] == [sha(base64.b64decode(call.result))]
    assert record["c2pa"] == [False]

    saved = tmp_path / "lighthouse.png"
    saved.write_bytes(base64.b64decode(call.result))
    found = await asyncio.to_thread(run_cli, "find-image", str(saved), "--path", str(audit_path))
    assert found.returncode == 0 and json.loads(found.stdout)["request_id"] == record["request_id"]


async def test_a_responses_stream_records_the_final_image_of_each_call_not_its_partials(sdk, audit_path):
    stream = await sdk.responses.create(model="gpt-4.1", input="draw a fox", stream=True,
                                        tools=[{"type": "image_generation", "partial_images": 2}])
    finals, partials = [], 0
    async for event in stream:
        partials += event.type == "response.image_generation_call.partial_image"
        if event.type == "response.output_item.done" and event.item.type == "image_generation_call":
            finals.append(event.item.result)
    assert partials == 2 and len(finals) == 1
    assert read_records(audit_path)[-1]["output_image_sha256"] == [sha(base64.b64decode(finals[0]))]


async def test_a_responses_request_without_the_image_tool_records_no_images(sdk, audit_path):
    await sdk.responses.create(model="gpt-4.1", input="just words")
    assert read_records(audit_path)[-1]["output_image_sha256"] is None


async def test_a_multipart_edit_records_the_hash_of_every_input_image_and_the_mask(sdk, audit_path):
    first, second, mask = png_bytes("first"), png_bytes("second"), png_bytes("mask")
    raw = await sdk.images.with_raw_response.edit(
        model="gpt-image-1.5", prompt="make it blue", n=1,
        image=[("a.png", first, "image/png"), ("b.png", second, "image/png")], mask=("m.png", mask, "image/png"))
    record = record_of(audit_path, raw.headers["x-gatekeeper-request-id"])
    assert record["input_image_sha256"] == [sha(first), sha(second), sha(mask)]
    assert record["prompt_sha256"] == sha(b"make it blue")
    assert record["params"]["n"] == 1
    assert len(record["output_image_sha256"]) == 1


@pytest.mark.parametrize("blocked", [[], ["normalize"]], ids=["hashes-from-normalize", "hashed-by-audit"])
async def test_a_large_edit_records_the_same_input_hashes_with_or_without_normalize(gateway_kit, audit_path, blocked):
    big = png_bytes("big") + bytes(range(256)) * 1200  # over 300 KB: hashed off the event loop
    mask = png_bytes("mask")
    gateway = await gateway_kit.start({"plugins": {"blocked": blocked}})
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        raw = await client.images.with_raw_response.edit(
            model="gpt-image-1.5", prompt="bigger", image=("big.png", big, "image/png"),
            mask=("m.png", mask, "image/png"))
    record = record_of(audit_path, raw.headers["x-gatekeeper-request-id"])
    assert record["input_image_sha256"] == [sha(big), sha(mask)]


async def test_a_json_edit_records_hashes_of_its_image_references(gateway, audit_path):
    image = png_bytes("by-url")
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    body = {"model": "gpt-image-1.5", "prompt": "edit by reference",
            "images": [{"image_url": data_url}, {"file_id": "file-abc123"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.base_url + "/images/edits", json=body,
                                headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as response:
            assert response.status == 200, await response.text()
            request_id = response.headers["x-gatekeeper-request-id"]
    record = record_of(audit_path, request_id)
    assert record["input_image_sha256"] == [sha(image), sha(b"file-abc123")]


# ------------------------------------------------------------------ refused and failed requests


async def test_an_auth_failure_is_recorded_as_auth_fail(gateway, audit_path):
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key="sk-gk-not-a-key", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.images.generate(model="gpt-image-1.5", prompt="who am i")
    record = record_of(audit_path, caught.value.response.headers["x-gatekeeper-request-id"])
    assert (record["status"], record["outcome"], record["error"]) == (401, "auth_fail", "invalid_api_key")
    assert (record["tenant"], record["key_id"], record["upstream_request_id"]) == (None, None, None)
    assert record["prompt_sha256"] == sha(b"who am i")


async def test_a_refused_request_is_recorded_as_rejected_and_never_forwarded(gateway_kit, fake_upstream, audit_path):
    class Budget:
        name = "test-budget"

        @hookimpl
        def check_request(self, flow: Flow) -> None:
            raise GatewayError(429, "Monthly budget exhausted.", code="budget_exceeded")

    gateway = await gateway_kit.start(plugins=[Budget()])
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.images.generate(model="gpt-image-1.5", prompt="over budget")
    record = record_of(audit_path, caught.value.response.headers["x-gatekeeper-request-id"])
    assert (record["status"], record["outcome"], record["error"]) == (429, "rejected", "budget_exceeded")
    assert (record["tenant"], record["attempts"]) == ("test", 0)
    assert fake_upstream.count("/v1/images/generations") == 0


async def test_an_upstream_error_is_recorded_with_the_upstream_ids(sdk, fake_upstream, audit_path):
    fake_upstream.inject(path="/v1/images/generations", status=500)
    with pytest.raises(openai.InternalServerError) as caught:
        await sdk.images.generate(model="gpt-image-1.5", prompt="boom")
    record = record_of(audit_path, caught.value.response.headers["x-gatekeeper-request-id"])
    assert (record["status"], record["outcome"]) == (500, "upstream_error")
    assert record["upstream_request_id"] == caught.value.response.headers["x-request-id"]
    assert record["output_image_sha256"] is None


async def test_a_stream_cut_by_the_upstream_is_recorded_as_truncated(sdk, fake_upstream, audit_path):
    fake_upstream.inject(path="/v1/images/generations", status=200, cut_after_events=1)
    with pytest.raises(openai.APIError):
        stream = await sdk.images.generate(model="gpt-image-1.5", prompt="cut", stream=True, partial_images=2)
        async for _ in stream:
            pass
    records = await eventually(lambda: [r for r in read_records(audit_path) if r["outcome"] == "truncated"])
    assert records[0]["output_image_sha256"] is None
    assert records[0]["upstream_request_id"]


async def test_a_client_that_goes_away_is_recorded_as_client_abort(gateway, fake_upstream, audit_path):
    fake_upstream.inject(path="/v1/images/generations", status=200, delay_s=2.0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.post(gateway.base_url + "/images/generations",
                               headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                               json={"model": "gpt-image-1.5", "prompt": "never mind"})
    records = await eventually(lambda: audit_path.exists() and read_records(audit_path))
    assert [(r["outcome"], r["error"]) for r in records] == [("client_abort", "ConnectionResetError")]
    assert records[0]["prompt_sha256"] == sha(b"never mind")


# ------------------------------------------------------------------ secrets and prompts


async def test_no_client_key_upstream_key_or_prompt_text_is_in_any_line(sdk, gateway, audit_path):
    prompt = "a confidential launch poster for project nightingale"
    await sdk.images.generate(model="gpt-image-1.5", prompt=prompt)
    stream = await sdk.images.generate(model="gpt-image-1.5", prompt=prompt, stream=True)
    async for _ in stream:
        pass
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=UPSTREAM_KEY, max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            await wrong.images.generate(model="gpt-image-1.5", prompt=prompt)
    content = audit_path.read_bytes()
    assert len(read_records(audit_path)) == 3
    assert sha(prompt.encode()).encode() in content
    for secret in (CLIENT_KEY, UPSTREAM_KEY, prompt, "nightingale"):
        assert secret.encode() not in content


async def test_log_prompts_keeps_the_prompt_text(gateway_kit, audit_path):
    gateway = await gateway_kit.start({"audit": {"log_prompts": True}})
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        raw = await client.images.with_raw_response.generate(model="gpt-image-1.5", prompt="café at dawn")
    record = record_of(audit_path, raw.headers["x-gatekeeper-request-id"])
    assert record["prompt"] == "café at dawn"
    assert record["prompt_sha256"] == sha("café at dawn".encode())


async def test_log_prompts_can_be_turned_on_by_a_config_reload(gateway, sdk, fake_upstream, audit_path, tmp_path):
    from gatekeeper.config import parse_config
    from gatekeeper.testing.kit import base_config, deep_merge

    await sdk.images.generate(model="gpt-image-1.5", prompt="before the reload")
    reloaded = deep_merge(base_config(fake_upstream.base_url, tmp_path), {"audit": {"log_prompts": True}})
    fresh = parse_config(reloaded, path=str(tmp_path / "test-config.toml"))
    await gateway.gateway.hooks.call_all("reload_config", gateway=gateway.gateway, config=fresh)
    await sdk.images.generate(model="gpt-image-1.5", prompt="after the reload")
    first, second = read_records(audit_path)
    assert "prompt" not in first
    assert second["prompt"] == "after the reload"


# ------------------------------------------------------------------ images: find-image and C2PA


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GATEKEEPER, "audit", *args], capture_output=True, text=True, timeout=60)


async def test_find_image_prints_the_record_of_an_image_saved_from_an_sdk_call(sdk, audit_path, tmp_path):
    raw = await sdk.images.with_raw_response.generate(model="gpt-image-1.5", prompt="a lighthouse", n=2)
    saved = tmp_path / "lighthouse.png"
    saved.write_bytes(base64.b64decode(raw.parse().data[1].b64_json))
    await sdk.images.generate(model="gpt-image-1.5", prompt="something else")

    found = await asyncio.to_thread(run_cli, "find-image", str(saved), "--path", str(audit_path))

    assert found.returncode == 0, found.stderr
    lines = found.stdout.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["request_id"] == raw.headers["x-gatekeeper-request-id"]
    assert sha(saved.read_bytes()) in record["output_image_sha256"]


async def test_find_image_exits_non_zero_for_an_image_the_gateway_never_returned(sdk, audit_path, tmp_path):
    await sdk.images.generate(model="gpt-image-1.5", prompt="a lighthouse")
    stranger = tmp_path / "stranger.png"
    stranger.write_bytes(png_bytes("never generated"))
    found = await asyncio.to_thread(run_cli, "find-image", str(stranger), "--path", str(audit_path))
    assert found.returncode == 1
    assert found.stdout == ""
    assert "no audit record" in found.stderr


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
async def test_c2pa_is_recorded_true_when_returned_images_carry_a_manifest(upstream_factory, audit_path, output_format):
    kit = await upstream_factory(c2pa=True)
    gateway = await kit.start()
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        response = await client.images.generate(model="gpt-image-1.5", prompt="signed", n=2,
                                                output_format=output_format)
    record = read_records(audit_path)[-1]
    assert record["c2pa"] == [True, True]
    assert record["output_image_sha256"] == [sha(base64.b64decode(d.b64_json)) for d in response.data]


async def test_c2pa_is_recorded_false_when_returned_images_carry_none(sdk, audit_path):
    await sdk.images.generate(model="gpt-image-1.5", prompt="unsigned")
    assert read_records(audit_path)[-1]["c2pa"] == [False]


# ------------------------------------------------------------------ cache hits


async def test_a_cache_hit_reuses_the_stored_image_facts_without_decoding_again(gateway_kit, audit_path, monkeypatch):
    import gatekeeper_plugins.audit as audit_module

    decoded: list[int] = []
    real = audit_module.analyze_images_body

    def counting(body: bytes, event_stream: bool):
        decoded.append(len(body))
        return real(body, event_stream)

    monkeypatch.setattr(audit_module, "analyze_images_body", counting)
    gateway = await gateway_kit.start()
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        miss = await client.images.with_raw_response.generate(model="gpt-image-1.5", prompt="cached")
        hit = await client.images.with_raw_response.generate(model="gpt-image-1.5", prompt="cached")
    assert hit.headers["x-gatekeeper-cache"] == "HIT"
    assert len(decoded) == 1
    miss_record = record_of(audit_path, miss.headers["x-gatekeeper-request-id"])
    hit_record = record_of(audit_path, hit.headers["x-gatekeeper-request-id"])
    assert (hit_record["outcome"], hit_record["cache"]) == ("cache_hit", "HIT")
    assert hit_record["output_image_sha256"] == miss_record["output_image_sha256"]
    assert hit_record["c2pa"] == miss_record["c2pa"] == [False]


# ------------------------------------------------------------------ search


def search(*args: str) -> list[dict[str, Any]]:
    from gatekeeper.cli import main

    import contextlib
    import io

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    with contextlib.redirect_stdout(out):
        assert main(["audit", "search", *args]) == 0
    out.flush()
    return [json.loads(line) for line in out.buffer.getvalue().splitlines()]


async def test_search_filters_by_tenant_since_and_upstream_request_id(gateway, sdk, audit_path):
    first = await sdk.images.with_raw_response.generate(model="gpt-image-1.5", prompt="one")
    second = await sdk.images.with_raw_response.generate(model="gpt-image-1.5", prompt="two")
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key="sk-gk-nobody", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            await stranger.images.generate(model="gpt-image-1.5", prompt="three")
    path = ["--path", str(audit_path)]

    assert len(search(*path)) == 3
    assert [r["request_id"] for r in search(*path, "--tenant", "test")] == [
        first.headers["x-gatekeeper-request-id"], second.headers["x-gatekeeper-request-id"]]
    by_upstream = search(*path, "--upstream-request-id", second.headers["x-request-id"])
    assert [r["request_id"] for r in by_upstream] == [second.headers["x-gatekeeper-request-id"]]
    assert len(search(*path, "--since", "1h")) == 3
    tomorrow = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)).date().isoformat()
    assert search(*path, "--since", tomorrow) == []
    assert [r["outcome"] for r in search(*path, "--outcome", "auth_fail")] == ["auth_fail"]


async def test_ready_reports_the_audit_log_head(gateway, sdk):
    await sdk.images.generate(model="gpt-image-1.5", prompt="ready")
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/ready") as response:
            report = await response.json()
    assert response.status == 200
    assert report["plugins"]["audit"]["ready"] is True
    assert report["plugins"]["audit"]["seq"] == 1
    assert report["plugins"]["audit"]["error"] is None
