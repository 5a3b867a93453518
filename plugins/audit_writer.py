"""The audit log's single writer: one thread that appends, fsyncs, rotates and checkpoints.

Records are queued by the event loop (`AuditLog.submit_group` in ``always`` mode, `add_batch` in
``batch`` mode, a group or batch at a time so the thread is woken once for many) and written by
one dedicated thread, so the chain order is the file order and no fsync ever blocks the loop. The
thread also completes `RequestRecord` s, encodes and chains them: that work stays off the loop.
Whatever is queued when the thread wakes goes out in one ``write`` and one ``fsync`` (group
commit): with ``fsync = "always"`` each submitter awaits its record's durability; with ``"batch"``
the thread waits for up to 50 ms or 100 records before each fsync and nobody waits.

A failed write or fsync (ENOSPC, EIO) cuts the file back to its last durable length and marks the
log broken. Records submitted with ``retain=True`` stay queued and are retried (with backoff)
until a write succeeds; the first line written after an outage is an ``outage`` record. Records
submitted with ``retain=False`` fail instead, so their request can fail in their place.

On `open`, the tail of the log is checked: a torn last line (no newline, or not a record) is
moved to a quarantine file, the file is cut back to the last good line, and a ``recovery`` record
continues the chain from there.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from gatekeeper.errors import MALFORMED_JSON
from gatekeeper.logs import get_logger
from gatekeeper_plugins.audit_chain import GENESIS, Checkpoint, line_hash, log_files, mac_ok, seal
from gatekeeper_plugins.audit_record import RequestRecord, complete, iso_time

__all__ = ["AuditLog", "AuditUnavailable", "BATCH_WINDOW_S", "BATCH_MAX_RECORDS"]

log = get_logger("gatekeeper.audit")

BATCH_WINDOW_S = 0.05
BATCH_MAX_RECORDS = 100
MAX_PENDING = 100_000  # records held in memory while the disk refuses writes; beyond: counted, logged, dropped
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0
TAIL_WINDOW = 256 * 1024

_decode = msgspec.json.Decoder().decode

Record = dict[str, Any] | RequestRecord  # a RequestRecord is completed in the writer thread


def _field(record: Record, name: str) -> Any:
    return record.get(name) if isinstance(record, dict) else getattr(record, name, None)


class AuditUnavailable(Exception):
    """The record could not be made durable (the log is broken, or closed)."""


@dataclass(slots=True, eq=False)  # groups compare by identity
class _Group:
    """Records queued together: written in order, and answered together once the last is written."""

    records: list[Record]
    future: concurrent.futures.Future[int] | None
    retain: bool
    enqueued: float


@dataclass(slots=True)
class _Tail:
    good_end: int  # byte offset just past the last good line
    last: bytes | None  # the last good line
    before: bytes | None  # the line before it, when it was read
    torn: bytes  # what follows the last good line


def _as_record(line: bytes) -> dict[str, Any] | None:
    try:
        value = _decode(line)
    except MALFORMED_JSON:
        return None
    if isinstance(value, dict) and isinstance(value.get("seq"), int) and isinstance(value.get("prev"), str):
        return value
    return None


def _seal_stand_in(record: Record, seq: int, prev: str, key: bytes | None, error: Exception) -> bytes:
    """The line of a record that can't be encoded (a plugin put an odd value on the flow): a record
    saying so takes its place, rather than the chain stalling or the record vanishing."""
    log.error("audit record could not be encoded", request_id=_field(record, "request_id"), error=repr(error))
    stand_in = {"type": _field(record, "type") or "request", "request_id": _field(record, "request_id"),
                "time_start": _field(record, "time_start"), "time_end": _field(record, "time_end"),
                "error": f"audit record could not be encoded: {error!r}"[:500]}
    return seal(stand_in, seq, prev, key)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(error: OSError) -> str:
    name = errno.errorcode.get(error.errno or 0, "OSError")
    return f"{name}: {error.strerror or error}"


class AuditLog:
    """One append-only, hash-chained log file (plus its rotated predecessors and checkpoint)."""

    def __init__(
        self,
        path: Path,
        *,
        fsync: str = "always",
        key: bytes | None = None,
        rotate_bytes: int = 104857600,
        checkpoint_every: int = 1000,
        log_name: str = "",
        on_checkpoint: Callable[[Checkpoint], None] | None = None,
    ) -> None:
        self.path = path
        self.checkpoint_path = path.with_name(path.name + ".checkpoint")
        self.fsync_mode = fsync
        self.key = key
        self.rotate_bytes = rotate_bytes
        self.checkpoint_every = checkpoint_every
        self.log_name = log_name
        self.on_checkpoint = on_checkpoint
        # Seams for fault-injection tests (disk full, EIO): same signatures as os.write / os.fsync.
        self.write_fn: Callable[[int, bytes | memoryview], int] = os.write
        self.fsync_fn: Callable[[int], None] = os.fsync

        self.seq = 0
        self.head = GENESIS
        self.tail_ok = True
        self.broken: str | None = None  # why writes fail, while they do
        self.dropped = 0
        self.checkpoint_error: str | None = None
        self.last_checkpoint: Checkpoint | None = None
        self._fd: int | None = None
        self._size = 0
        self._needs_cut = False
        self._pending: list[_Group] = []  # written from the front, a batch at a time
        self._pending_records = 0  # records in `_pending`
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stop_deadline = 0.0
        self._retry_at = 0.0
        self._retry_delay = RETRY_FIRST_S
        self._broken_since = 0.0
        self._failed_attempts = 0
        self._dropped_in_outage = 0

    # ------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Recover the tail, open the live file and start the writer thread (blocking)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        recovery: list[dict[str, Any]] = []
        for file in reversed(log_files(self.path)):
            tail = self._read_tail(file)
            if tail.torn:
                recovery.append(self._quarantine(file, tail))
            if tail.last is not None:
                self._take_head(tail)
                break
        recovery.extend(self._check_checkpoint())
        self._open_live()
        if recovery:
            self._pending.append(_Group(list(recovery), None, True, time.monotonic()))
            self._pending_records = len(recovery)
        self._thread = threading.Thread(target=self._run, name="gatekeeper-audit-writer", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> int:
        """Write what is queued (retrying up to `timeout` while the disk refuses), checkpoint the
        head and stop. Returns how many records could not be written (0 unless the disk stayed broken)."""
        with self._cond:
            self._stopping = True
            self._stop_deadline = time.monotonic() + timeout
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout + 5.0)
        lost = self._pending_records
        if lost:
            log.error("audit records could not be written before shutdown", lost=lost, error=self.broken)
        if self._fd is not None:
            if not self.broken:
                self._write_checkpoint()
            os.close(self._fd)
            self._fd = None
        return lost

    @property
    def pending(self) -> int:
        return self._pending_records

    # ------------------------------------------------------------ submitting

    def submit(self, record: Record, *, retain: bool = True) -> concurrent.futures.Future[int]:
        """Queue `record`; the future resolves with its seq once written (and fsynced in ``always``
        mode), or fails with `AuditUnavailable`. With `retain`, a failed record stays queued."""
        return self.submit_group([record], retain=retain)

    def submit_group(self, records: list[Record], *, retain: bool = True) -> concurrent.futures.Future[int]:
        """Queue `records` (the list is handed over) with one wake-up of the writer and one future
        for them all: it resolves with the seq of the last once that is written (they share a write
        and an fsync), or fails with `AuditUnavailable`. With `retain`, failed records stay queued."""
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        if not records:
            future.set_result(self.seq)
            return future
        with self._cond:
            if self._stopping and not self._thread_alive():
                log.error("audit records submitted after close", request_ids=[_field(r, "request_id") for r in records])
                future.set_exception(AuditUnavailable("the audit log is closed"))
                return future
            if self.broken and not retain:
                future.set_exception(AuditUnavailable(self.broken))
                return future
            if self._pending_records + len(records) > MAX_PENDING:
                self.dropped += len(records)
                self._dropped_in_outage += len(records)
                log.error("audit queue full: records dropped", request_ids=[_field(r, "request_id") for r in records],
                          dropped=self.dropped, error=self.broken)
                future.set_exception(AuditUnavailable("the audit queue is full"))
                return future
            self._pending.append(_Group(records, future, retain, time.monotonic()))
            self._pending_records += len(records)
            self._cond.notify()
        return future

    def add_batch(self, records: list[RequestRecord], since: float) -> None:
        """Queue records captured since monotonic time `since` (``batch`` mode; the list is handed
        over), with no waiter and one wake-up of the writer for the lot: a wake-up costs more CPU
        than a record. The writer completes, seals and writes them together."""
        if not records:
            return
        with self._cond:
            if self._stopping and not self._thread_alive():
                log.error("audit records submitted after close", lost=len(records))
                return
            room = max(MAX_PENDING - self._pending_records, 0)
            if len(records) > room:
                lost = len(records) - room
                self.dropped += lost
                self._dropped_in_outage += lost
                log.error("audit queue full: records dropped", lost=lost, dropped=self.dropped, error=self.broken)
                records = records[:room]
                if not records:
                    return
            self._pending.append(_Group(records, None, True, since))
            self._pending_records += len(records)
            self._cond.notify()

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
            if batch is None:
                return
            try:
                self._flush(batch)
            except Exception as error:  # a bug must not kill the writer and leave waiters hanging
                log.exception("audit writer failed unexpectedly")
                self._fail(OSError(errno.EIO, f"audit writer error: {error!r}"))

    def _next_batch(self) -> list[_Group] | None:
        """Wait (holding the condition) until there is something to write; None means stop."""
        while True:
            now = time.monotonic()
            if self._stopping and (not self._pending or now >= self._stop_deadline):
                return None
            if self.broken:
                if now < self._retry_at:
                    self._cond.wait(min(self._retry_at - now, max(self._stop_deadline - now, 0.001))
                                    if self._stopping else self._retry_at - now)
                    continue
                return list(self._pending)  # may be empty: the outage record alone probes the disk
            if not self._pending:
                self._cond.wait()
                continue
            if self.fsync_mode == "batch" and not self._stopping:
                remaining = self._pending[0].enqueued + BATCH_WINDOW_S - now
                if self._pending_records < BATCH_MAX_RECORDS and remaining > 0:
                    self._cond.wait(remaining)
                    continue
                return self._first_records(BATCH_MAX_RECORDS)
            return list(self._pending)

    def _first_records(self, limit: int) -> list[_Group]:
        """The groups at the front holding at most `limit` records; a first group holding more is
        split, and only its first `limit` records go now (the others keep its waiter)."""
        batch: list[_Group] = []
        count = 0
        for group in self._pending:
            count += len(group.records)
            if count > limit:
                if not batch:
                    head = _Group(group.records[:limit], None, group.retain, group.enqueued)
                    del group.records[:limit]
                    self._pending.insert(0, head)
                    batch.append(head)
                break
            batch.append(group)
        return batch

    def _flush(self, batch: list[_Group]) -> None:
        records = [complete(record) if type(record) is RequestRecord else record
                   for group in batch for record in group.records]
        written = len(records)
        if self.broken:
            records.insert(0, self._outage_record())
        seq, prev = self.seq, self.head
        lines = []
        sha256 = hashlib.sha256  # line_hash, inlined: this loop runs for every record
        key = self.key
        for record in records:
            seq += 1
            try:
                line = seal(record, seq, prev, key)
            except (TypeError, ValueError, msgspec.EncodeError) as error:
                line = _seal_stand_in(record, seq, prev, key, error)
            prev = sha256(line).hexdigest()
            lines.append(line)
        lines.append(b"")  # the last newline
        data = b"\n".join(lines)
        try:
            self._prepare_file()
            self._append(data)
        except OSError as error:
            self._fail(error)
            return
        self.seq, self.head = seq, prev
        self._size += len(data)
        if self.broken:
            log.warning("audit log is writable again", outage_s=round(time.monotonic() - self._broken_since, 3),
                        failed_attempts=self._failed_attempts)
        with self._cond:
            self.broken = None
            self._retry_delay = RETRY_FIRST_S
            self._dropped_in_outage = 0
            del self._pending[: len(batch)]
            self._pending_records -= written
        for group in batch:
            if group.future is not None and not group.future.done():
                try:
                    group.future.set_result(_field(group.records[-1], "seq"))
                except concurrent.futures.InvalidStateError:
                    pass  # the waiter was cancelled (client gone); the records are written all the same
        checkpointed = self.last_checkpoint.seq if self.last_checkpoint else 0
        if self.seq // self.checkpoint_every > checkpointed // self.checkpoint_every:
            self._write_checkpoint()

    def _outage_record(self) -> dict[str, Any]:
        return {
            "type": "outage",
            "time_start": iso_time(time.time() - (time.monotonic() - self._broken_since)),
            "time_end": iso_time(time.time()),
            "error": self.broken,
            "failed_attempts": self._failed_attempts,
            "dropped": self._dropped_in_outage,
        }

    def _fail(self, error: OSError) -> None:
        described = _describe(error)
        try:
            if self._fd is not None:
                os.ftruncate(self._fd, self._size)  # never leave a torn line to append after
                self._needs_cut = False
        except OSError:
            self._needs_cut = True
        with self._cond:
            if not self.broken:
                self._broken_since = time.monotonic()
                self._failed_attempts = 0
                log.error("audit log write failed: records are held and retried", error=described,
                          pending=self._pending_records)
            self.broken = described
            self._failed_attempts += 1
            self._retry_at = time.monotonic() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX_S)
            # Every waiter learns now, not at the next attempt: records that may not wait (their
            # request fails in their place) leave the queue, the others stay for the retry.
            waiting = list(self._pending)
            self._pending = [group for group in waiting if group.retain]
            self._pending_records = sum(len(group.records) for group in self._pending)
        for group in waiting:
            if group.future is not None and not group.future.done():
                try:
                    group.future.set_exception(AuditUnavailable(described))
                except concurrent.futures.InvalidStateError:
                    pass
            if group.retain:
                group.future = None  # its waiter has its answer; the records themselves stay queued

    # ------------------------------------------------------------ file operations

    def _prepare_file(self) -> None:
        if self._fd is None:
            self._open_live()
        assert self._fd is not None
        if self._needs_cut:
            os.ftruncate(self._fd, self._size)
            self._needs_cut = False
        if self._size >= self.rotate_bytes:
            self._rotate()

    def _append(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = self.write_fn(self._fd, view)
            if written <= 0:
                raise OSError(errno.EIO, "short write")
            view = view[written:]
        self.fsync_fn(self._fd)

    def _open_live(self) -> None:
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = os.fstat(self._fd).st_size
        if created:
            _fsync_dir(self.path.parent)

    def _rotate(self) -> None:
        """Rename the live file to the next number; the chain carries on in a new live file."""
        assert self._fd is not None
        numbers = [int(m.group(1)) for f in log_files(self.path)
                   if (m := re.search(r"\.(\d{6,})" + re.escape(self.path.suffix) + "$", f.name))]
        target = self.path.with_name(f"{self.path.stem}.{max(numbers, default=0) + 1:06d}{self.path.suffix}")
        os.close(self._fd)
        self._fd = None
        os.rename(self.path, target)
        _fsync_dir(self.path.parent)
        self._write_checkpoint(file=target.name)
        self._open_live()
        log.info("audit log rotated", rotated_to=str(target), seq=self.seq)

    def _write_checkpoint(self, file: str | None = None) -> None:
        checkpoint = Checkpoint(seq=self.seq, hash=self.head, file=file or self.path.name,
                                time=iso_time(time.time()), log_name=self.log_name).signed(self.key)
        temporary = self.checkpoint_path.with_name(self.checkpoint_path.name + ".tmp")
        try:
            with open(temporary, "wb") as handle:
                handle.write(checkpoint.encode() + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.checkpoint_path)
            _fsync_dir(self.path.parent)
            self.checkpoint_error = None
        except OSError as error:
            self.checkpoint_error = _describe(error)
            log.error("audit checkpoint could not be written", error=self.checkpoint_error)
        self.last_checkpoint = checkpoint
        if self.on_checkpoint is not None:
            self.on_checkpoint(checkpoint)

    # ------------------------------------------------------------ start-up recovery

    def _read_tail(self, file: Path) -> _Tail:
        """Find the last good line of `file`, reading backwards in growing windows."""
        with open(file, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            window = TAIL_WINDOW
            while True:
                start = max(0, size - window)
                handle.seek(start)
                data = handle.read(size - start)
                lines = data.split(b"\n")
                lines.pop()  # bytes after the last newline: b"" when the file ends cleanly
                first = 0 if start == 0 else 1  # a window that starts mid-file starts mid-line
                index = next((i for i in range(len(lines) - 1, first - 1, -1) if _as_record(lines[i])), None)
                if start > 0 and (index is None or index - 1 < first):
                    window *= 4
                    continue
                break
        if index is None:
            return _Tail(0, None, None, data)
        good_end = start + sum(len(line) + 1 for line in lines[: index + 1])
        before = lines[index - 1] if index - 1 >= first else None
        return _Tail(good_end, lines[index], before, data[good_end - start :])

    def _quarantine(self, file: Path, tail: _Tail) -> dict[str, Any]:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        quarantine = file.with_name(f"{file.name}.quarantine.{stamp}.{os.getpid()}")
        with open(quarantine, "wb") as handle:
            handle.write(tail.torn)
            handle.flush()
            os.fsync(handle.fileno())
        with open(file, "r+b") as handle:
            handle.truncate(tail.good_end)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(file.parent)
        log.warning("audit log had a torn tail: moved to quarantine", file=str(file), quarantine=str(quarantine),
                    bytes=len(tail.torn))
        now = iso_time(time.time())
        return {
            "type": "recovery",
            "reason": "torn_tail",
            "time_start": now,
            "time_end": now,
            "file": file.name,
            "quarantine_file": quarantine.name,
            "quarantined_bytes": len(tail.torn),
            "quarantined_sha256": hashlib.sha256(tail.torn).hexdigest(),
        }

    def _take_head(self, tail: _Tail) -> None:
        assert tail.last is not None
        last = _as_record(tail.last)
        assert last is not None
        self.seq = last["seq"]
        self.head = line_hash(tail.last)
        if tail.before is not None and last["prev"] != line_hash(tail.before):
            self.tail_ok = False
        if self.key is not None and not mac_ok(self.key, tail.last, last):
            self.tail_ok = False
        if not self.tail_ok:
            log.error("audit log tail does not verify: run `gatekeeper audit verify`", path=str(self.path),
                      seq=self.seq)

    def _check_checkpoint(self) -> list[dict[str, Any]]:
        """A checkpoint ahead of the log means records were lost or cut off: say so in the chain."""
        try:
            checkpoint = Checkpoint.decode(self.checkpoint_path.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, msgspec.DecodeError) as error:
            log.error("audit checkpoint is unreadable", path=str(self.checkpoint_path), error=str(error))
            return []
        self.last_checkpoint = checkpoint
        if checkpoint.seq > self.seq or (checkpoint.seq == self.seq and checkpoint.hash != self.head):
            log.error("audit log is behind its checkpoint: records are missing", checkpoint_seq=checkpoint.seq,
                      log_seq=self.seq)
            now = iso_time(time.time())
            return [{
                "type": "recovery",
                "reason": "behind_checkpoint",
                "time_start": now,
                "time_end": now,
                "checkpoint_seq": checkpoint.seq,
                "checkpoint_hash": checkpoint.hash,
                "log_seq": self.seq,
            }]
        return []
