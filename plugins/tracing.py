"""OpenTelemetry traces: one span per request, sent to an OTLP/HTTP collector (optional plugin).

Not one of the six built-ins that run by default: enable it with ``[plugins] modules =
["gatekeeper_plugins.tracing"]`` and a ``[tracing]`` section, after ``pip install
'gatekeeper[tracing]'``. Each ``/v1`` request becomes a SERVER span named like
``POST /v1/images/generations``, a child of the client's W3C ``traceparent`` when it sends one,
carrying what the other plugins left on the flow: tenant, key id, model, cache status, tokens,
cost, the upstream's request id (OpenTelemetry's HTTP and GenAI attribute names where they
exist, ``gatekeeper.*`` otherwise). The span is built from the flow's own start and end times
once the request is over, on a later turn of the event loop, so the response never waits for it;
the SDK's batch processor exports from its own thread. The client's ``traceparent`` also reaches
the upstream unchanged, as every end-to-end header does.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

import msgspec

from gatekeeper import hookimpl
from gatekeeper.config import Config, ConfigError
from gatekeeper.errors import GatewayError
from gatekeeper.flow import Flow, Outcome
from gatekeeper.logs import get_logger, register_secret

__all__ = ["Plugin", "TracingConfig"]

log = get_logger("gatekeeper.tracing")

# A flow not ended yet is looked at again every 10 ms; one that never ends (a bug elsewhere) still
# gets its span, as it stands, after a minute.
_WAIT_S = 0.01
_MAX_WAITS = 6_000


class TracingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # The collector's traces URL ("http://otel-collector:4318/v1/traces"); empty: the SDK reads
    # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT, else localhost:4318.
    endpoint: str = ""
    headers: dict[str, str] = {}  # sent with every export, e.g. a collector's auth token
    service_name: str = "gatekeeper"
    # Of the requests that arrive without a sampled parent; a client's sampled traceparent is
    # always followed, an unsampled one never.
    sample_ratio: float = 1.0
    export_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError("sample_ratio must be between 0 and 1")
        if self.export_timeout_s <= 0:
            raise ValueError("export_timeout_s must be positive")


class Plugin:
    """Turn every finished flow into one span."""

    name = "tracing"
    config_section = "tracing"
    Config = TracingConfig

    def __init__(self, config: Config, settings: TracingConfig | None) -> None:
        try:  # now, so a missing package is a config error (check-config says so too)
            from opentelemetry.trace import SpanKind, Status, StatusCode
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
            for module in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter"):
                importlib.import_module(module)  # what `startup` imports
        except ImportError:
            raise ConfigError(f"{config.path}: the tracing plugin needs OpenTelemetry: "
                              "pip install 'gatekeeper[tracing]'") from None
        self.settings = settings or TracingConfig()
        for value in self.settings.headers.values():
            register_secret(value)  # a collector token must not reach a log line
        self.provider: Any = None  # made in `startup`: its exporter runs a thread of its own
        self.tracer: Any = None
        self._propagator = TraceContextTextMapPropagator()
        self._server = SpanKind.SERVER
        self._error = Status(StatusCode.ERROR)
        self._waiting: dict[Flow, asyncio.Handle] = {}  # flows whose span is not built yet

    @hookimpl
    def startup(self) -> None:
        """The tracer provider and its batch exporter. Not in `__init__`: a config check, ``gatekeeper
        plugins`` and every SIGHUP's validation build the plugins too, and would each start (and
        never stop) the exporter's thread."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        # A provider of its own, not the global one: an app embedding the gateway keeps its own.
        self.provider = TracerProvider(resource=Resource.create({"service.name": self.settings.service_name}),
                                       sampler=ParentBased(TraceIdRatioBased(self.settings.sample_ratio)))
        exporter = OTLPSpanExporter(endpoint=self.settings.endpoint or None, headers=self.settings.headers or None,
                                    timeout=self.settings.export_timeout_s)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("gatekeeper")

    def describe(self) -> str:
        where = self.settings.endpoint or "the OTEL_EXPORTER_OTLP_* endpoint"
        return f"one span per request to {where} (sampled {self.settings.sample_ratio:g})"

    @hookimpl
    async def shutdown(self) -> None:
        # Requests have drained, so every flow still waiting for its span has ended: record them
        # now, then export what the batch processor holds (blocking, so off the event loop).
        if self.provider is None:  # a start that failed before this plugin's
            return
        for flow, waiting in list(self._waiting.items()):
            waiting.cancel()
            self.record(flow)
        self._waiting.clear()
        await asyncio.to_thread(self.provider.shutdown)

    @hookimpl
    def exchange_complete(self, flow: Flow) -> None:
        """Build the request's span on a later loop turn: the response does not wait for it."""
        self._record_when_ended(flow)

    @hookimpl
    def exchange_error(self, flow: Flow) -> None:
        self._record_when_ended(flow)

    def _record_when_ended(self, flow: Flow, waits: int = 0) -> None:
        """`record` once `flow.ended`: the plugins after this one in `exchange_complete` may still
        wait (the audit's disk write) and may still fail the flow. Looked at again every 10 ms,
        not on every loop turn; once per flow (a failed exchange_complete is followed by
        exchange_error)."""
        loop = asyncio.get_running_loop()
        if not waits:
            if self.name in flow.scratch:
                return
            flow.scratch[self.name] = True
            self._waiting[flow] = loop.call_soon(self._record_when_ended, flow, 1)
        elif not flow.ended and waits < _MAX_WAITS:
            self._waiting[flow] = loop.call_later(_WAIT_S, self._record_when_ended, flow, waits + 1)
        else:
            self._waiting.pop(flow, None)
            self.record(flow)

    def record(self, flow: Flow) -> None:
        """One SERVER span for `flow`, from its start to its end, with what the plugins found."""
        try:
            route = "/v1/" + flow.route if flow.route else flow.path
            parent = self._propagator.extract(flow.headers)
            span = self.tracer.start_span(f"{flow.method} {route}", context=parent, kind=self._server,
                                          start_time=int(flow.time_start * 1e9), attributes=_attributes(flow, route))
            # As OpenTelemetry's HTTP conventions have it for a server: a 5xx is an error, a 4xx
            # (the client's, even when the upstream said it) is not; a stream the upstream cut is.
            if (_status(flow) or 0) >= 500 or flow.outcome == Outcome.TRUNCATED:
                span.set_status(self._error)
            span.end(end_time=int((flow.time_end or flow.time_start) * 1e9))
        except Exception:  # a span is never worth an error on the loop
            log.exception("could not record a span", request_id=flow.request_id)


def _status(flow: Flow) -> int | None:
    """The status the client got: a flow failed at its end (the audit could not write) answers
    with its error's, whatever the upstream said (as the audit record has it)."""
    error = flow.error
    return error.status if isinstance(error, GatewayError) else flow.status


def _attributes(flow: Flow, route: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.request.method": flow.method,
        "http.route": route,
        "url.path": flow.path,
        "gatekeeper.request_id": flow.request_id,
        "gen_ai.system": "openai",
    }
    optional = {
        "http.response.status_code": _status(flow),
        "client.address": flow.client_ip,
        "gatekeeper.outcome": flow.outcome,
        "gatekeeper.cache": flow.cache_status,
        "gatekeeper.upstream": flow.upstream_name if flow.attempts else None,
        "gatekeeper.upstream_request_id": flow.upstream_request_id,
        "gatekeeper.upstream_latency_s": flow.upstream_latency_s,
        "gatekeeper.attempts": flow.attempts or None,
        "gatekeeper.cost_usd": float(flow.cost_usd) if flow.cost_usd is not None else None,
        "gatekeeper.saved_usd": float(flow.saved_usd) if flow.saved_usd else None,
    }
    principal = flow.principal
    if principal is not None:
        optional["gatekeeper.tenant"] = principal.tenant
        optional["gatekeeper.key_id"] = principal.key_id
    model = flow.model
    if model is not None:
        optional["gen_ai.request.model"] = model
    usage = flow.usage
    if isinstance(usage, dict) and flow.outcome != Outcome.CACHE_HIT:  # a hit used no tokens
        for name, key in (("gen_ai.usage.input_tokens", "input_tokens"), ("gen_ai.usage.output_tokens", "output_tokens"),
                          ("gen_ai.usage.input_tokens", "prompt_tokens"),
                          ("gen_ai.usage.output_tokens", "completion_tokens")):
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                optional.setdefault(name, value)
    attributes.update({name: value for name, value in optional.items() if value is not None})
    return attributes
