"""Cost metering: tokens and dollars per tenant, key and model; cache savings; budgets; reports.

Usage is read from every response on a metered route as it passes: JSON bodies once at the
end (only `usage`, `model` and the image count are decoded), event streams line by line
(`metering_usage.SseUsageScanner`). `exchange_complete` is ``tryfirst`` so that ``flow.usage``,
``flow.cost_usd`` and ``flow.saved_usd`` are set before audit and cache run; on a cache hit the
cache has restored ``flow.usage`` and nothing is re-read. Rows go to SQLite or PostgreSQL in
batches off the response path. Budgets are checked in `before_forward` against a pre-flight
estimate held while the request is in flight. See docs/metering.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from time import perf_counter
from typing import Any

import msgspec
from aiohttp import web

from gatekeeper import hookimpl
from gatekeeper.config import Config, ConfigError, load_config
from gatekeeper.errors import GatewayError
from gatekeeper.flow import Flow, Outcome
from gatekeeper.logs import get_logger, register_url_secrets
from gatekeeper.memo import BoundedMemo
from gatekeeper_plugins.metering_budgets import BudgetLedger, OverBudget, Reservation, estimate_micros
from gatekeeper_plugins.metering_config import MeteringConfig, load_settings, store_from_settings
from gatekeeper_plugins.metering_metrics import MeteringMetrics
from gatekeeper_plugins.metering_prices import PriceBook, Tokens, format_usd, micros_to_usd, round_micros
from gatekeeper_plugins.metering_report import (
    add_budgets_command,
    add_usage_command,
    budget_records,
    parse_query,
    render,
    render_budgets,
    run_report,
)
from gatekeeper_plugins.metering_retention import (
    add_prune_command,
    parse_before,
    prune_once,
    prune_periodically,
    report_pruned,
)
from gatekeeper_plugins.metering_store import UsageRow, UsageStore
from gatekeeper_plugins.metering_usage import (
    IMAGE_ROUTES,
    METERED_ROUTES,
    RequestFacts,
    SseUsageScanner,
    request_facts,
    requested_model,
    summarize_json,
    tokens_from_usage,
)
from gatekeeper_plugins.metering_writer import BatchWriter

__all__ = ["Plugin", "register_commands"]

log = get_logger("gatekeeper.metering")

_WARN_EVERY_S = 300.0
_NAME = "metering"
_PRICED_MEMO_SIZE = 1024

_encode_json = msgspec.json.Encoder().encode


class _FlowState:
    """What metering keeps on one flow (``flow.scratch["metering"]``)."""

    __slots__ = ("facts", "reservation", "scanner")

    def __init__(self) -> None:
        self.facts: RequestFacts | None = None
        self.reservation: Reservation | None = None
        self.scanner: SseUsageScanner | None = None


_NO_TOKENS = (None,) * 7


class _Priced:
    """The tokens in one `usage` and what they cost on one model, rounded once (see `Plugin._priced`)."""

    __slots__ = ("tokens", "columns", "micros", "hit_micros", "label")

    def __init__(self, tokens: Tokens | None, exact: Decimal | None, hit_fraction: Decimal, label: str) -> None:
        self.tokens = tokens
        # The token columns of a usage row, in table order (input_tokens ... output_image_tokens).
        self.columns = _NO_TOKENS if tokens is None else (
            tokens.input_total, tokens.output_total, tokens.text_input, tokens.image_input,
            tokens.text_cached + tokens.image_cached, tokens.text_output, tokens.image_output)
        self.micros = None if exact is None else round_micros(exact)  # None: no tokens, or no price
        self.hit_micros = None if exact is None else round_micros(exact * hit_fraction)
        self.label = label  # the model's metrics label


class _Measured(msgspec.Struct):
    """One request's usage and cost, ready to record."""

    model: str | None
    priced: _Priced | None  # None when the response carried no token counts
    images: int | None
    cost_micros: int | None
    saved_micros: int
    unmetered: bool


async def _observe(chunks: Any, scanner: SseUsageScanner) -> Any:
    async for chunk in chunks:
        scanner.feed(chunk)
        yield chunk


class Plugin:
    """Meter every request on a metered route; enforce budgets; serve reports and metrics."""

    name = _NAME
    config_section = "metering"
    Config = MeteringConfig

    def __init__(self, config: Config, settings: MeteringConfig | None) -> None:
        self.config = config
        self.settings = settings or MeteringConfig()
        register_url_secrets(self.settings.database)
        self.store: UsageStore = store_from_settings(config, self.settings)
        self.writer: BatchWriter | None = None
        self.metrics: MeteringMetrics | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._prune_task: asyncio.Task[None] | None = None
        self._reload_task: asyncio.Task[None] | None = None  # held so the loop keeps a reference
        self._warned: BoundedMemo[str, float] = BoundedMemo(1000)  # when each warning was last logged
        self._take_settings(self.settings)
        self.ledger = BudgetLedger(self.settings.budgets, self.settings.key_budgets)

    def _take_settings(self, settings: MeteringConfig) -> None:
        """The settings that can change live (on SIGHUP)."""
        self.prices = PriceBook(settings.prices)
        self.hit_fraction = settings.cache_hit_cost_fraction
        self._priced_memo: BoundedMemo[tuple[str | None, bool, bytes], _Priced] = BoundedMemo(_PRICED_MEMO_SIZE)
        # By the identity of a `usage` object (kept alive by the entry): every hit of one cache entry shares it.
        self._priced_by_id: BoundedMemo[tuple[int, str | None, bool], tuple[dict[str, Any], _Priced]] = BoundedMemo(
            _PRICED_MEMO_SIZE)
        self.default_estimate = round_micros(settings.default_estimate_usd * 1_000_000)

    def describe(self) -> str:
        budgets = len(self.settings.budgets) + len(self.settings.key_budgets)
        where = self.settings.database.split("@")[-1] if "@" in self.settings.database else self.settings.database
        kept = f"; rows kept {self.settings.retention_days} days" if self.settings.retention_days else ""
        return f"records usage to {where} (table {self.settings.table}); {budgets} budget(s){kept}"

    # ------------------------------------------------------------ lifecycle

    @hookimpl
    async def startup(self, gateway: Any) -> None:
        await self.store.open(create=True)
        self.metrics = MeteringMetrics(gateway.metrics, self.ledger)
        metrics = self.metrics
        self.writer = BatchWriter(
            self.store, batch_rows=self.settings.batch_rows, flush_interval_s=self.settings.flush_interval_ms / 1000,
            max_queue_rows=self.settings.max_queue_rows, on_drop=lambda count: metrics.dropped_rows.inc(count))
        writer = self.writer
        metrics.queue.set_function(lambda: len(writer.queue))
        self.writer.start()
        if self.ledger:
            await self.ledger.refresh(self.store, self.writer)
        self._refresh_task = asyncio.get_running_loop().create_task(self._refresh_budgets(), name="metering-budgets")
        self._prune_task = asyncio.get_running_loop().create_task(
            prune_periodically(self.store, lambda: self.settings.retention_days), name="metering-retention")

    @hookimpl
    async def shutdown(self) -> None:
        for task in (self._refresh_task, self._prune_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._refresh_task = self._prune_task = None
        if self.writer is not None:
            await self.writer.close()
        await self.store.close()

    async def _refresh_budgets(self) -> None:
        while True:
            await asyncio.sleep(self.settings.budget_refresh_s)
            if self.ledger and self.writer is not None:
                try:
                    await self.ledger.refresh(self.store, self.writer)
                except Exception as error:  # keep the last known totals; try again next time
                    log.warning("metering could not refresh budget spend", error=repr(error))

    @hookimpl
    def reload_config(self, config: Config) -> None:
        try:
            settings = load_settings(config)
        except ConfigError as error:
            log.error("metering kept its old settings", error=str(error))
            return
        fixed = ("database", "table", "schema", "pool_size", "batch_rows", "flush_interval_ms", "max_queue_rows")
        if any(getattr(settings, name) != getattr(self.settings, name) for name in fixed):
            log.warning("metering storage settings change only on restart", keys=", ".join(fixed))
        self._take_settings(settings)
        self.ledger.set_limits(settings.budgets, settings.key_budgets)
        self.settings = msgspec.structs.replace(settings, **{name: getattr(self.settings, name) for name in fixed})
        if self.ledger and self.writer is not None:  # budgets new to this process start from the database's totals
            self._reload_task = asyncio.get_running_loop().create_task(self.ledger.refresh(self.store, self.writer))

    @hookimpl
    def ready_check(self) -> dict[str, Any]:
        writer = self.writer
        return {
            "ready": writer is not None,
            "database": self.store.kind,
            "queued_rows": len(writer.queue) if writer else 0,
            "written_rows": writer.written if writer else 0,
            "dropped_rows": writer.dropped if writer else 0,
            "last_error": writer.last_error if writer else None,
        }

    @hookimpl
    def register_routes(self) -> list[web.RouteDef]:
        return [web.get("/admin/usage", self.usage_route), web.get("/admin/budgets", self.budgets_route)]

    async def usage_route(self, request: web.Request) -> web.Response:
        """``GET /admin/usage?since=&until=&group_by=&format=``: the report ``gatekeeper usage`` prints."""
        params = request.query
        fmt = params.get("format", "json")
        try:
            query = parse_query(params.get("since"), params.get("until"),
                                params.get("group_by") or params.get("group-by"))
            if fmt not in ("json", "csv", "table"):
                raise ValueError(f"unknown format {fmt!r}: use json, csv or table")
        except ValueError as error:
            raise GatewayError(400, str(error), code="invalid_report_query") from None
        if self.writer is not None:
            await self.writer.flush()  # rows still queued belong in the report
        rows = await run_report(self.store, query)
        if fmt == "json":
            return web.Response(body=msgspec.json.encode(rows), content_type="application/json")
        return web.Response(text=render(query, rows, fmt), content_type="text/csv" if fmt == "csv" else "text/plain")

    async def budgets_route(self, _request: web.Request) -> web.Response:
        """``GET /admin/budgets``: where each budget stands this month, money as exact strings."""
        if self.ledger and self.writer is not None:
            await self.ledger.refresh(self.store, self.writer)  # the other replicas' spend, as of now
        return web.Response(body=msgspec.json.encode(budget_records(self.ledger.statuses())),
                            content_type="application/json")

    # ------------------------------------------------------------ request stages

    def _state(self, flow: Flow) -> _FlowState:
        state = flow.scratch.get(_NAME)
        if state is None:
            state = flow.scratch[_NAME] = _FlowState()
        return state

    def _facts(self, flow: Flow) -> RequestFacts:
        """Every priced request field (parses a multipart body): for estimates and per-image prices."""
        state = self._state(flow)
        if state.facts is None:
            state.facts = request_facts(flow)
        return state.facts

    def _model(self, flow: Flow) -> str | None:
        state = flow.scratch.get(_NAME)
        if state is not None and state.facts is not None:
            return state.facts.model
        return requested_model(flow)

    @hookimpl
    def check_request(self, flow: Flow) -> None:
        """With ``chat_stream_without_usage = "refuse"``, refuse chat streams that can't be metered."""
        if self.settings.chat_stream_without_usage != "refuse" or flow.route != "chat/completions":
            return
        facts = self._facts(flow)
        if facts.stream and not facts.include_usage:
            raise GatewayError(
                400, "This gateway meters streamed chat completions: set stream_options.include_usage to true.",
                param="stream_options", code="stream_usage_required")

    @hookimpl
    def before_forward(self, flow: Flow) -> None:
        """Refuse a request whose estimated cost would pass its tenant's or key's monthly budget."""
        if not self.ledger.limits or flow.route not in METERED_ROUTES or not self.ledger.scopes_for(flow.principal):
            return
        estimate = estimate_micros(flow.route, self._facts(flow), self.prices, self.default_estimate)
        try:
            reservation = self.ledger.reserve(flow.principal, estimate)
        except OverBudget as over:
            kind, name = over.scope
            if self.metrics is not None:
                self.metrics.child(self.metrics.budget_refusals, kind, name).inc()
            raise GatewayError(
                429,
                f"The {kind} {name!r} has used ${format_usd(over.committed_micros)} of its "
                f"${format_usd(over.budget_micros)} monthly budget (requests in flight included); this request, "
                f"estimated at ${format_usd(over.estimate)}, would exceed it.",
                type="insufficient_quota", code="insufficient_quota",
                headers={"x-should-retry": "false"}, outcome=Outcome.REJECTED) from None
        self._state(flow).reservation = reservation

    @hookimpl
    def wrap_response_stream(self, flow: Flow, chunks: Any) -> Any:
        """Scan event streams for usage as they pass; ask for the body of JSON answers."""
        if flow.outcome == Outcome.CACHE_HIT or flow.route not in METERED_ROUTES:
            return None
        response = flow.response
        if response is None or response.status >= 300:
            return None
        if response.is_event_stream:
            scanner = self._state(flow).scanner = SseUsageScanner()
            return _observe(chunks, scanner)
        flow.collect_response_body = True
        return None

    @hookimpl(tryfirst=True)
    def exchange_complete(self, flow: Flow) -> None:
        """Set ``flow.usage``, ``flow.cost_usd`` (and ``saved_usd`` on a hit); queue the usage row."""
        if flow.route not in METERED_ROUTES:
            return
        state: _FlowState | None = flow.scratch.get(_NAME)
        if state is not None:
            self.ledger.release(state.reservation)
            state.reservation = None
        try:
            hit = flow.outcome == Outcome.CACHE_HIT
            measured = self._measure_hit(flow) if hit else self._measure_response(flow, state)
            if measured.cost_micros is not None:
                flow.cost_usd = micros_to_usd(measured.cost_micros)
            if hit:
                flow.saved_usd = micros_to_usd(measured.saved_micros)
            self._record(flow, measured)
        except Exception:  # a metering bug must not stop audit and cache, which run after this hook
            log.exception("metering failed to record a request", request_id=flow.request_id)

    @hookimpl
    def exchange_error(self, flow: Flow) -> None:
        """Release the flow's reservation; record what it used, if the upstream was reached."""
        if flow.route not in METERED_ROUTES:
            return
        state = self._state(flow)
        self.ledger.release(state.reservation)
        state.reservation = None
        if flow.principal is None and flow.outcome == Outcome.AUTH_FAIL:
            return
        model = self._model(flow)
        detached = getattr(flow.scratch.get("cache"), "detached", None)
        if flow.outcome == Outcome.CLIENT_ABORT and detached is not None:
            # The cache finishes this upstream call for followers that wait on it: the upstream
            # bills it all the same, so record it once its usage is known.
            detached.add_done_callback(lambda done: self._record_detached(flow, model, done))
            return
        measured = _Measured(model, None, None, 0, 0, False)
        if flow.outcome in (Outcome.TRUNCATED, Outcome.CLIENT_ABORT) and flow.attempts:
            # The upstream may have billed for work the client never got: count what was seen.
            scanner = state.scanner
            if scanner is not None and scanner.usage is not None:
                measured = self._price(flow, model, scanner.model, scanner.usage, None)
            else:
                measured = _Measured(model, None, None, None, 0, True)
                self._count_unmetered(flow, flow.outcome)
        if measured.cost_micros is not None and measured.cost_micros:
            flow.cost_usd = micros_to_usd(measured.cost_micros)
        self._record(flow, measured)

    def _record_detached(self, flow: Flow, model: str | None, done: asyncio.Future[Any]) -> None:
        usage = None if done.cancelled() or done.exception() is not None else done.result()
        if usage:
            measured = self._price(flow, model, None, usage, None)
            if measured.cost_micros:
                flow.cost_usd = micros_to_usd(measured.cost_micros)
        else:
            measured = _Measured(model, None, None, None, 0, True)
            self._count_unmetered(flow, flow.outcome)
        self._record(flow, measured)

    # ------------------------------------------------------------ measuring

    def _measure_hit(self, flow: Flow) -> _Measured:
        note = flow.annotations.get(_NAME) or {}
        model = note.get("model") or self._model(flow)
        images = note.get("images")
        if flow.usage:
            priced = self._priced_hit(model, flow.usage, flow.route in IMAGE_ROUTES)
            if priced.tokens is not None:
                if priced.micros is None:
                    self._warn_unpriced(model)
                    return _Measured(model, priced, images, None, 0, False)
                return _Measured(model, priced, images, priced.hit_micros, priced.micros, False)
        full = self._image_cost(flow, model, images)
        if full is None:
            return _Measured(model, None, images, None if flow.usage else 0, 0, False)
        return _Measured(model, None, images, round_micros(full * self.hit_fraction), round_micros(full), False)

    def _measure_response(self, flow: Flow, state: _FlowState | None) -> _Measured:
        model = self._model(flow)
        if (flow.status or 0) >= 300:
            return _Measured(model, None, None, 0, 0, False)  # OpenAI does not bill refused requests
        images: int | None = None
        scanner = state.scanner if state is not None else None
        if scanner is not None:
            usage, response_model = scanner.usage, scanner.model
        else:
            body = flow.response_body
            summary = summarize_json(body, skim=flow.route in IMAGE_ROUTES) if body else None
            usage = summary.usage if summary else None
            response_model = summary.model if summary else None
            if summary is not None and flow.route in IMAGE_ROUTES:
                images = summary.items
        if usage is None and not (images is not None and self.prices.is_per_image(model)):
            self._count_unmetered(flow, "stream_without_usage" if scanner is not None else "no_usage")
            return _Measured(model, None, images, None, 0, True)
        measured = self._price(flow, model, response_model, usage, images)
        if usage is not None:
            flow.usage = usage
        if images is not None or measured.model != model:
            flow.annotations[_NAME] = {"model": measured.model, "images": images}
        return measured

    def _price(self, flow: Flow, model: str | None, response_model: str | None, usage: dict[str, Any] | None,
               images: int | None) -> _Measured:
        """Cost `usage` (or `images`) at the price of the requested model, else the reported one."""
        if self.prices.resolve(model) is None and response_model is not None:
            model = response_model
        if usage:
            priced = self._priced(model, usage, flow.route in IMAGE_ROUTES)
            if priced.tokens is not None:
                if priced.micros is None:
                    self._warn_unpriced(model)
                return _Measured(model, priced, images, priced.micros, 0, False)
        exact = self._image_cost(flow, model, images)
        return _Measured(model, None, images, None if exact is None else round_micros(exact), 0, False)

    def _priced(self, model: str | None, usage: dict[str, Any], image_route: bool) -> _Priced:
        """The tokens in `usage` and their cost on `model`, memoised by value.

        Every hit of a cache entry carries the same usage (and so do many misses), and the
        Decimal arithmetic is the costliest part of metering a request: it runs once per
        distinct (model, usage) and prices. Prices change only in `_take_settings`, which
        starts a new memo.
        """
        key = (model, image_route, _encode_json(usage))
        priced = self._priced_memo.get(key)
        if priced is None:
            tokens = tokens_from_usage(usage, image_route)
            exact = None if tokens is None else self.prices.token_cost(model, tokens)
            priced = self._priced_memo.remember(key, _Priced(tokens, exact, self.hit_fraction, self._model_label(model)))
        return priced

    def _priced_hit(self, model: str | None, usage: dict[str, Any], image_route: bool) -> _Priced:
        """`_priced` for the usage a cache hit restored: the memory cache hands every hit of an
        entry the same object, found here without encoding it."""
        key = (id(usage), model, image_route)
        known = self._priced_by_id.get(key)
        if known is not None and known[0] is usage:
            return known[1]
        priced = self._priced(model, usage, image_route)
        self._priced_by_id.remember(key, (usage, priced))  # holding `usage` keeps its id from being reused
        return priced

    def _image_cost(self, flow: Flow, model: str | None, images: int | None) -> Decimal | None:
        """Exact micro-dollars for `images` per-image-priced images (DALL·E), or None."""
        if images is None:
            return None
        facts = self._facts(flow)
        exact = self.prices.image_cost(model, facts.quality, facts.size, images)
        if exact is None:
            self._warn_unpriced(model)
        return exact

    def _warn_unpriced(self, model: str | None) -> None:
        name = model or "(none)"
        if self.metrics is not None:
            self.metrics.child(self.metrics.unpriced, self._model_label(model)).inc()
        now = time.monotonic()
        if now - self._warned.get(name, -_WARN_EVERY_S) >= _WARN_EVERY_S:
            self._warned.remember(name, now)
            log.warning("no price for this model: usage recorded with a null cost; add [metering.prices]",
                        model=name)

    def _count_unmetered(self, flow: Flow, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.child(self.metrics.unmetered, reason).inc()
        if reason == "stream_without_usage":
            now = time.monotonic()
            if now - self._warned.get("\0unmetered", -_WARN_EVERY_S) >= _WARN_EVERY_S:
                self._warned["\0unmetered"] = now
                log.warning("a streamed response carried no usage: recorded as unmetered (chat clients must set "
                            "stream_options.include_usage)", route=flow.route)

    def _model_label(self, model: str | None) -> str:
        if model is None:
            return "none"
        return self.prices.resolve(model) or "other"

    # ------------------------------------------------------------ recording

    def _record(self, flow: Flow, measured: _Measured) -> None:
        principal = flow.principal
        if principal is not None:
            tenant, key_id, labels = principal.tenant, principal.key_id, principal.labels
        else:
            tenant = key_id = None
            labels = {}
        hit = flow.outcome == Outcome.CACHE_HIT
        priced = measured.priced
        cost_micros = measured.cost_micros
        response = flow.response
        stream = response is not None and response.is_event_stream
        elapsed_ms = (perf_counter() - flow.started) * 1000.0
        # Positional, in `UsageRow` field order: one row per request, so the cheapest call.
        row = UsageRow(
            flow.request_id, flow.time_start, tenant, key_id, labels, measured.model, flow.route, flow.status,
            flow.outcome, hit, stream, measured.unmetered, *(priced.columns if priced is not None else _NO_TOKENS),
            measured.images, cost_micros, measured.saved_micros, flow.upstream_request_id, round(elapsed_ms, 3))
        if cost_micros and self.ledger.limits:
            self.ledger.record(tenant, key_id, cost_micros)
        if self.writer is not None:
            self.writer.add(row)
        metrics = self.metrics
        if metrics is None:
            return
        label = priced.label if priced is not None else self._model_label(measured.model)
        series = metrics.series(tenant or "none", label, flow.status or 0, flow.cache_status)
        series.requests += 1
        if cost_micros:
            series.cost_micros += cost_micros
        if measured.saved_micros:
            series.saved_micros += measured.saved_micros
        if hit:
            return
        if priced is not None and priced.tokens is not None:
            tokens, counts = priced.tokens, series.tokens
            counts[0] += tokens.text_input + tokens.text_cached
            counts[1] += tokens.image_input + tokens.image_cached
            counts[2] += tokens.text_output
            counts[3] += tokens.image_output
        latency = flow.upstream_latency_s
        if latency is not None:
            metrics.upstream_latency.observe(label, latency)
            if not stream:
                metrics.overhead.observe(flow.route, max(elapsed_ms / 1000 - latency, 0.0))


# ---------------------------------------------------------------- the `gatekeeper usage` command


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    add_usage_command(subparsers, cmd_usage)
    add_budgets_command(subparsers, cmd_budgets)
    add_prune_command(subparsers, cmd_prune_usage)


def cmd_usage(args: argparse.Namespace) -> int:
    """Print a usage report from the database ``[metering]`` names."""
    config = load_config(args.config)
    settings = load_settings(config)
    try:
        query = parse_query(args.since, args.until, args.group_by)
    except ValueError as error:
        print(f"gatekeeper usage: {error}", file=sys.stderr)
        return 2

    async def report() -> list[dict[str, Any]]:
        store = store_from_settings(config, settings)
        await store.open(create=False)
        try:
            return await run_report(store, query)
        finally:
            await store.close()

    sys.stdout.write(render(query, asyncio.run(report()), args.format))
    return 0


def cmd_budgets(args: argparse.Namespace) -> int:
    """Print where each budget stands this month, from the database ``[metering]`` names."""
    config = load_config(args.config)
    settings = load_settings(config)

    async def statuses() -> list[dict[str, str]]:
        ledger = BudgetLedger(settings.budgets, settings.key_budgets)
        if not ledger:
            return []
        store = store_from_settings(config, settings)
        await store.open(create=False)
        try:
            await ledger.refresh(store, None)
        finally:
            await store.close()
        return budget_records(ledger.statuses())

    sys.stdout.write(render_budgets(asyncio.run(statuses()), args.format))
    return 0


def cmd_prune_usage(args: argparse.Namespace) -> int:
    """Delete (or with --dry-run count) the usage rows from before a date."""
    config = load_config(args.config)
    settings = load_settings(config)
    try:
        before = parse_before(args.before, datetime.now(UTC))
    except ValueError as error:
        print(f"gatekeeper prune-usage: {error}", file=sys.stderr)
        return 2

    async def prune() -> int:
        store = store_from_settings(config, settings)
        await store.open(create=False)
        try:
            return await prune_once(store, before, args.dry_run)
        finally:
            await store.close()

    report_pruned(asyncio.run(prune()), before, args.dry_run)
    return 0
