"""The optional tracing plugin: one OpenTelemetry span per request, exported over OTLP/HTTP to a
collector (here a real one on loopback that decodes the protobuf export), a child of the client's
traceparent, with the tenant, model, cache status, tokens and cost the other plugins found."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from gatekeeper import hookimpl
from gatekeeper.config import ConfigError, load_config
from gatekeeper.errors import GatewayError
from gatekeeper.plugins import build_hooks
from gatekeeper.testing.kit import CLIENT_KEY, UPSTREAM_KEY
from gatekeeper_plugins.tracing import TracingConfig

PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


class Collector:
    """An OTLP/HTTP trace receiver: each export's spans, with their attributes as a dict."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.arrived = asyncio.Event()

    async def receive(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        self.headers.append(dict(request.headers))
        for resource_spans in export.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append({
                        "name": span.name, "service": service, "kind": span.kind, "status": span.status.code,
                        "trace_id": span.trace_id.hex(), "parent_span_id": span.parent_span_id.hex(),
                        "duration_ns": span.end_time_unix_nano - span.start_time_unix_nano,
                        "attributes": {a.key: _value(a.value) for a in span.attributes},
                    })
        self.arrived.set()
        return web.Response(body=b"", content_type="application/x-protobuf")


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value"))


@pytest.fixture
async def collector(custom_upstream) -> tuple[Collector, str]:
    receiver = Collector()
    base = await custom_upstream(receiver.receive)  # an aiohttp app on loopback, answering any path
    return receiver, base.removesuffix("/v1") + "/v1/traces"


def tracing(endpoint: str, **settings: Any) -> dict[str, Any]:
    return {"plugins": {"modules": ["gatekeeper_plugins.tracing"]},
            "tracing": {"endpoint": endpoint, "service_name": "gk-test", **settings}}


async def test_a_miss_and_a_hit_become_two_server_spans_under_the_clients_trace(gateway_kit, collector):
    receiver, endpoint = collector
    gateway = await gateway_kit.start(tracing(endpoint))
    traceparent = f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0,
                                default_headers={"traceparent": traceparent})
    for _ in range(2):
        await client.images.generate(model="gpt-image-1.5", prompt="a traced fox", quality="low")
    await client.close()
    await gateway_kit.stop_all()  # the plugin's shutdown exports what the batch still holds

    miss, hit = receiver.spans
    for span in (miss, hit):
        assert (span["name"], span["service"], span["kind"]) == ("POST /v1/images/generations", "gk-test", 2)  # SERVER
        assert (span["trace_id"], span["parent_span_id"]) == (PARENT_TRACE, PARENT_SPAN)
        assert span["duration_ns"] > 0 and span["status"] == 0  # unset: not an error
        attributes = span["attributes"]
        assert attributes["http.response.status_code"] == 200 and attributes["http.route"] == "/v1/images/generations"
        assert (attributes["gatekeeper.tenant"], attributes["gatekeeper.key_id"]) == ("test", "test-1")
        assert attributes["gen_ai.request.model"] == "gpt-image-1.5"
    assert (miss["attributes"]["gatekeeper.cache"], hit["attributes"]["gatekeeper.cache"]) == ("MISS", "HIT")
    assert miss["attributes"]["gen_ai.usage.output_tokens"] > 0
    assert "gen_ai.usage.output_tokens" not in hit["attributes"]  # a hit used no tokens upstream
    assert miss["attributes"]["gatekeeper.cost_usd"] > 0 and "gatekeeper.upstream_request_id" in miss["attributes"]
    assert miss["attributes"]["gatekeeper.upstream"] == "default"
    assert 0 < miss["attributes"]["gatekeeper.upstream_latency_s"] < miss["duration_ns"] / 1e9
    assert "gatekeeper.upstream_latency_s" not in hit["attributes"]
    assert hit["attributes"]["gatekeeper.saved_usd"] == miss["attributes"]["gatekeeper.cost_usd"]


async def test_a_5xx_is_an_error_span_and_a_4xx_is_not_whoever_refused(gateway_kit, fake_upstream, collector):
    receiver, endpoint = collector
    gateway = await gateway_kit.start(tracing(endpoint))
    fake_upstream.inject(path="/v1/images/generations", status=500)
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError):
        await client.images.generate(model="gpt-image-1.5", prompt="a failing fox")
    with pytest.raises(openai.BadRequestError):  # the upstream refuses it
        await client.images.generate(model="gpt-image-1.5", prompt="a fox", size="999x999")
    with pytest.raises(openai.AuthenticationError):  # the gateway refuses it
        await openai.AsyncOpenAI(base_url=gateway.base_url, api_key="sk-wrong", max_retries=0).models.list()
    await client.close()
    await gateway_kit.stop_all()
    failed, upstream_refused, refused = receiver.spans
    assert (failed["status"], failed["attributes"]["gatekeeper.outcome"]) == (2, "upstream_error")  # ERROR
    assert (upstream_refused["status"], upstream_refused["attributes"]["http.response.status_code"]) == (0, 400)
    assert (refused["name"], refused["status"], refused["attributes"]["http.response.status_code"]) == (
        "GET /v1/models", 0, 401)
    assert "gatekeeper.tenant" not in refused["attributes"]
    assert len({span["trace_id"] for span in receiver.spans}) == 3  # no client trace: each request its own


async def test_sample_ratio_zero_exports_nothing_but_a_sampled_parent_is_still_followed(gateway_kit, collector):
    receiver, endpoint = collector
    gateway = await gateway_kit.start(tracing(endpoint, sample_ratio=0.0, headers={"x-collector-token": "t0k3n-1"}))
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        await client.models.list()
        await client.models.list(extra_headers={"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"})
    await gateway_kit.stop_all()
    (followed,) = receiver.spans
    assert followed["trace_id"] == PARENT_TRACE
    assert receiver.headers[0]["x-collector-token"] == "t0k3n-1"


async def test_a_sample_ratio_outside_0_to_1_is_a_config_error(gateway_kit):
    with pytest.raises(ConfigError, match="sample_ratio"):
        await gateway_kit.start(tracing("http://127.0.0.1:9/v1/traces", sample_ratio=1.5))


async def test_without_opentelemetry_installed_the_plugin_refuses_to_load_and_says_what_to_install(
        gateway_kit, monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if the package were missing
    with pytest.raises(ConfigError, match=r"pip install 'gatekeeper\[tracing\]'"):
        await gateway_kit.start(tracing("http://127.0.0.1:9/v1/traces"))


def test_the_commented_tracing_section_in_config_toml_is_valid_once_uncommented(tmp_path):
    shipped = (Path(__file__).resolve().parents[2] / "config.toml").read_text()
    section = shipped[shipped.index("\n# [tracing]\n") + 1:]
    uncommented = re.sub(r"(?m)^# (?=\[tracing\]|[a-z_]+ = )", "", section)
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'[upstream]\napi_key = "{UPSTREAM_KEY}"\n[plugins]\nmodules = ["gatekeeper_plugins.tracing"]\n'
                           + uncommented)
    config = load_config(config_file, environ={"OTEL_COLLECTOR_TOKEN": "collector-token"})
    (tracing_plugin,) = [p.instance for p in build_hooks(config).loaded if p.name == "tracing"]
    assert tracing_plugin.settings == TracingConfig(
        endpoint="http://otel-collector:4318/v1/traces", headers={"authorization": "Bearer collector-token"},
        service_name="gatekeeper", sample_ratio=1.0, export_timeout_s=10)
    assert tracing_plugin.provider is None  # built, not started: no exporter thread left behind


class RefusesAtTheEnd:
    """Fails the flow in exchange_complete, after the tracing plugin's impl ran (as the audit does
    when it cannot write): exchange_error follows for the same flow."""

    name = "refuses-at-the-end"

    @hookimpl(trylast=True)
    def exchange_complete(self, flow) -> None:
        raise GatewayError(503, "Records cannot be written.", code="audit_unavailable")


async def test_a_flow_failed_at_its_end_is_still_one_span_that_says_how_it_ended(gateway_kit, collector):
    receiver, endpoint = collector
    gateway = await gateway_kit.start(tracing(endpoint), plugins=[RefusesAtTheEnd()])
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        with pytest.raises(openai.InternalServerError):
            await client.images.generate(model="gpt-image-1.5", prompt="a fox")
    await gateway_kit.stop_all()
    (span,) = receiver.spans
    assert (span["status"], span["attributes"]["http.response.status_code"]) == (2, 503)
