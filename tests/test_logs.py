"""One format and one redaction for every log line, whoever wrote it: gatekeeper's own events,
the stdlib records of aiohttp and asyncio, and the warnings a library raises."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import structlog

from gatekeeper.logs import configure_logging, get_logger, register_secret

SECRET = "sk-upstream-secret-for-the-log-test"


@pytest.fixture(autouse=True)
def logging_put_back():
    """Each test sets logging up as `gatekeeper serve` does with log_format = "json" (inside the
    test: the handler writes to the stderr of that moment, which pytest swaps between phases)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    register_secret(SECRET)
    yield
    logging.captureWarnings(False)
    root.handlers[:], root.level = handlers, level
    structlog.reset_defaults()


def json_lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def test_stdlib_records_are_json_lines_with_their_logger_level_and_redaction(capsys):
    configure_logging("info", "json")
    logging.getLogger("aiohttp.server").warning("client sent %s", f"Bearer {SECRET}")
    (line,) = json_lines(capsys)
    assert line["logger"] == "aiohttp.server" and line["level"] == "warning"
    assert line["event"] == "client sent Bearer [redacted]"
    assert line["timestamp"].endswith("Z")


def test_a_stdlib_traceback_stays_inside_its_one_json_line(capsys):
    configure_logging("info", "json")
    try:
        raise ValueError(f"bad input near {SECRET}")
    except ValueError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    (line,) = json_lines(capsys)
    assert line["level"] == "error" and line["event"] == "Task exception was never retrieved"
    assert "ValueError: bad input near [redacted]" in line["exception"]


def test_a_library_warning_is_a_json_line_too(capsys):
    configure_logging("info", "json")
    warnings.warn("a deprecated call", DeprecationWarning, stacklevel=1)
    (line,) = json_lines(capsys)
    assert line["logger"] == "py.warnings" and "a deprecated call" in line["event"]


def test_gatekeeper_events_and_stdlib_records_share_the_format(capsys):
    configure_logging("info", "json")
    get_logger("gatekeeper.test").info("gateway event", key=SECRET)
    logging.getLogger("aiohttp.access").warning("stdlib record")
    own, foreign = json_lines(capsys)
    assert (own["event"], own["key"], own["level"]) == ("gateway event", "[redacted]", "info")
    assert (foreign["event"], foreign["level"]) == ("stdlib record", "warning")


def test_the_password_of_any_url_is_redacted_registered_or_not(capsys):
    configure_logging("info", "json")
    logging.getLogger("aiohttp.client").warning("proxy http://corp:hunter2@proxy.internal:3128 refused the tunnel")
    get_logger("gatekeeper.test").info("connecting", dsn="postgresql://gk:s3cret-pw@db.internal/usage")
    stdlib, own = json_lines(capsys)
    assert stdlib["event"] == "proxy http://corp:[redacted]@proxy.internal:3128 refused the tunnel"
    assert own["dsn"] == "postgresql://gk:[redacted]@db.internal/usage"
