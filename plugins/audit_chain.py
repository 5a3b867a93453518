"""The audit log's chain: canonical lines, their hashes and MACs, and the verifier.

A record is one line of canonical JSON (keys sorted, no whitespace, UTF-8) ending in ``\\n``.
Each record carries ``seq`` (1, 2, 3 ... across rotated files), ``prev`` (the SHA-256 hex of the
previous line's bytes, without its newline; `GENESIS` for the first) and, when a key is
configured, ``mac``: HMAC-SHA256 of the canonical JSON of the record without ``mac`` (the same
bytes as the line with its ``"mac":"…",`` member cut out). Editing,
deleting, inserting or reordering lines breaks ``seq`` or ``prev``; rewriting the whole chain
needs the HMAC key, and cutting lines off the end shows against a checkpoint of the head.

This module is pure (no I/O but reading files in `verify_files`), shared by the writer and the
``gatekeeper audit`` commands.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from gatekeeper.errors import MALFORMED_JSON

__all__ = [
    "GENESIS",
    "Checkpoint",
    "VerifyResult",
    "encode_canonical",
    "line_hash",
    "record_mac",
    "mac_ok",
    "seal",
    "log_files",
    "iter_records",
    "verify_files",
]

GENESIS = "0" * 64  # `prev` of the first record of a log

_encode = msgspec.json.Encoder(order="sorted").encode
_encode_as_declared = msgspec.json.Encoder().encode
_METHOD_MEMBER = b',"method":'
_decode = msgspec.json.Decoder().decode


def encode_canonical(value: Any) -> bytes:
    """Canonical JSON: keys sorted, no whitespace, non-ASCII as UTF-8, Decimals as strings."""
    return _encode(value)


def line_hash(line: bytes) -> str:
    """The chain hash of one line (its bytes without the trailing newline)."""
    return hashlib.sha256(line).hexdigest()


def record_mac(key: bytes, record: dict[str, Any]) -> str:
    """HMAC-SHA256 of the canonical JSON of `record` without its ``mac`` field."""
    unsigned = {name: value for name, value in record.items() if name != "mac"}
    return hmac.new(key, encode_canonical(unsigned), hashlib.sha256).hexdigest()


def mac_ok(key: bytes, line: bytes, record: dict[str, Any]) -> bool:
    """Check a stored line's ``mac`` without re-encoding it: the signed bytes are the line with its
    ``"mac":"…",`` member cut out (``mac`` is never the last key: ``prev`` and ``seq`` sort after it),
    so number formatting can never make a verifier disagree with the writer."""
    mac = record.get("mac")
    if not isinstance(mac, str):
        return False
    member = b'"mac":"' + mac.encode() + b'",'
    if member not in line:
        return False
    expected = hmac.new(key, line.replace(member, b"", 1), hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, expected)


def seal(record: dict[str, Any] | msgspec.Struct, seq: int, prev: str, key: bytes | None) -> bytes:
    """Give `record` its place in the chain and return its line (without newline).

    `record` is a dict, or a Struct with ``seq``, ``prev`` and ``mac`` fields whose fields are
    declared in sorted order and hold nothing that needs sorting (``audit_record.RequestRecord``):
    it is encoded as declared, `msgspec.UNSET` fields left out."""
    if isinstance(record, dict):
        record["seq"] = seq
        record["prev"] = prev
        record.pop("mac", None)
        if key is not None:
            record["mac"] = record_mac(key, record)
        return _encode(record)
    record.seq, record.prev, record.mac = seq, prev, msgspec.UNSET  # type: ignore[attr-defined]
    line = _encode_as_declared(record)
    if key is None:
        return line
    mac = hmac.new(key, line, hashlib.sha256).hexdigest()
    record.mac = mac  # type: ignore[attr-defined]
    # The mac signs the line without its member, so it is spliced in rather than encoded again:
    # ``"mac"`` sorts right before ``"method"``, which every record has; only when an object value
    # holds a ``"method"`` key too is the line encoded again instead.
    at = line.find(_METHOD_MEMBER)
    if line.find(_METHOD_MEMBER, at + 1) != -1:
        return _encode_as_declared(record)
    return b"%s,\"mac\":\"%s\"%s" % (line[:at], mac.encode(), line[at:])


# ------------------------------------------------------------------ files


def log_files(live: Path) -> list[Path]:
    """The files of one log, oldest first: rotated ``name.000001.jsonl`` ... then the live file."""
    pattern = re.compile(re.escape(live.stem) + r"\.(\d{6,})" + re.escape(live.suffix) + r"$")
    rotated = []
    if live.parent.is_dir():
        for candidate in live.parent.iterdir():
            match = pattern.match(candidate.name)
            if match:
                rotated.append((int(match.group(1)), candidate))
    files = [path for _, path in sorted(rotated)]
    if live.exists():
        files.append(live)
    return files


def iter_records(files: Iterable[Path]) -> Iterator[tuple[bytes, dict[str, Any] | None, bool]]:
    """Every line of `files` in order: its bytes (no newline), its record (None when it isn't a
    JSON object) and whether it ended with a newline (only a torn last line doesn't)."""
    for path in files:
        with open(path, "rb") as handle:
            for raw in handle:
                ended = raw.endswith(b"\n")
                line = raw[:-1] if ended else raw
                try:
                    record = _decode(line)
                except MALFORMED_JSON:
                    record = None
                yield line, record if isinstance(record, dict) else None, ended


# ------------------------------------------------------------------ checkpoints


class Checkpoint(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The chain head at some moment: the line with ``seq`` hashes to ``hash``."""

    seq: int
    hash: str
    file: str = ""
    time: str = ""
    log_name: str = ""
    mac: str | None = None

    def signed(self, key: bytes | None) -> Checkpoint:
        if key is None:
            return self
        unsigned = msgspec.to_builtins(msgspec.structs.replace(self, mac=None))
        mac = hmac.new(key, encode_canonical(unsigned), hashlib.sha256).hexdigest()
        return msgspec.structs.replace(self, mac=mac)

    def mac_ok(self, key: bytes) -> bool:
        return self.mac is not None and hmac.compare_digest(self.signed(key).mac or "", self.mac)

    def encode(self) -> bytes:
        return encode_canonical(self)

    @classmethod
    def decode(cls, data: bytes) -> Checkpoint:
        return msgspec.json.decode(data, type=cls)


# ------------------------------------------------------------------ verification


@dataclass
class VerifyResult:
    """What `verify_files` found. ``bad_seq`` names the first record that fails, if any."""

    records: int = 0
    first_seq: int | None = None
    last_seq: int = 0
    head: str = GENESIS
    bad_seq: int | None = None
    reason: str | None = None
    macs_checked: bool = False
    unsigned_macs: int = 0  # records that carry a mac nobody checked (no key given)
    recoveries: list[int] = field(default_factory=list)  # seqs of `recovery` records
    checkpoints_checked: int = 0

    @property
    def ok(self) -> bool:
        return self.bad_seq is None

    def fail(self, seq: int, reason: str) -> VerifyResult:
        self.bad_seq, self.reason = seq, reason
        return self


def verify_files(
    files: list[Path],
    *,
    key: bytes | None = None,
    checkpoints: Iterable[Checkpoint] = (),
    partial: bool = False,
) -> VerifyResult:
    """Walk the chain through `files` in order; stop at the first record that fails.

    A line whose ``seq`` is not the next number means lines were deleted, inserted or swapped;
    a ``prev`` that doesn't match the hash of the line before means that line was altered;
    a bad ``mac`` (with `key`) means this one was. Each checkpoint must match the line with its
    seq, and no checkpoint may lie beyond the end (a truncated tail). With `partial`, the chain
    may start after the genesis record (earlier files archived).
    """
    result = VerifyResult(macs_checked=key is not None)
    wanted: dict[int, list[Checkpoint]] = {}
    for checkpoint in checkpoints:
        wanted.setdefault(checkpoint.seq, []).append(checkpoint)
    expected: int | None = None if partial else 1
    prev = GENESIS
    for line, record, ended in iter_records(files):
        position = expected if expected is not None else result.last_seq + 1
        if not ended:
            return result.fail(position, "the line is cut short (no newline): a torn write")
        if record is None:
            return result.fail(position, "the line is not a JSON record")
        found = record.get("seq")
        if not isinstance(found, int) or isinstance(found, bool):
            return result.fail(position, "the record has no integer seq")
        if expected is None:  # partial: the chain is taken from its first record on
            expected, prev = found, record.get("prev")
        if found != expected:
            if result.records == 0:
                return result.fail(expected, f"the log starts at seq {found}, not {expected}: earlier records are "
                                             "missing (pass the earlier files first, or use --partial)")
            return result.fail(expected, f"expected seq {expected}, found seq {found}: "
                                         "records were deleted, inserted or reordered")
        if record.get("prev") != prev:
            if result.records == 0:
                return result.fail(expected, "the first record does not chain to genesis")
            return result.fail(expected - 1, f"record {expected - 1} was altered: its hash does not match "
                                             f"the prev recorded by seq {expected}")
        if key is not None:
            if not mac_ok(key, line, record):
                return result.fail(expected, "the mac does not match: the record was altered "
                                             "or signed with another key")
        elif "mac" in record:
            result.unsigned_macs += 1
        prev = line_hash(line)
        for checkpoint in wanted.pop(expected, ()):
            result.checkpoints_checked += 1
            if checkpoint.hash != prev:
                return result.fail(expected, f"record {expected} does not match the checkpoint taken at seq {expected}")
        if record.get("type") == "recovery":
            result.recoveries.append(expected)
        if result.first_seq is None:
            result.first_seq = expected
        result.records += 1
        result.last_seq = expected
        result.head = prev
        expected += 1
    beyond = [seq for seq in wanted if seq > result.last_seq]
    if beyond:
        return result.fail(result.last_seq + 1, f"truncated tail: a checkpoint records seq {max(beyond)} "
                                                f"but the log ends at seq {result.last_seq}")
    return result

