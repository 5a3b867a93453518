"""Usage reports: ``gatekeeper usage`` and ``GET /admin/usage`` print the same rows.

A report sums usage rows between ``since`` (inclusive) and ``until`` (exclusive; a bare date
includes that whole UTC day), grouped by any of tenant, model, key, day, route or ``label.NAME``.
Each row has the group columns (``tenant`` and ``model`` always: ``*`` when not grouped by),
then requests, cache_hits, input_tokens, output_tokens, cost_usd, saved_usd,
unpriced_requests and unmetered_requests. Money is an exact string with six decimals.
"""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec

from gatekeeper_plugins.metering_budgets import BudgetStatus
from gatekeeper_plugins.metering_prices import format_usd
from gatekeeper_plugins.metering_store import GROUPS, LABEL_NAME, ReportQuery, ReportRow, UsageStore

__all__ = ["BUDGET_COLUMNS", "FORMATS", "METRICS", "add_budgets_command", "add_usage_command", "budget_records",
           "parse_query", "records", "render", "render_budgets", "run_report"]

FORMATS = ("table", "json", "csv")
METRICS = ("requests", "cache_hits", "input_tokens", "output_tokens", "cost_usd", "saved_usd",
           "unpriced_requests", "unmetered_requests")
_MONEY = ("cost_usd", "saved_usd")
ALL = "*"  # the value of tenant/model in a report not grouped by them


def parse_when(text: str, end: bool) -> datetime:
    """A date (``2026-11-01``) or ISO date-time; naive values are UTC. A date ending a range
    means the end of that day."""
    text = text.strip()
    try:
        if len(text) == 10:
            day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
            return day + timedelta(days=1) if end else day
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a date (YYYY-MM-DD) or an ISO date-time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def parse_group_by(text: str | None) -> tuple[str, ...]:
    if not text:
        return ("tenant", "model")
    groups = tuple(part.strip() for part in text.split(",") if part.strip())
    for group in groups:
        if group not in GROUPS and not (group.startswith("label.") and LABEL_NAME.fullmatch(group[6:])):
            raise ValueError(f"cannot group by {group!r}: use {', '.join(GROUPS)} or label.NAME")
    if len(set(groups)) != len(groups):
        raise ValueError("each group may be named once")
    return groups


def parse_query(since: str | None, until: str | None, group_by: str | None) -> ReportQuery:
    """Build a report query from CLI or query-string values; ValueError names what is wrong."""
    return ReportQuery(
        since=parse_when(since, end=False) if since else None,
        until=parse_when(until, end=True) if until else None,
        group_by=parse_group_by(group_by),
    )


def columns(query: ReportQuery) -> list[str]:
    names = list(query.group_by)
    for name in ("model", "tenant"):
        if name not in names:
            names.insert(0, name)
    return names + list(METRICS)


def records(query: ReportQuery, rows: list[ReportRow]) -> list[dict[str, Any]]:
    """Report rows as JSON-ready dicts, in column order."""
    width = len(query.group_by)
    out = []
    for row in rows:
        record: dict[str, Any] = {}
        groups = dict(zip(query.group_by, row[:width]))
        for name in columns(query)[: -len(METRICS)]:
            record[name] = groups.get(name, ALL)
        for name, value in zip(METRICS, row[width:]):
            record[name] = format_usd(value) if name in _MONEY else value
        out.append(record)
    return out


async def run_report(store: UsageStore, query: ReportQuery) -> list[dict[str, Any]]:
    return records(query, await store.report(query))


def _totals(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    totals: dict[str, Any] = {}
    for name in METRICS:
        if name in _MONEY:
            totals[name] = format_usd(sum(int(Decimal(row[name]).scaleb(6)) for row in rows))
        else:
            totals[name] = sum(row[name] for row in rows)
    return totals


def render(query: ReportQuery, rows: list[dict[str, Any]], fmt: str) -> str:
    """`rows` as ``json``, ``csv`` or an aligned ``table`` (with a TOTAL line)."""
    names = columns(query)
    if fmt in ("json", "csv"):
        return _data(rows, names, fmt)
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}")
    lines = [names] + [["-" if row[name] is None else str(row[name]) for name in names] for row in rows]
    if not rows:
        return _table(lines, set(METRICS)) + "(no usage in this period)\n"
    totals = _totals(rows)
    group_count = len(names) - len(METRICS)
    total = ["TOTAL"] + [""] * (group_count - 1) + [str(totals[name]) for name in METRICS]
    return _table(lines, set(METRICS), total)


def _data(rows: list[dict[str, Any]], names: Sequence[str], fmt: str) -> str:
    """`rows` as indented JSON, or as CSV with `names` for a header (None as an empty cell)."""
    if fmt == "json":
        return msgspec.json.format(msgspec.json.encode(rows), indent=2).decode() + "\n"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def _table(lines: list[list[str]], numeric_names: set[str], total: list[str] | None = None) -> str:
    """Aligned columns, numbers to the right; `lines[0]` names them; `total` under a rule."""
    widths = [max(len(line[i]) for line in [*lines, *([total] if total else [])]) for i in range(len(lines[0]))]
    numeric = {i for i, name in enumerate(lines[0]) if name in numeric_names}

    def line_text(cells: list[str]) -> str:
        return "  ".join(cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
                         for i, cell in enumerate(cells)).rstrip()

    text = [line_text(cells) for cells in lines]
    if total is not None:
        text.append("  ".join("-" * width for width in widths))
        text.append(line_text(total))
    return "\n".join(text) + "\n"


BUDGET_COLUMNS = ("scope", "name", "month", "budget_usd", "spent_usd", "reserved_usd", "remaining_usd")


def budget_records(statuses: list[BudgetStatus]) -> list[dict[str, str]]:
    """What ``GET /admin/budgets`` and ``gatekeeper budgets`` print: money as exact strings."""
    return [{"scope": status.scope, "name": status.name, "month": status.month,
             "budget_usd": format_usd(status.budget_micros), "spent_usd": format_usd(status.spent_micros),
             "reserved_usd": format_usd(status.reserved_micros), "remaining_usd": format_usd(status.remaining_micros)}
            for status in statuses]


def render_budgets(records: list[dict[str, str]], fmt: str) -> str:
    """`budget_records` as ``json``, ``csv`` or an aligned ``table``."""
    if fmt in ("json", "csv"):
        return _data(records, BUDGET_COLUMNS, fmt)
    if not records:
        return "(no budgets in [metering.budgets] or [metering.key_budgets])\n"
    lines = [list(BUDGET_COLUMNS)] + [[record[name] for name in BUDGET_COLUMNS] for record in records]
    return _table(lines, {name for name in BUDGET_COLUMNS if name.endswith("_usd")})


def add_budgets_command(subparsers: argparse._SubParsersAction, run: Any) -> None:
    from gatekeeper.cli import add_config_argument

    parser = subparsers.add_parser(
        "budgets", help="print where each monthly budget stands: spent, reserved, remaining",
        description="Month-to-date spend against each budget of [metering.budgets] and [metering.key_budgets], "
                    "from the [metering] database (every replica's written rows). Money is exact USD.")
    add_config_argument(parser)
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.set_defaults(func=run)


def add_usage_command(subparsers: argparse._SubParsersAction, run: Any) -> None:
    from gatekeeper.cli import add_config_argument

    parser = subparsers.add_parser(
        "usage", help="print token and dollar usage per tenant, model, key or day",
        description="Sum metered usage from the [metering] database. Money is exact USD with six decimals.")
    add_config_argument(parser)
    parser.add_argument("--since", help="first day or instant to include (YYYY-MM-DD or ISO date-time, UTC)")
    parser.add_argument("--until", help="last day to include, or the instant to stop before (UTC)")
    parser.add_argument("--group-by", default="tenant,model",
                        help="comma-separated: tenant, model, key, day, route, label.NAME (default: tenant,model)")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.set_defaults(func=run)
