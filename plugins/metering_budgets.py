"""Monthly budgets per tenant and per key, checked before a request is forwarded.

A request's cost is estimated before it goes upstream (`estimate_micros`) and held as a
reservation until it ends, so requests in flight count against the budget too: a request is
refused when ``spent + reserved + estimate`` would pass the budget. Spend is the database's
month-to-date total (loaded at start-up and refreshed every ``budget_refresh_s``) plus what this
replica has recorded since; months are UTC calendar months.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal

import msgspec

from gatekeeper.flow import Principal
from gatekeeper_plugins.metering_prices import PARTIAL_IMAGE_OUTPUT_TOKENS, PriceBook, Tokens, image_output_tokens
from gatekeeper_plugins.metering_store import UsageStore
from gatekeeper_plugins.metering_usage import IMAGE_ROUTES, RequestFacts
from gatekeeper_plugins.metering_writer import BatchWriter

__all__ = ["Budget", "BudgetLedger", "BudgetStatus", "OverBudget", "Reservation", "estimate_micros", "month_start"]

_Scope = tuple[str, str]  # ("tenant", name) or ("key", key_id)


class Budget(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    monthly_usd: Decimal

    def __post_init__(self) -> None:
        if self.monthly_usd < 0:
            raise ValueError("monthly_usd must not be negative")

    @property
    def micros(self) -> int:
        return int((self.monthly_usd * 1_000_000).to_integral_value(rounding=ROUND_CEILING))


def month_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _month(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m")


def _next_month_start(now: datetime) -> float:
    start = month_start(now)
    return (start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
            ).timestamp()


def estimate_micros(route: str, facts: RequestFacts, prices: PriceBook, default_micros: int) -> int:
    """What a request may cost, in micro-dollars, before it is sent (rounded up).

    Images priced per token: ``n`` images at the contract 13.2 table's output tokens for their
    quality and size (``auto`` at its most expensive), plus 100 tokens per streamed partial
    image, plus the prompt's UTF-8 byte count as text input tokens (a token is at least one
    byte, so this bounds it). DALL·E: ``n`` times the per-image price. Anything else, or a
    model without a price: ``default_micros``.
    """
    model = facts.model
    exact: Decimal | None = None
    if route in IMAGE_ROUTES:
        if prices.is_per_image(model):
            exact = prices.image_cost(model, facts.quality, facts.size, facts.n)
        else:
            per_image = image_output_tokens(facts.quality, facts.size)
            if facts.stream:
                per_image += PARTIAL_IMAGE_OUTPUT_TOKENS * facts.partial_images
            exact = prices.token_cost(model, Tokens(text_input=facts.prompt_bytes, image_output=facts.n * per_image))
    if exact is None:
        return default_micros
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


class OverBudget(Exception):
    def __init__(self, scope: _Scope, budget_micros: int, committed_micros: int, estimate: int) -> None:
        super().__init__(scope)
        self.scope = scope
        self.budget_micros = budget_micros
        self.committed_micros = committed_micros  # spent plus reserved by requests in flight
        self.estimate = estimate


class BudgetStatus(msgspec.Struct, frozen=True):
    """Where one budget stands this month, as this replica knows it (micro-dollars)."""

    scope: str  # "tenant" or "key"
    name: str  # the tenant, or the [[auth.keys]] id
    month: str  # "2026-11": UTC calendar month
    budget_micros: int
    spent_micros: int  # recorded costs: the database's at the last refresh plus this replica's since
    reserved_micros: int  # estimates held by this replica's requests in flight

    @property
    def remaining_micros(self) -> int:
        return max(self.budget_micros - self.spent_micros - self.reserved_micros, 0)


@dataclass(slots=True)
class Reservation:
    scopes: tuple[_Scope, ...]
    micros: int
    month: str


class BudgetLedger:
    """Spend and reservations against each budget, for this replica."""

    def __init__(self, tenant_budgets: dict[str, Budget], key_budgets: dict[str, Budget]) -> None:
        self.limits: dict[_Scope, int] = {}
        self.set_limits(tenant_budgets, key_budgets)
        self.month = _month(datetime.now(UTC))
        self._month_ends = _next_month_start(datetime.now(UTC))
        self.base: dict[_Scope, int] = defaultdict(int)  # the database's month-to-date at the last refresh
        self.local: dict[_Scope, int] = defaultdict(int)  # recorded here since then
        self.reserved: dict[_Scope, int] = defaultdict(int)

    def set_limits(self, tenant_budgets: dict[str, Budget], key_budgets: dict[str, Budget]) -> None:
        """New budget amounts (on SIGHUP); spend and reservations carry over."""
        limits = {("tenant", t): b.micros for t, b in tenant_budgets.items()}
        limits.update({("key", k): b.micros for k, b in key_budgets.items()})
        self.limits = limits

    def __bool__(self) -> bool:
        return bool(self.limits)

    def scopes_for(self, principal: Principal | None) -> tuple[_Scope, ...]:
        if principal is None:
            return ()
        candidates = (("tenant", principal.tenant), ("key", principal.key_id))
        return tuple(scope for scope in candidates if scope in self.limits)

    def spent(self, scope: _Scope) -> int:
        return self.base.get(scope, 0) + self.local.get(scope, 0)

    def _roll_month(self, now: datetime | None) -> None:
        if now is None:
            if time.time() < self._month_ends:  # the common case: no datetime built per request
                return
            now = datetime.now(UTC)
        month = _month(now)
        if month != self.month:
            self.month = month
            self.base.clear()
            self.local.clear()
        self._month_ends = _next_month_start(now)

    def statuses(self, now: datetime | None = None) -> list[BudgetStatus]:
        """Every budget's month so far: keys, then tenants, each by name."""
        self._roll_month(now)
        statuses = []
        for scope, limit in sorted(self.limits.items()):
            kind, name = scope
            statuses.append(BudgetStatus(kind, name, self.month, limit, self.spent(scope), self.reserved.get(scope, 0)))
        return statuses

    def reserve(self, principal: Principal | None, estimate: int, now: datetime | None = None) -> Reservation | None:
        """Hold `estimate` against every budget of `principal`, or raise `OverBudget`.

        Synchronous on purpose: check and hold happen with no await between them, so
        concurrent requests can't all pass the same check.
        """
        scopes = self.scopes_for(principal)
        if not scopes:
            return None
        self._roll_month(now)
        for scope in scopes:
            committed = self.spent(scope) + self.reserved[scope]
            # An estimate of 0 (unpriced model) still may not start once the budget is used up.
            if committed + max(estimate, 1) > self.limits[scope]:
                raise OverBudget(scope, self.limits[scope], committed, estimate)
        for scope in scopes:
            self.reserved[scope] += estimate
        return Reservation(scopes, estimate, self.month)

    def release(self, reservation: Reservation | None) -> None:
        if reservation is None:
            return
        for scope in reservation.scopes:
            self.reserved[scope] = max(self.reserved[scope] - reservation.micros, 0)

    def record(self, tenant: str | None, key_id: str | None, cost_micros: int | None) -> None:
        """Count a recorded request's cost towards its budgets."""
        if not cost_micros:
            return
        for scope in (("tenant", tenant), ("key", key_id)):
            if scope in self.limits:
                self.local[scope] += cost_micros  # type: ignore[index]

    async def refresh(self, store: UsageStore, writer: BatchWriter | None, now: datetime | None = None) -> None:
        """Reload month-to-date spend from the database (every replica's flushed rows).

        Done under the writer's lock, so each of this replica's rows is counted exactly once:
        either it is in the database already, or it is still queued. Without a writer (the
        ``gatekeeper budgets`` command) the database's rows are all there is.
        """
        now = now or datetime.now(UTC)
        start = month_start(now)
        wanted_tenants = {name for kind, name in self.limits if kind == "tenant"}
        wanted_keys = {name for kind, name in self.limits if kind == "key"}
        async with writer.lock if writer is not None else contextlib.nullcontext():
            tenants = await store.spent_since(start, "tenant") if wanted_tenants else {}
            keys = await store.spent_since(start, "key_id") if wanted_keys else {}
            base: dict[_Scope, int] = defaultdict(int)
            base.update({("tenant", name): total for name, total in tenants.items() if name in wanted_tenants})
            base.update({("key", name): total for name, total in keys.items() if name in wanted_keys})
            local: dict[_Scope, int] = defaultdict(int)
            start_s = start.timestamp()
            for row in writer.queue if writer is not None else ():
                if row.cost_micros and row.time >= start_s:
                    for scope in (("tenant", row.tenant), ("key", row.key_id)):
                        if scope in self.limits:
                            local[scope] += row.cost_micros  # type: ignore[index]
            self.month, self.base, self.local = _month(now), base, local
            self._month_ends = _next_month_start(now)
