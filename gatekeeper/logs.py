"""Structured logs: JSON lines off a TTY, readable console lines on one.

Every log line passes `redact`, which removes registered secrets (upstream keys), the password
of any URL with credentials, and anything that looks like a bearer token or an API key, so no
log line can carry a key whatever a plugin puts in it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from typing import Any

import structlog
from yarl import URL

__all__ = ["configure_logging", "get_logger", "register_secret", "register_url_secrets", "redact_text",
           "secrets_registered"]

_secrets: set[str] = set()
_TOKEN_PATTERN = re.compile(r"(?i)(bearer\s+)[^\s\"',]+|\bsk-[A-Za-z0-9_\-]{6,}")
# The password of any URL with credentials ("redis://:pw@host", "http://user:pw@proxy"), registered or not.
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/:@'\"]*:)[^\s/@'\"]+@")


def register_secret(value: str | None) -> None:
    """Never let `value` appear in a log line."""
    if value and len(value) >= 4:
        _secrets.add(value)


def register_url_secrets(url: str | None) -> None:
    """Never let the password inside a connection URL (a database's DSN) appear in a log line;
    the rest of the URL (host, database, a SQLite file's path) stays readable."""
    if url:
        with contextlib.suppress(ValueError):
            register_secret(URL(url).password)


def secrets_registered() -> int:
    """How many secrets are registered; it only grows, so a memo of redacted text keyed on it stays true."""
    return len(_secrets)


def redact_text(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "[redacted]")
    if "@" in text and "://" in text:
        text = _URL_PASSWORD.sub(r"\1[redacted]@", text)
    if "sk-" not in text and "bearer" not in text.lower():
        return text  # cheap pre-check: nothing the pattern could match
    return _TOKEN_PATTERN.sub(lambda m: (m.group(1) or "") + "[redacted]", text)


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v) for v in value]
    return value


def _redact_processor(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return {key: _redact(value) for key, value in event_dict.items()}


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Set up structlog, and render the stdlib's records (aiohttp's, asyncio's, a library's
    warnings) through the same processors: one format and one redaction for every line, so a
    JSON log stays one JSON object per line whoever logged it."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer(colors=False) if use_console else structlog.processors.JSONRenderer()
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            _redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.stdlib.add_log_level, timestamper],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redact_processor,
            renderer,
        ],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))
    logging.captureWarnings(True)  # a library's warnings.warn() becomes a record of "py.warnings"


def get_logger(name: str = "gatekeeper") -> Any:
    return structlog.get_logger(name)
