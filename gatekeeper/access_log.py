"""The access log: one structured line per request, cheap enough for the hot path.

Going through structlog's processor chain and a flushed write per line cost more CPU than a
cache hit itself, so access lines take a shorter road: the fields are encoded once with msgspec
into a buffer that is written out every `flush_interval_s` (or when it fills up). On a TTY, lines
go through structlog's console renderer instead, for people reading along. The only
client-controlled strings in a line (path and model) pass the same redaction as every other log.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import msgspec

from gatekeeper.logs import get_logger, redact_text

__all__ = ["AccessLog"]

_encode = msgspec.json.Encoder().encode


class AccessLog:
    def __init__(self, *, json_lines: bool, flush_interval_s: float = 0.2, max_buffer_bytes: int = 64 * 1024) -> None:
        self.json_lines = json_lines
        self.flush_interval_s = flush_interval_s
        self.max_buffer_bytes = max_buffer_bytes
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._flush_handle: asyncio.TimerHandle | None = None
        self._second = -1
        self._second_text = ""
        self._console = get_logger("gatekeeper.access")

    def _timestamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:  # format the date once per second, not once per line
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1e6):06d}Z"

    def record(self, fields: dict[str, Any]) -> None:
        for name in ("path", "model"):
            value = fields.get(name)
            if value:
                fields[name] = redact_text(value)[:300]
        if not self.json_lines:
            self._console.info("request", **fields)
            return
        fields["event"] = "request"
        fields["level"] = "info"
        fields["timestamp"] = self._timestamp(time.time())
        line = _encode(fields) + b"\n"
        self._buffer.append(line)
        self._buffered += len(line)
        if self._buffered >= self.max_buffer_bytes:
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
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        stream = sys.stderr
        try:
            stream.buffer.write(data) if hasattr(stream, "buffer") else stream.write(data.decode())
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not take requests down with it
