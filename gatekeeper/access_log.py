"""The access log: one structured line per request, cheap enough for the hot path.

Going through structlog's processor chain and a flushed write per line cost more CPU than a
cache hit itself, so access lines take a shorter road: each request leaves a small msgspec
Struct in a buffer, and the buffer is encoded in one call and written out every
`flush_interval_s` (or when it fills up). On a TTY, lines go through structlog's console renderer
instead, for people reading along. The only client-controlled strings in a line (path and model)
pass the same redaction as every other log.
"""

from __future__ import annotations

import asyncio
import sys
import time

import msgspec

from gatekeeper.logs import get_logger, redact_text, secrets_registered
from gatekeeper.memo import BoundedMemo

__all__ = ["AccessLine", "AccessLog"]

_encode_lines = msgspec.json.Encoder().encode_lines
_CLEAN_MEMO_SIZE = 1024


class AccessLine(msgspec.Struct, kw_only=True):
    """One request, as its JSON line: the fields in this order, then event, level and timestamp."""

    request_id: str
    method: str
    path: str
    status: int | None
    ms: float
    tenant: str | None
    key_id: str | None
    model: str | None
    cache: str | None
    outcome: str | None
    upstream_request_id: str | None
    event: str = "request"
    level: str = "info"
    timestamp: str = ""


class AccessLog:
    def __init__(self, *, json_lines: bool, flush_interval_s: float = 0.2, max_buffered_lines: int = 512) -> None:
        self.json_lines = json_lines
        self.flush_interval_s = flush_interval_s
        self.max_buffered_lines = max_buffered_lines
        self._buffer: list[AccessLine] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._second = -1
        self._second_text = ""
        self._clean_memo: BoundedMemo[str, str] = BoundedMemo(_CLEAN_MEMO_SIZE)
        self._clean_secrets = 0  # secrets_registered() when the memo was filled
        self._console = get_logger("gatekeeper.access")

    def _timestamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:  # format the date once per second, not once per line
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1e6):06d}Z"

    def clean(self, value: str | None) -> str | None:
        """A client-sent string as logged: redacted and cut to 300 characters (memoised: they repeat)."""
        if not value:
            return value
        if self._clean_secrets != secrets_registered():  # a secret registered since (a reload): redact anew
            self._clean_memo.clear()
            self._clean_secrets = secrets_registered()
        cleaned = self._clean_memo.get(value)
        if cleaned is None:
            cleaned = self._clean_memo.remember(value, redact_text(value)[:300])
        return cleaned

    def record(self, line: AccessLine) -> None:
        """Log one request. `line.path` and `line.model` are cleaned here; the timestamp is now."""
        line.path = self.clean(line.path) or ""
        line.model = self.clean(line.model)
        if not self.json_lines:
            fields = msgspec.structs.asdict(line)
            for name in ("event", "level", "timestamp"):
                del fields[name]
            self._console.info("request", **fields)
            return
        line.timestamp = self._timestamp(time.time())
        buffer = self._buffer
        buffer.append(line)
        if len(buffer) >= self.max_buffered_lines:
            self.flush()
        elif self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._flush_handle = loop.call_later(self.flush_interval_s, self.flush)

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._buffer:
            return
        data = _encode_lines(self._buffer)
        self._buffer = []
        stream = sys.stderr
        try:
            stream.buffer.write(data) if hasattr(stream, "buffer") else stream.write(data.decode())
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not take requests down with it
