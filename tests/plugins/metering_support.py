"""Shared pieces of the metering tests: client keys and tenants, storage backends, reading rows back."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
import pytest

from gatekeeper import hookimpl
from gatekeeper.flow import Flow, GatewayResponse
from gatekeeper.server import RunningGateway
from gatekeeper.testing.kit import ADMIN_KEY, CLIENT_KEY
from gatekeeper_plugins.metering_store import UsageRow, store_for_url

PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DESIGN_KEY = CLIENT_KEY
INTERN_KEY = "sk-gk-test-design-intern-0001"
MARKETING_KEY = "sk-gk-test-marketing-0001"

# The auth plugin's section: two keys of tenant "design", one of "marketing".
AUTH = {
    "admin_keys": [ADMIN_KEY],
    "keys": [
        {"id": "key-design", "key": DESIGN_KEY, "tenant": "design", "department": "design"},
        {"id": "key-intern", "key": INTERN_KEY, "tenant": "design", "department": "design"},
        {"id": "key-marketing", "key": MARKETING_KEY, "tenant": "marketing", "department": "growth"},
    ],
}


@pytest.fixture(params=["sqlite", "postgres"])
async def usage_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """A `[metering]` storage section: an SQLite file, or a fresh table in the real PostgreSQL.

    Ask for it before `gateway_kit`, so that gateways stop before their table is dropped.
    """
    if request.param == "sqlite":
        yield {"database": f"sqlite:///{tmp_path}/usage.db", "table": "usage"}
        return
    table = "gk_metering_test_" + secrets.token_hex(6)
    try:
        yield {"database": PG_URL, "table": table}
    finally:
        connection = await asyncpg.connect(PG_URL)
        try:
            await connection.execute(f'DROP TABLE IF EXISTS "{table}"')
        finally:
            await connection.close()


def gateway_config(storage: dict[str, Any], *, cache: bool = False, **metering: Any) -> dict[str, Any]:
    """Overrides for `gateway_kit.start`: the test keys, and `[metering]` on `storage`.

    The response cache is off unless asked for, so every request is a miss that reaches the
    upstream. The audit log is off: these tests are about metering alone (audit's own tests
    check that it records the cost metering sets).
    """
    return {"auth": AUTH, "metering": {**storage, **metering},
            "plugins": {"blocked": ["audit"] if cache else ["audit", "cache"]}}


def metering_plugin(running: RunningGateway) -> Any:
    return running.gateway.hooks.pm.get_plugin("metering")


async def flush(running: RunningGateway) -> None:
    """Write queued usage rows now (the writer would within flush_interval_ms anyway)."""
    assert await metering_plugin(running).writer.flush()


async def usage_rows(storage: dict[str, Any]) -> list[dict[str, Any]]:
    """Every usage row in `storage`, oldest first, booleans as bools."""
    table = storage["table"]
    if storage["database"].startswith("sqlite:///"):
        async with aiosqlite.connect(storage["database"][len("sqlite:///"):]) as db:
            db.row_factory = aiosqlite.Row
            async with db.execute(f"SELECT * FROM {table} ORDER BY ts, request_id") as cursor:
                rows = [dict(row) for row in await cursor.fetchall()]
        for row in rows:
            for name in ("cache_hit", "stream", "unmetered"):
                row[name] = bool(row[name])
        return rows
    connection = await asyncpg.connect(storage["database"])
    try:
        return [dict(record) for record in await connection.fetch(f'SELECT * FROM "{table}" ORDER BY ts, request_id')]
    finally:
        await connection.close()


async def drop_usage_table(storage: dict[str, Any]) -> None:
    """Take the usage table away behind the gateway's back (a database outage, as the writer sees it)."""
    table = storage["table"]
    if storage["database"].startswith("sqlite:///"):
        async with aiosqlite.connect(storage["database"][len("sqlite:///"):]) as db:
            await db.execute(f"DROP TABLE {table}")
            await db.commit()
        return
    connection = await asyncpg.connect(storage["database"])
    try:
        await connection.execute(f'DROP TABLE "{table}"')
    finally:
        await connection.close()


def only(rows: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(rows) == 1, rows
    return rows[0]


async def seed_usage(storage: dict[str, Any], *, tenant: str, key_id: str, cost_micros: int,
                     when: float | None = None, model: str = "gpt-image-1.5", route: str = "images/generations",
                     **fields: Any) -> None:
    """Write one usage row straight into `storage`, as another replica (or an earlier day) would have."""
    store = store_for_url(storage["database"], storage["table"])
    await store.open(create=True)
    try:
        await store.insert([UsageRow(
            request_id="seed-" + secrets.token_hex(8), time=time.time() if when is None else when, tenant=tenant,
            key_id=key_id, labels=fields.pop("labels", {}), model=model, route=route, status=200,
            outcome="ok", cache_hit=False, stream=False, unmetered=False, cost_micros=cost_micros, **fields)])
    finally:
        await store.close()


class ReplayCache:
    """Answers every lookup from one stored entry, as the cache plugin would."""

    name = "test-replay-cache"

    def __init__(self, body: bytes, usage: dict | None, annotations: dict | None = None) -> None:
        self.body, self.usage, self.annotations = body, usage, annotations or {}

    @hookimpl
    def cache_lookup(self, flow: Flow) -> GatewayResponse:
        flow.usage = self.usage
        flow.annotations = dict(self.annotations)
        flow.cache_status = "HIT"
        return GatewayResponse(200, {"content-type": "application/json"}, body=self.body)
