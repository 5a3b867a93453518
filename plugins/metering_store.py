"""Where usage rows live: SQLite (embedded, WAL) or PostgreSQL (shared by replicas).

One row per metered request. Both backends take rows in batches (`insert`), answer the
month-to-date spend that budgets start from (`spent_since`) and the grouped sums that reports
print (`report`). Money is stored as integer micro-dollars (``cost_micros``, ``saved_micros``);
``cost_micros`` is NULL when the model has no price. Timestamps are UTC.

SQLite rows are inserted on the event loop through a plain `sqlite3` connection of their own, a
few short statements per batch: handing each batch to a database thread cost several times more
CPU than the insert itself (the thread and the busy loop take Python's GIL from each other). That
connection never waits: its busy timeout is 0 (a locked file fails the batch, which the writer
retries), and it never checkpoints, as a checkpoint fsyncs. Checkpoints, reads and reports run
on the aiosqlite connection's thread.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import msgspec

from gatekeeper.logs import get_logger

__all__ = [
    "GROUPS",
    "ReportQuery",
    "StoreBusy",
    "UsageRow",
    "UsageStore",
    "store_for_url",
]

log = get_logger("gatekeeper.metering")

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
LABEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
GROUPS = ("tenant", "model", "key", "day", "route")  # plus "label.NAME"

_encode_json = msgspec.json.Encoder().encode


class StoreBusy(Exception):
    """Another connection holds the database's write lock: the batch was not written; try it again later."""


class UsageRow(msgspec.Struct, gc=False):
    """What one request used and cost. Token fields are None when the response had no usage.

    The fields are the table's columns, in order (``time`` is the ``ts`` column). Not tracked by
    the garbage collector (it holds no containers but `labels`, which never points back): rows
    wait in the queue by the thousand, and each tracked one makes collections run sooner.
    """

    request_id: str
    time: float  # epoch seconds, UTC
    tenant: str | None
    key_id: str | None
    labels: dict[str, str]
    model: str | None
    route: str
    status: int | None
    outcome: str | None
    cache_hit: bool
    stream: bool
    unmetered: bool  # the upstream may have billed, but the response carried no usage to count
    input_tokens: int | None = None
    output_tokens: int | None = None
    input_text_tokens: int | None = None
    input_image_tokens: int | None = None
    input_cached_tokens: int | None = None
    output_text_tokens: int | None = None
    output_image_tokens: int | None = None
    images: int | None = None
    cost_micros: int | None = None  # None: tokens recorded, but the model has no price
    saved_micros: int = 0
    upstream_request_id: str | None = None
    latency_ms: float | None = None


COLUMNS = tuple(UsageRow.__struct_fields__[:1]) + ("ts",) + tuple(UsageRow.__struct_fields__[2:])


@dataclass(frozen=True)
class ReportQuery:
    """Which rows a report sums (``since`` inclusive, ``until`` exclusive) and how it groups them."""

    since: datetime | None = None
    until: datetime | None = None
    group_by: tuple[str, ...] = ("tenant", "model")


# A report row: the group values, then requests, cache_hits, input_tokens, output_tokens,
# cost_micros, saved_micros, unpriced_requests, unmetered_requests.
ReportRow = tuple[Any, ...]


# Rows deleted per statement when pruning: each statement is its own short transaction, so the
# writers of the gateway (and of other replicas) wait milliseconds for the lock, not seconds.
DELETE_CHUNK_ROWS = 2000


class UsageStore(Protocol):
    kind: str

    async def open(self, create: bool = True) -> None: ...
    async def close(self) -> None: ...
    async def insert(self, rows: list[UsageRow]) -> None: ...
    async def spent_since(self, start: datetime, column: str) -> dict[str, int]: ...
    async def report(self, query: ReportQuery) -> list[ReportRow]: ...
    async def delete_before(self, before: datetime, chunk_rows: int = DELETE_CHUNK_ROWS) -> int: ...


def _utc_text(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_formatted_second: tuple[int, str] = (-1, "")  # rows come in bursts of the same second


def _epoch_text(when: float) -> str:
    """`_utc_text` of an epoch time, rounded as `datetime.fromtimestamp` rounds it."""
    global _formatted_second
    whole = int(when)
    micros = round((when - whole) * 1_000_000)
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    second, text = _formatted_second
    if whole != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(whole))
        _formatted_second = (whole, text)
    return f"{text}{micros:06d}Z"


_MAX_ROWS_PER_INSERT = 64  # one statement holds the event loop for about 0.2 ms
_LOCKED = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
_CHECKPOINT_ROWS = 8192  # about the 1000 WAL pages after which SQLite would checkpoint by itself


def _rows_per_insert() -> int:
    """The most rows one INSERT takes: a power of two within this SQLite's limit on bound values."""
    with closing(sqlite3.connect(":memory:")) as probe:
        rows = min(probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(COLUMNS), _MAX_ROWS_PER_INSERT)
    return 1 << (max(rows, 1).bit_length() - 1)


def _sums(cache_hit: str, unmetered: str) -> str:
    unpriced = f"CASE WHEN cost_micros IS NULL AND {unmetered} = 0 THEN 1 ELSE 0 END"
    return (f"COUNT(*), SUM({cache_hit}), SUM(input_tokens), SUM(output_tokens), SUM(cost_micros), "
            f"SUM(saved_micros), SUM({unpriced}), SUM({unmetered})")


def _group_expressions(group_by: tuple[str, ...], day: str, label: str) -> list[str]:
    expressions = []
    for group in group_by:
        if group == "key":
            expressions.append("key_id")
        elif group == "day":
            expressions.append(day)
        elif group.startswith("label."):
            name = group[6:]
            if not LABEL_NAME.fullmatch(name):
                raise ValueError(f"invalid label name {name!r}")
            expressions.append(label.format(name=name))  # validated above: safe to inline
        elif group in ("tenant", "model", "route"):
            expressions.append(group)
        else:
            raise ValueError(f"unknown group {group!r}")
    return expressions


def _report_sql(table: str, query: ReportQuery, day: str, label: str, sums: str,
                placeholder: Any) -> tuple[str, list[Any]]:
    groups = _group_expressions(query.group_by, day, label)
    where, params = [], []
    if query.since is not None:
        params.append(query.since)
        where.append(f"ts >= {placeholder(len(params))}")
    if query.until is not None:
        params.append(query.until)
        where.append(f"ts < {placeholder(len(params))}")
    select = ", ".join([*groups, sums])
    sql = f"SELECT {select} FROM {table}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if groups:
        ordinals = ", ".join(str(i + 1) for i in range(len(groups)))
        sql += f" GROUP BY {ordinals} ORDER BY {ordinals}"
    return sql, params


def _normalise(rows: list[Any], groups: int) -> list[ReportRow]:
    """Sums as ints (Postgres returns numeric for SUM(bigint)); NULL sums of no rows as 0."""
    return [tuple(row[:groups]) + tuple(int(v or 0) for v in row[groups:]) for row in rows if row[groups]]


# ---------------------------------------------------------------- SQLite


class SqliteStore:
    """An embedded usage database: one file, WAL mode so reports can read while the gateway writes."""

    kind = "sqlite"

    def __init__(self, path: str, table: str) -> None:
        self.path = path
        self.table = table
        self._db: Any = None
        self._opened_path = path
        self._on_loop = True  # False for an in-memory database, or a file not in WAL mode
        self._writer: sqlite3.Connection | None = None  # used on the event loop only
        self._rows_per_insert = _rows_per_insert()
        self._insert_sql: dict[int, str] = {}  # by rows per statement
        self._rows_since_checkpoint = 0
        self._checkpoint: asyncio.Task[None] | None = None

    async def open(self, create: bool = True) -> None:
        import aiosqlite

        path = self.path
        if path != ":memory:":
            if create:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            elif not Path(path).exists():
                path = ":memory:"  # nothing recorded yet: report on an empty database, create no file
        self._opened_path = path
        self._on_loop = path != ":memory:"
        self._db = await aiosqlite.connect(path, timeout=30.0, isolation_level=None)
        statements = ["PRAGMA busy_timeout = 30000"]
        if create:
            statements += [
                "PRAGMA journal_mode = WAL",
                "PRAGMA synchronous = NORMAL",
                f"""CREATE TABLE IF NOT EXISTS {self.table} (
                    request_id TEXT PRIMARY KEY, ts TEXT NOT NULL, tenant TEXT, key_id TEXT, labels TEXT,
                    model TEXT, route TEXT, status INTEGER, outcome TEXT, cache_hit INTEGER NOT NULL,
                    stream INTEGER NOT NULL, unmetered INTEGER NOT NULL,
                    input_tokens INTEGER, output_tokens INTEGER, input_text_tokens INTEGER,
                    input_image_tokens INTEGER, input_cached_tokens INTEGER, output_text_tokens INTEGER,
                    output_image_tokens INTEGER, images INTEGER, cost_micros INTEGER,
                    saved_micros INTEGER NOT NULL DEFAULT 0, upstream_request_id TEXT, latency_ms REAL)""",
                f"CREATE INDEX IF NOT EXISTS {self.table}_ts ON {self.table} (ts)",
                f"CREATE INDEX IF NOT EXISTS {self.table}_tenant_ts ON {self.table} (tenant, ts)",
            ]
        for statement in statements:
            # Close each cursor: an unfinished PRAGMA statement would hold a lock on the file.
            await (await self._db.execute(statement)).close()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()  # not the last connection: closing it neither checkpoints nor syncs
            self._writer = None
        if self._checkpoint is not None:
            await self._checkpoint
            self._checkpoint = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    def _loop_writer(self) -> sqlite3.Connection | None:
        """The connection that inserts on the event loop; None when the database is not a WAL file."""
        if self._writer is None and self._on_loop:
            connection = sqlite3.connect(self._opened_path, timeout=0, isolation_level=None)
            # Per connection: commits append to the WAL without an fsync, and never checkpoint here.
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.execute("PRAGMA wal_autocheckpoint = 0")
            if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                connection.close()
                self._on_loop = False  # every commit would sync: insert on the database thread
                return None
            self._writer = connection
        return self._writer

    def _batch(self, rows: list[UsageRow]) -> tuple[str, list[Any]]:
        """One INSERT of `rows` (at most `_rows_per_insert`) and its values.

        A statement takes a power-of-two number of rows, so SQLite compiles (costlier than running
        it) at most 7 of them: the rows are padded with repeats of the last one, which INSERT OR
        IGNORE skips as request_id is the primary key.
        """
        values: list[Any] = []
        labels: Any = None
        labels_text = ""
        for row in rows:
            if row.labels is not labels:  # a key's rows share its labels
                labels = row.labels
                labels_text = _encode_json(labels).decode()
            values += _sqlite_values(row, labels_text)
        size = 1 << (len(rows) - 1).bit_length()
        width = len(COLUMNS)
        values += values[-width:] * (size - len(rows))
        return self._statement(size), values

    async def insert(self, rows: list[UsageRow]) -> None:
        writer = self._loop_writer()
        if writer is None:
            await self._insert_on_thread(rows)
            return
        step = self._rows_per_insert
        try:
            writer.execute("BEGIN IMMEDIATE")
            for start in range(0, len(rows), step):
                if start:
                    await asyncio.sleep(0)  # serve requests between statements
                writer.execute(*self._batch(rows[start:start + step]))
            writer.execute("COMMIT")
        except BaseException as error:
            if writer.in_transaction:
                writer.execute("ROLLBACK")  # never leave a failed batch's transaction holding the file
            if isinstance(error, sqlite3.OperationalError) and error.sqlite_errorcode & 0xFF in _LOCKED:
                raise StoreBusy(str(error)) from error
            raise
        self._rows_since_checkpoint += len(rows)
        if self._rows_since_checkpoint >= _CHECKPOINT_ROWS and self._checkpoint is None:
            self._rows_since_checkpoint = 0
            self._checkpoint = asyncio.get_running_loop().create_task(self._run_checkpoint())

    async def _run_checkpoint(self) -> None:
        """Copy the WAL into the database file on the aiosqlite thread (this is where the fsync is)."""
        try:
            await self._db.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")
        except Exception as error:  # the next one will try again
            log.warning("metering could not checkpoint the SQLite WAL", error=repr(error))
        finally:
            self._checkpoint = None

    async def _insert_on_thread(self, rows: list[UsageRow]) -> None:
        step = self._rows_per_insert
        try:
            await self._db.execute("BEGIN")
            for start in range(0, len(rows), step):
                await self._db.execute(*self._batch(rows[start:start + step]))
            await self._db.execute("COMMIT")
        except BaseException:
            await self._db.rollback()
            raise

    def _statement(self, rows: int) -> str:
        sql = self._insert_sql.get(rows)
        if sql is None:
            one_row = "(" + ", ".join("?" for _ in COLUMNS) + ")"
            sql = self._insert_sql[rows] = (f"INSERT OR IGNORE INTO {self.table} ({', '.join(COLUMNS)}) VALUES "
                                            + ", ".join([one_row] * rows))
        return sql

    async def _fetch(self, sql: str, params: list[Any]) -> list[Any]:
        try:
            async with self._db.execute(sql, params) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):
                return []
            raise

    async def spent_since(self, start: datetime, column: str) -> dict[str, int]:
        assert column in ("tenant", "key_id")
        rows = await self._fetch(
            f"SELECT {column}, SUM(cost_micros) FROM {self.table} WHERE ts >= ? AND {column} IS NOT NULL "
            f"GROUP BY {column}", [_utc_text(start)])
        return {name: int(total or 0) for name, total in rows}

    async def report(self, query: ReportQuery) -> list[ReportRow]:
        text_query = ReportQuery(
            since=None if query.since is None else _utc_text(query.since),  # type: ignore[arg-type]
            until=None if query.until is None else _utc_text(query.until),  # type: ignore[arg-type]
            group_by=query.group_by)
        sql, params = _report_sql(self.table, text_query, "substr(ts, 1, 10)", "json_extract(labels, '$.\"{name}\"')",
                                  _sums("cache_hit", "unmetered"), lambda _n: "?")
        return _normalise(await self._fetch(sql, params), len(query.group_by))

    async def delete_before(self, before: datetime, chunk_rows: int = DELETE_CHUNK_ROWS) -> int:
        """Delete the rows older than `before`, a chunk per transaction; how many were deleted.
        Space freed in the file is reused by new rows (the file does not shrink without VACUUM)."""
        sql = (f"DELETE FROM {self.table} WHERE rowid IN "
               f"(SELECT rowid FROM {self.table} WHERE ts < ? LIMIT {int(chunk_rows)})")
        deleted = 0
        while True:
            try:
                cursor = await self._db.execute(sql, [_utc_text(before)])
            except sqlite3.OperationalError as error:
                if "no such table" in str(error):
                    return deleted
                raise
            count = cursor.rowcount
            await cursor.close()
            deleted += count
            if count < chunk_rows:
                return deleted


# ---------------------------------------------------------------- PostgreSQL


class PostgresStore:
    """A usage table in PostgreSQL, shared by every replica (asyncpg pool)."""

    kind = "postgresql"

    def __init__(self, dsn: str, table: str, schema: str | None, pool_size: int) -> None:
        self.dsn = dsn
        self.table = f'"{schema}"."{table}"' if schema else f'"{table}"'
        self.schema = schema
        self.index_prefix = table
        self.pool_size = pool_size
        self._pool: Any = None

    async def open(self, create: bool = True) -> None:
        import asyncpg

        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.pool_size)
        if not create:
            return
        async with self._pool.acquire() as connection, connection.transaction():
            # Replicas start together: serialise their CREATE ... IF NOT EXISTS (which can race).
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))", "gatekeeper-metering:" + self.table)
            if self.schema:
                await connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await connection.execute(f"""
                CREATE TABLE IF NOT EXISTS {self.table} (
                    request_id TEXT PRIMARY KEY, ts TIMESTAMPTZ NOT NULL, tenant TEXT, key_id TEXT, labels JSONB,
                    model TEXT, route TEXT, status INTEGER, outcome TEXT, cache_hit BOOLEAN NOT NULL,
                    stream BOOLEAN NOT NULL, unmetered BOOLEAN NOT NULL,
                    input_tokens BIGINT, output_tokens BIGINT, input_text_tokens BIGINT,
                    input_image_tokens BIGINT, input_cached_tokens BIGINT, output_text_tokens BIGINT,
                    output_image_tokens BIGINT, images INTEGER, cost_micros BIGINT,
                    saved_micros BIGINT NOT NULL DEFAULT 0, upstream_request_id TEXT, latency_ms DOUBLE PRECISION)""")
            await connection.execute(
                f'CREATE INDEX IF NOT EXISTS "{self.index_prefix}_ts" ON {self.table} (ts)')
            await connection.execute(
                f'CREATE INDEX IF NOT EXISTS "{self.index_prefix}_tenant_ts" ON {self.table} (tenant, ts)')

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def insert(self, rows: list[UsageRow]) -> None:
        placeholders = ", ".join(f"${i + 1}::jsonb" if name == "labels" else f"${i + 1}"
                                 for i, name in enumerate(COLUMNS))
        values = [_row_values(row, datetime.fromtimestamp(row.time, UTC), _encode_json(row.labels).decode())
                  for row in rows]
        async with self._pool.acquire() as connection:
            await connection.executemany(
                f"INSERT INTO {self.table} ({', '.join(COLUMNS)}) VALUES ({placeholders}) "
                f"ON CONFLICT (request_id) DO NOTHING", values)

    async def _fetch(self, sql: str, params: list[Any]) -> list[Any]:
        import asyncpg

        try:
            async with self._pool.acquire() as connection:
                return [tuple(record) for record in await connection.fetch(sql, *params)]
        except asyncpg.UndefinedTableError:
            return []

    async def spent_since(self, start: datetime, column: str) -> dict[str, int]:
        assert column in ("tenant", "key_id")
        rows = await self._fetch(
            f"SELECT {column}, SUM(cost_micros) FROM {self.table} WHERE ts >= $1 AND {column} IS NOT NULL "
            f"GROUP BY {column}", [start])
        return {name: int(total or 0) for name, total in rows}

    async def report(self, query: ReportQuery) -> list[ReportRow]:
        sql, params = _report_sql(self.table, query, "to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
                                  "labels->>'{name}'", _sums("cache_hit::int", "unmetered::int"),
                                  lambda n: f"${n}")
        return _normalise(await self._fetch(sql, params), len(query.group_by))

    async def delete_before(self, before: datetime, chunk_rows: int = DELETE_CHUNK_ROWS) -> int:
        """Delete the rows older than `before`, a chunk per transaction; how many were deleted."""
        import asyncpg

        sql = (f"DELETE FROM {self.table} WHERE ctid = ANY(ARRAY("
               f"SELECT ctid FROM {self.table} WHERE ts < $1 LIMIT {int(chunk_rows)}))")
        deleted = 0
        async with self._pool.acquire() as connection:
            while True:
                try:
                    status = await connection.execute(sql, before)
                except asyncpg.UndefinedTableError:
                    return deleted
                count = int(status.rsplit(" ", 1)[-1])  # "DELETE 2000"
                deleted += count
                if count < chunk_rows:
                    return deleted


def _row_values(row: UsageRow, ts: Any, labels: str) -> tuple[Any, ...]:
    values = list(msgspec.structs.astuple(row))
    values[1] = ts
    values[4] = labels
    return tuple(values)


def _sqlite_values(row: UsageRow, labels: str) -> tuple[Any, ...]:
    """A row's values as SQLite binds them fastest: the flags as 0/1, since sqlite3 looks up an
    adapter for every value that is not exactly an int, float or str (a bool costs 10 times an int)."""
    v = msgspec.structs.astuple(row)
    return (v[0], _epoch_text(v[1]), v[2], v[3], labels, v[5], v[6], v[7], v[8],
            1 if v[9] else 0, 1 if v[10] else 0, 1 if v[11] else 0) + v[12:]


def store_for_url(database: str, table: str, schema: str | None = None, pool_size: int = 4,
                  base_dir: Path | None = None) -> UsageStore:
    """The store a ``[metering] database`` URL names.

    ``sqlite:///usage.db`` is relative (to `base_dir`, the config file's folder), and
    ``sqlite:////var/lib/gk/usage.db`` absolute; ``postgresql://user@host/db`` is PostgreSQL.
    """
    if database.startswith("sqlite:///"):
        path = database[len("sqlite:///"):]
        if path != ":memory:" and not Path(path).is_absolute() and base_dir is not None:
            path = str(base_dir / path)
        return SqliteStore(path, table)
    if database.startswith(("postgresql://", "postgres://")):
        return PostgresStore(database, table, schema, pool_size)
    raise ValueError("database must start with sqlite:/// or postgresql://")

