"""Writing usage rows off the response path: a queue flushed in batches by one background task.

`add` only appends to a deque, so recording a request never waits for a database. The task
writes whenever ``batch_rows`` rows are waiting or ``flush_interval_ms`` has passed, whichever
comes first. A failed write puts its rows back and is retried on the next tick (quietly when
the store was only busy: SQLite never waits for a lock on the event loop); the queue is
bounded by ``max_queue_rows`` (the oldest rows are dropped past it, and counted). `close`
writes everything still queued, so a graceful shutdown loses nothing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from gatekeeper.logs import get_logger
from gatekeeper_plugins.metering_store import StoreBusy, UsageRow, UsageStore

__all__ = ["BatchWriter"]

log = get_logger("gatekeeper.metering")

_BUSY_WARN_EVERY = 40  # failed attempts on a locked database: about 10 s at the default interval


class BatchWriter:
    """Batches rows into `store.insert` from a background task."""

    def __init__(self, store: UsageStore, *, batch_rows: int, flush_interval_s: float, max_queue_rows: int,
                 on_drop: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.batch_rows = batch_rows
        self.flush_interval_s = flush_interval_s
        self.max_queue_rows = max_queue_rows
        self.queue: deque[UsageRow] = deque()
        # Held while rows are between the queue and the database, so a reader of both (the
        # budget refresh) never sees a row in neither or in both.
        self.lock = asyncio.Lock()
        self.written = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._busy_attempts = 0
        self._on_drop = on_drop
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="metering-writer")

    def add(self, row: UsageRow) -> None:
        """Queue one row; never blocks."""
        queue = self.queue
        if len(queue) >= self.max_queue_rows:
            queue.popleft()
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop(1)
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("metering queue is full: dropping the oldest usage rows", dropped=self.dropped,
                          max_queue_rows=self.max_queue_rows, last_error=self.last_error)
        queue.append(row)
        if len(queue) >= self.batch_rows:
            self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                async with asyncio.timeout(self.flush_interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self.queue:
                await self.flush()

    async def flush(self) -> bool:
        """Write every queued row now; False when the database refused (rows stay queued)."""
        async with self.lock:
            queue = self.queue
            while queue:
                batch = [queue.popleft() for _ in range(min(self.batch_rows, len(queue)))]
                try:
                    await self.store.insert(batch)
                except Exception as error:  # keep the rows, retry next tick
                    queue.extendleft(reversed(batch))
                    self._failed(error)
                    return False
                self.written += len(batch)
                self.last_error = None
                self._busy_attempts = 0
            return True

    def _failed(self, error: Exception) -> None:
        if isinstance(error, StoreBusy):  # another process is writing: a retry will get through
            self._busy_attempts += 1
            if self._busy_attempts % _BUSY_WARN_EVERY == 0:
                log.warning("metering's database stays locked by another process; will retry",
                            attempts=self._busy_attempts, queued=len(self.queue))
        elif self.last_error != repr(error):  # the database is away
            log.error("metering could not write usage rows; will retry", error=repr(error), queued=len(self.queue))
        self.last_error = repr(error)

    async def close(self, attempts: int = 3) -> None:
        """Stop the task and write everything still queued."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        for attempt in range(attempts):
            if await self.flush():
                return
            await asyncio.sleep(0.2 * (attempt + 1))
        log.error("metering shut down with usage rows it could not write", lost=len(self.queue),
                  error=self.last_error)
