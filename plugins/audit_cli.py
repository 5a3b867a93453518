"""``gatekeeper audit``: verify the chain, find the record behind an image file, search records.

    gatekeeper audit verify [PATH ...] [--config FILE]     exit 0: intact; 1: names the first bad seq
    gatekeeper audit find-image IMAGE [--config FILE | --path LOG]
    gatekeeper audit find-file FILE [--config FILE | --path LOG]
    gatekeeper audit search [--tenant T] [--since D] [--upstream-request-id ID] ... [--config | --path]

Without PATHs, the files of ``[audit] path`` (rotated ones first) are read. The HMAC key comes
from ``--config`` (``[audit] hmac_key``) or ``$GATEKEEPER_AUDIT_KEY``. Matching records are
printed exactly as stored, one JSON line each.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import os
import re
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from gatekeeper.config import ConfigError, decode_section, parse_config, resolve_config_path
from gatekeeper.errors import MALFORMED_JSON
from gatekeeper_plugins.audit_chain import Checkpoint, iter_records, log_files, verify_files

__all__ = ["add_audit_commands", "parse_since"]

KEY_ENV = "GATEKEEPER_AUDIT_KEY"


# ------------------------------------------------------------------ shared plumbing


def _audit_settings(config_arg: str | None) -> tuple[Any, str]:
    """The ``[audit]`` section alone: other sections (and their ${VARS}) are not needed here."""
    from gatekeeper_plugins.audit import AuditConfig

    path = resolve_config_path(config_arg)
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (use --config, --path or PATH arguments)") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    config = parse_config({"audit": raw.get("audit", {})}, str(path))
    return decode_section(config.sections.get("audit"), AuditConfig, "audit", str(path)), str(path)


def _live_path(args: argparse.Namespace) -> Path:
    from gatekeeper_plugins.audit import resolve_log_path

    if getattr(args, "path", None):
        return Path(args.path).absolute()
    settings, config_path = _audit_settings(args.config)
    return resolve_log_path(settings.path, config_path)


def _files(live: Path) -> list[Path]:
    files = log_files(live)
    if not files:
        raise ConfigError(f"{live}: no audit log here")
    return files


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    from gatekeeper.cli import add_config_argument

    add_config_argument(parser)
    parser.add_argument("--path", help="the live audit log file (default: [audit] path of the config)")


# ------------------------------------------------------------------ verify


def cmd_verify(args: argparse.Namespace) -> int:
    settings = None
    if args.config or not args.paths:
        settings, config_path = _audit_settings(args.config)
    if args.paths:
        files = [Path(p) for p in args.paths]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise ConfigError(f"no such file: {', '.join(missing)}")
        live = files[-1]
    else:
        from gatekeeper_plugins.audit import resolve_log_path

        live = resolve_log_path(settings.path, config_path)
        files = _files(live)

    key_text = (settings.hmac_key if settings else None) or os.environ.get(KEY_ENV) or None
    key = key_text.encode() if key_text else None

    checkpoints: list[Checkpoint] = []
    sidecar = live.with_name(live.name + ".checkpoint")
    files_given = [Path(f) for f in args.checkpoint]
    if not files_given and sidecar.is_file() and not args.no_checkpoint:
        files_given = [sidecar]
    local: Checkpoint | None = None
    for checkpoint_file in files_given:
        try:
            local = Checkpoint.decode(checkpoint_file.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"no such checkpoint file: {checkpoint_file}") from None
        except MALFORMED_JSON as error:
            print(f"FAIL: checkpoint {checkpoint_file} is unreadable: {error}")
            return 1
        if key is not None and not local.mac_ok(key):
            print(f"FAIL: checkpoint {checkpoint_file} is not signed with this key: it was altered or replaced")
            return 1
        checkpoints.append(local)
    if settings is not None and settings.checkpoint_dsn and not args.no_db:
        from gatekeeper_plugins.audit import log_name_for
        from gatekeeper_plugins.audit_pg import fetch_checkpoints

        # The name this host gives the log, plus the one in the checkpoint file (when verifying a
        # copy elsewhere); an altered file name can only add rows to check, never hide any.
        names = {args.log_name or log_name_for(live.absolute())}
        if local is not None and local.log_name and not args.log_name:
            names.add(local.log_name)
        stored = [checkpoint for name in sorted(names)
                  for checkpoint in asyncio.run(fetch_checkpoints(settings.checkpoint_dsn, settings.checkpoint_table,
                                                                  name))]
        bad = [c for c in stored if key is not None and not c.mac_ok(key)]
        if bad:
            print(f"FAIL: the stored checkpoint of seq {bad[0].seq} is not signed with this key")
            return 1
        if not stored:
            print(f"  warning: no checkpoint stored in {settings.checkpoint_table} for {', '.join(sorted(names))}")
        checkpoints.extend(stored)

    result = verify_files(files, key=key, checkpoints=checkpoints, partial=args.partial)
    if not result.ok:
        print(f"FAIL at seq {result.bad_seq}: {result.reason}")
        return 1
    span = f"seq {result.first_seq}..{result.last_seq}" if result.records else "empty"
    print(f"OK: {result.records} records ({span}) in {len(files)} file(s); head {result.head}")
    if result.macs_checked:
        print("  every mac checked with the HMAC key")
    elif result.unsigned_macs:
        print(f"  {result.unsigned_macs} macs NOT checked: no key (use --config or ${KEY_ENV})")
    if checkpoints:
        print(f"  {result.checkpoints_checked} checkpoint(s) matched"
              f"{'' if result.checkpoints_checked == len(checkpoints) else ' (others predate these files)'}")
    else:
        print("  no checkpoint: a cut-off tail cannot be detected")
    if result.recoveries:
        print(f"  recovery records at seq {', '.join(map(str, result.recoveries))} (torn tails were quarantined)")
    return 0


# ------------------------------------------------------------------ find-image and search


Wanted = Callable[[bytes, dict[str, Any]], bool]  # a stored line and its record -> keep it?


def matching_lines(files: list[Path], wanted: Wanted, limit: int | None = None) -> Iterator[bytes]:
    """The stored lines of the records `wanted` keeps, oldest first, at most `limit`."""
    count = 0
    for line, record, _ in iter_records(files):
        if record is not None and wanted(line, record):
            if count == limit:
                return
            count += 1
            yield line


def _print_lines(lines: Iterator[bytes]) -> int:
    out = sys.stdout.buffer
    count = 0
    for line in lines:
        out.write(line + b"\n")
        count += 1
    out.flush()
    return count


def cmd_find_image(args: argparse.Namespace) -> int:
    digest = hashlib.sha256(Path(args.image).read_bytes()).hexdigest()
    return _find_digest(args, digest, "output_image_sha256", "returned an image")


def cmd_find_file(args: argparse.Namespace) -> int:
    with open(args.file, "rb") as sent:
        digest = hashlib.file_digest(sent, "sha256").hexdigest()
    return _find_digest(args, digest, "input_file_sha256", "sent a file upstream")


def _find_digest(args: argparse.Namespace, digest: str, field: str, what: str) -> int:
    """Print the records whose `field` (a list of digests) holds `digest`; exit 1 when none does."""
    needle = digest.encode()
    found = _print_lines(matching_lines(_files(_live_path(args)),
                                       lambda line, record: needle in line and digest in (record.get(field) or ())))
    if not found:
        print(f"no audit record {what} with sha256 {digest}", file=sys.stderr)
        return 1
    return 0


_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: datetime.datetime | None = None) -> datetime.datetime:
    """An ISO date or date-time (UTC unless it says otherwise), or an age such as 30m, 24h, 7d."""
    match = _RELATIVE.fullmatch(text.strip())
    if match:
        now = now or datetime.datetime.now(datetime.UTC)
        return now - datetime.timedelta(seconds=float(match.group(1)) * _UNIT_S[match.group(2)])
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date, date-time or age (30m, 24h, 7d): {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def _record_time(record: dict[str, Any]) -> datetime.datetime | None:
    value = record.get("time_start")
    if not isinstance(value, str):
        return None
    try:
        return datetime.datetime.fromisoformat(value)
    except ValueError:
        return None


SEARCH_FIELDS = ("tenant", "upstream_request_id", "request_id", "key_id", "outcome", "model", "type")


def search_filter(values: Mapping[str, Any]) -> Wanted:
    """Keep a record when each of `SEARCH_FIELDS` given in `values` equals the record's, and its
    `time_start` is at or after `since` and before `until` (datetimes) when given."""
    filters: list[Callable[[dict[str, Any]], bool]] = []
    for field in SEARCH_FIELDS:
        value = values.get(field)
        if value is not None:
            filters.append(lambda record, field=field, value=value: record.get(field) == value)
    since, until = values.get("since"), values.get("until")
    if since is not None:
        filters.append(lambda record: (moment := _record_time(record)) is not None and moment >= since)
    if until is not None:
        filters.append(lambda record: (moment := _record_time(record)) is not None and moment < until)
    return lambda _line, record: all(check(record) for check in filters)


SEARCH_LIMIT, SEARCH_MAX_LIMIT = 1000, 100_000


def parse_search_query(query: Mapping[str, str]) -> tuple[dict[str, Any], int]:
    """The filters and the limit of ``GET /admin/audit``'s query; ValueError(param, message) for a
    parameter that is unknown or won't parse."""
    values: dict[str, Any] = {}
    limit = SEARCH_LIMIT
    for name, value in query.items():
        if name in SEARCH_FIELDS:
            values[name] = value
        elif name in ("since", "until"):
            try:
                values[name] = parse_since(value)
            except argparse.ArgumentTypeError as error:
                raise ValueError(name, f"{name}: {error}") from None
        elif name == "limit":
            if not value.isdigit() or not 1 <= int(value) <= SEARCH_MAX_LIMIT:
                raise ValueError(name, f"limit must be a whole number from 1 to {SEARCH_MAX_LIMIT}")
            limit = int(value)
        else:
            known = ", ".join((*SEARCH_FIELDS, "since", "until", "limit"))
            raise ValueError(name, f"unknown parameter {name!r}: use {known}")
    return values, limit


def cmd_search(args: argparse.Namespace) -> int:
    _print_lines(matching_lines(_files(_live_path(args)), search_filter(vars(args))))
    return 0


# ------------------------------------------------------------------ wiring


def add_audit_commands(subparsers: argparse._SubParsersAction) -> None:
    from gatekeeper.cli import add_config_argument

    audit = subparsers.add_parser("audit", help="verify, search and query the compliance audit log")
    commands = audit.add_subparsers(dest="audit_command", required=True)

    verify = commands.add_parser("verify", help="check the hash chain, macs and checkpoints; name the first bad seq")
    verify.add_argument("paths", nargs="*", metavar="PATH",
                        help="log files, oldest first (default: every file of [audit] path)")
    add_config_argument(verify)
    verify.add_argument("--checkpoint", action="append", default=[], metavar="FILE",
                        help="a checkpoint to check against, e.g. a copy anchored elsewhere; repeatable "
                             "(default: <live log>.checkpoint, if present)")
    verify.add_argument("--no-checkpoint", action="store_true", help="ignore the checkpoint file")
    verify.add_argument("--no-db", action="store_true", help="ignore checkpoints stored in PostgreSQL")
    verify.add_argument("--log-name", help="the log's name in the checkpoint table (default: from the checkpoint file)")
    verify.add_argument("--partial", action="store_true",
                        help="accept a chain that starts after seq 1 (earlier files archived)")
    verify.set_defaults(func=cmd_verify)

    find = commands.add_parser("find-image", help="print the record(s) that returned this image file")
    find.add_argument("image", metavar="IMAGE", help="an image file saved from a response")
    _add_source_arguments(find)
    find.set_defaults(func=cmd_find_image)

    find_file = commands.add_parser("find-file", help="print the record(s) of uploads that sent this file upstream")
    find_file.add_argument("file", metavar="FILE", help="a file as it was uploaded (the Files API, Uploads API parts)")
    _add_source_arguments(find_file)
    find_file.set_defaults(func=cmd_find_file)

    search = commands.add_parser("search", help="print records matching every filter given, as JSON lines")
    _add_source_arguments(search)
    search.add_argument("--tenant")
    search.add_argument("--key-id", dest="key_id")
    search.add_argument("--since", type=parse_since, help="ISO date/date-time (UTC) or an age: 30m, 24h, 7d")
    search.add_argument("--until", type=parse_since, help="same formats as --since; exclusive")
    search.add_argument("--upstream-request-id", dest="upstream_request_id")
    search.add_argument("--request-id", dest="request_id")
    search.add_argument("--outcome")
    search.add_argument("--model")
    search.add_argument("--type", help="record type: request (default: every type), recovery, outage")
    search.set_defaults(func=cmd_search)
