"""Keeping the usage table bounded: ``[metering] retention_days`` and ``gatekeeper prune-usage``.

One row per request adds up (about 360 bytes a row in SQLite with its indexes: 360 MB per
million requests). Rows older than `retention_days` are deleted by every gateway process once at
start and then every 6 hours, a chunk of rows per transaction so writers never wait long
(replicas sharing PostgreSQL may all prune: deleting what is already gone costs one index lookup).
``gatekeeper prune-usage --before DATE`` does the same once, by hand. Neither ever touches the
current UTC month, whose rows budgets sum (`metering_budgets`): `retention_days` is at least 32
for that reason, and an earlier `--before` is refused. The default, 0, keeps every row.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from gatekeeper.logs import get_logger
from gatekeeper_plugins.metering_store import ReportQuery, UsageStore

__all__ = ["MIN_RETENTION_DAYS", "PRUNE_INTERVAL_S", "add_prune_command", "month_start", "parse_before", "prune_once",
           "prune_periodically", "report_pruned"]

log = get_logger("gatekeeper.metering")

MIN_RETENTION_DAYS = 32  # longer than any month: the current month's rows are never pruned
PRUNE_INTERVAL_S = 6 * 3600


def month_start(now: datetime) -> datetime:
    """00:00 UTC on the first day of `now`'s month: budgets count the rows from here on."""
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


async def prune_periodically(store: UsageStore, retention_days: Callable[[], int]) -> None:
    """Delete rows older than `retention_days()` days now and every `PRUNE_INTERVAL_S` (0: keep all).
    Read at each turn, so a SIGHUP that changes it takes effect at the next one."""
    while True:
        days = retention_days()
        if days:
            before = datetime.now(UTC) - timedelta(days=days)
            try:
                deleted = await store.delete_before(before)
            except Exception as error:  # the next turn will try again
                log.warning("metering could not prune old usage rows", error=repr(error))
            else:
                if deleted:
                    log.info("usage rows pruned", rows=deleted, before=before.isoformat(), retention_days=days)
        await asyncio.sleep(PRUNE_INTERVAL_S)


def add_prune_command(subparsers: argparse._SubParsersAction, handler: Callable[[argparse.Namespace], int]) -> None:
    from gatekeeper.cli import add_config_argument

    prune = subparsers.add_parser(
        "prune-usage", help="delete usage rows older than a date from the [metering] database")
    prune.add_argument("--before", required=True, metavar="DATE",
                       help="delete rows before 00:00 UTC of this date (YYYY-MM-DD); at most the first of this month")
    prune.add_argument("--dry-run", action="store_true", help="count the rows, delete nothing")
    add_config_argument(prune)
    prune.set_defaults(func=handler)


def parse_before(text: str, now: datetime) -> datetime:
    """The cutoff a ``--before`` date names; ValueError for a bad date or one inside this month."""
    try:
        before = datetime.strptime(text.strip(), "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f"--before: {text!r} is not a date (YYYY-MM-DD)") from None
    if before > month_start(now):
        raise ValueError(f"--before {text}: this month's rows are what budgets count; "
                         f"prune up to {month_start(now):%Y-%m-%d} at most")
    return before


async def prune_once(store: UsageStore, before: datetime, dry_run: bool) -> int:
    """The rows older than `before`: counted (dry run) or deleted."""
    if dry_run:
        rows = await store.report(ReportQuery(until=before, group_by=()))
        return int(rows[0][0]) if rows else 0
    return await store.delete_before(before)


def report_pruned(count: int, before: datetime, dry_run: bool) -> None:
    verb = "would delete" if dry_run else "deleted"
    print(f"{verb} {count} usage row(s) from before {before:%Y-%m-%d} 00:00 UTC", file=sys.stdout)
