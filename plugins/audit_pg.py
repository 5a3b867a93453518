"""An external home for audit checkpoints: a PostgreSQL table, one row per checkpoint.

A checkpoint kept next to the log can be cut off together with the log by whoever can write
that directory; a copy in another system cannot. Rows are only ever inserted (the table is a
history of chain heads), so granting the gateway's database role INSERT and SELECT but not
UPDATE or DELETE makes the history append-only. `gatekeeper audit verify --config ...` checks
every row of its log against the chain.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
from typing import Any

from gatekeeper.logs import get_logger
from gatekeeper_plugins.audit_chain import Checkpoint

__all__ = ["PostgresCheckpoints", "fetch_checkpoints", "TABLE_NAME"]

log = get_logger("gatekeeper.audit")

TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?")


def _ddl(table: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {table} ("
        " id bigserial PRIMARY KEY,"
        " log_name text NOT NULL,"
        " seq bigint NOT NULL,"
        " hash text NOT NULL,"
        " file text NOT NULL,"
        " checkpoint_time text NOT NULL,"
        " mac text,"
        " inserted_at timestamptz NOT NULL DEFAULT now())"
    )


class PostgresCheckpoints:
    """Inserts checkpoints from the writer thread without ever blocking it."""

    def __init__(self, dsn: str, table: str, timeout_s: float = 5.0) -> None:
        self.dsn = dsn
        self.table = table
        self.timeout_s = timeout_s
        self.error: str | None = None
        self.stored_seq: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection: Any = None
        self._lock = asyncio.Lock()
        self._tasks: set[concurrent.futures.Future[None]] = set()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await self._connect()
        except Exception as error:  # the log itself still works; the next checkpoint retries
            self.error = f"{type(error).__name__}: {error}"
            log.error("audit checkpoint table unavailable", table=self.table, error=self.error)

    async def _connect(self) -> Any:
        import asyncpg

        if self._connection is None or self._connection.is_closed():
            self._connection = await asyncpg.connect(self.dsn, timeout=self.timeout_s)
            await self._connection.execute(_ddl(self.table))
        return self._connection

    def submit(self, checkpoint: Checkpoint) -> None:
        """Called from the writer thread: hand the insert to the event loop."""
        if self._loop is None or self._loop.is_closed():
            return
        future = asyncio.run_coroutine_threadsafe(self._insert(checkpoint), self._loop)
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)

    async def _insert(self, checkpoint: Checkpoint) -> None:
        async with self._lock:
            try:
                connection = await self._connect()
                await connection.execute(
                    f"INSERT INTO {self.table} (log_name, seq, hash, file, checkpoint_time, mac)"
                    " VALUES ($1, $2, $3, $4, $5, $6)",
                    checkpoint.log_name, checkpoint.seq, checkpoint.hash, checkpoint.file, checkpoint.time,
                    checkpoint.mac, timeout=self.timeout_s,
                )
                self.stored_seq = checkpoint.seq
                self.error = None
            except Exception as error:
                self.error = f"{type(error).__name__}: {error}"
                log.error("audit checkpoint not stored in PostgreSQL", seq=checkpoint.seq, error=self.error)
                if self._connection is not None:
                    self._connection.terminate()
                    self._connection = None

    async def close(self) -> None:
        """Wait for inserts in flight (the final checkpoint among them), then disconnect."""
        pending = [asyncio.wrap_future(task) for task in list(self._tasks)]
        if pending:
            await asyncio.wait(pending, timeout=self.timeout_s)
        if self._connection is not None:
            await self._connection.close()
            self._connection = None


async def fetch_checkpoints(dsn: str, table: str, log_name: str) -> list[Checkpoint]:
    """Every checkpoint stored for `log_name`, oldest first (for ``gatekeeper audit verify``)."""
    import asyncpg

    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await connection.fetch(
            f"SELECT seq, hash, file, checkpoint_time, log_name, mac FROM {table} WHERE log_name = $1 ORDER BY id",
            log_name,
        )
    finally:
        await connection.close()
    return [Checkpoint(seq=row["seq"], hash=row["hash"], file=row["file"], time=row["checkpoint_time"],
                       log_name=row["log_name"], mac=row["mac"]) for row in rows]
