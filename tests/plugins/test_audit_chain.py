"""The audit chain is tamper-evident: `gatekeeper audit verify` names the first bad seq.

Logs here are written by the real writer (`AuditLog`), then edited the way an attacker or a
crash would, then checked with the real command line (`gatekeeper.cli.main`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import make_mocked_request

from gatekeeper.cli import main
from gatekeeper.flow import Flow, Principal
from gatekeeper_plugins.audit_chain import GENESIS, Checkpoint, encode_canonical, line_hash
from gatekeeper_plugins.audit_record import capture
from gatekeeper_plugins.audit_writer import AuditLog

KEY = b"audit-test-key-0123456789abcdef"


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch):
    monkeypatch.delenv("GATEKEEPER_AUDIT_KEY", raising=False)


def write_log(path: Path, count: int, *, key: bytes | None = None, rotate_bytes: int = 1 << 30,
              checkpoint_every: int = 1000, close: bool = True) -> AuditLog:
    audit_log = AuditLog(path, key=key, rotate_bytes=rotate_bytes, checkpoint_every=checkpoint_every)
    audit_log.open()
    append(audit_log, count)
    if close:
        audit_log.close()
    return audit_log


def append(audit_log: AuditLog, count: int) -> None:
    """One record at a time, each awaited, as requests arriving one after another would."""
    for i in range(count):
        record = {"type": "request", "request_id": f"req_{i}", "tenant": "acme", "status": 200, "outcome": "ok"}
        audit_log.submit(record).result(timeout=10)


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def verify(capsys, *args: str) -> tuple[int, str]:
    code = main(["audit", "verify", *args])
    return code, capsys.readouterr().out


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "gatekeeper-audit.jsonl"


# ------------------------------------------------------------------ the intact chain


def test_records_chain_from_genesis_with_sequential_seq(log_path):
    write_log(log_path, 3)
    lines = lines_of(log_path)
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["prev"] == GENESIS
    assert records[1]["prev"] == hashlib.sha256(lines[0].rstrip(b"\n")).hexdigest()
    assert records[2]["prev"] == hashlib.sha256(lines[1].rstrip(b"\n")).hexdigest()


def test_lines_are_canonical_json_with_sorted_keys_and_no_whitespace(log_path):
    write_log(log_path, 2)
    for line in lines_of(log_path):
        assert line.endswith(b"\n")
        assert encode_canonical(json.loads(line)) == line[:-1]
        assert b" " not in line


def test_verify_accepts_an_intact_log_and_prints_count_and_head(log_path, capsys):
    write_log(log_path, 10)
    code, out = verify(capsys, str(log_path))
    assert code == 0, out
    head = hashlib.sha256(lines_of(log_path)[-1].rstrip(b"\n")).hexdigest()
    assert "OK: 10 records (seq 1..10)" in out
    assert f"head {head}" in out
    assert "1 checkpoint(s) matched" in out


def test_verify_reads_the_log_files_from_the_config_when_no_path_is_given(log_path, tmp_path, capsys):
    write_log(log_path, 4)
    config = tmp_path / "gatekeeper.toml"
    config.write_text('[audit]\npath = "audit/gatekeeper-audit.jsonl"\n')
    code, out = verify(capsys, "--config", str(config))
    assert code == 0, out
    assert "OK: 4 records" in out


# ------------------------------------------------------------------ the tamper matrix


@pytest.mark.parametrize("forged", [b'"tenant":"acmf"', b'"tenant":"ac\xffe"'], ids=["flipped", "no-longer-utf8"])
def test_verify_names_the_record_whose_byte_was_flipped(log_path, capsys, forged):
    write_log(log_path, 10)
    lines = lines_of(log_path)
    lines[3] = lines[3].replace(b'"tenant":"acme"', forged)
    log_path.write_bytes(b"".join(lines))
    code, out = verify(capsys, str(log_path))
    assert code == 1
    assert "FAIL at seq 4:" in out


def test_verify_names_a_deleted_line(log_path, capsys):
    write_log(log_path, 10)
    lines = lines_of(log_path)
    del lines[4]
    log_path.write_bytes(b"".join(lines))
    code, out = verify(capsys, str(log_path))
    assert code == 1
    assert "FAIL at seq 5: expected seq 5, found seq 6" in out


def test_verify_names_swapped_lines(log_path, capsys):
    write_log(log_path, 10)
    lines = lines_of(log_path)
    lines[2], lines[3] = lines[3], lines[2]
    log_path.write_bytes(b"".join(lines))
    code, out = verify(capsys, str(log_path))
    assert code == 1
    assert "FAIL at seq 3: expected seq 3, found seq 4" in out


def test_verify_detects_a_truncated_tail_against_the_checkpoint(log_path, capsys):
    write_log(log_path, 10)
    log_path.write_bytes(b"".join(lines_of(log_path)[:8]))
    code, out = verify(capsys, str(log_path))
    assert code == 1
    assert "FAIL at seq 9: truncated tail: a checkpoint records seq 10 but the log ends at seq 8" in out


def test_verify_detects_a_deleted_first_line(log_path, capsys):
    write_log(log_path, 5)
    log_path.write_bytes(b"".join(lines_of(log_path)[1:]))
    code, out = verify(capsys, str(log_path))
    assert code == 1
    assert "FAIL at seq 1: the log starts at seq 2" in out


def test_verify_detects_a_last_line_cut_short(log_path, capsys):
    write_log(log_path, 5)
    log_path.write_bytes(log_path.read_bytes()[:-10])
    code, out = verify(capsys, "--no-checkpoint", str(log_path))
    assert code == 1
    assert "FAIL at seq 5: the line is cut short" in out


# ------------------------------------------------------------------ HMAC


def test_records_carry_a_mac_of_the_line_without_its_mac_member_when_a_key_is_set(log_path):
    write_log(log_path, 2, key=KEY)
    line = lines_of(log_path)[0].rstrip(b"\n")
    record = json.loads(line)
    unsigned = line.replace(b'"mac":"' + record["mac"].encode() + b'",', b"")
    assert record["mac"] == hmac.new(KEY, unsigned, hashlib.sha256).hexdigest()
    assert unsigned == encode_canonical({name: value for name, value in record.items() if name != "mac"})


def test_the_verification_recipe_in_the_docs_checks_a_signed_log(log_path, capsys):
    write_log(log_path, 5, key=KEY)
    docs = (Path(__file__).resolve().parents[2] / "docs" / "audit.md").read_text()
    recipe = docs.split("## Verifying without gatekeeper", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assignment = 'path, key = "audit/gatekeeper-audit.jsonl", b"the hmac_key"'
    assert assignment in recipe
    exec(recipe.replace(assignment, f"path, key = {str(log_path)!r}, {KEY!r}"), {})
    head = line_hash(lines_of(log_path)[-1].rstrip(b"\n"))
    assert capsys.readouterr().out == f"OK, head {head}\n"
    tampered = lines_of(log_path)
    tampered[2] = tampered[2].replace(b"acme", b"acmf")
    log_path.write_bytes(b"".join(tampered))
    with pytest.raises(AssertionError, match="seq 3: bad mac"):
        exec(recipe.replace(assignment, f"path, key = {str(log_path)!r}, {KEY!r}"), {})


def test_a_rechained_forgery_fails_the_mac_check(log_path, capsys):
    """Without the key, an attacker who edits a record and recomputes every later prev is caught."""
    write_log(log_path, 6, key=KEY)
    records = [json.loads(line) for line in lines_of(log_path)]
    records[3]["tenant"] = "someone-else"
    prev, forged = GENESIS, []
    for record in records:
        record["prev"] = prev
        line = encode_canonical(record)
        prev = line_hash(line)
        forged.append(line + b"\n")
    log_path.write_bytes(b"".join(forged))
    code, out = verify(capsys, "--no-checkpoint", str(log_path))
    assert code == 0, "without the key the forgery is consistent"
    assert "6 macs NOT checked" in out
    code, out = verify(capsys, "--no-checkpoint", "--config", str(_config_with_key(log_path)), str(log_path))
    assert code == 1
    assert "FAIL at seq 4: the mac does not match" in out


def test_verify_with_the_key_names_a_flipped_byte_in_the_last_record(log_path, capsys, monkeypatch):
    write_log(log_path, 5, key=KEY)
    lines = lines_of(log_path)
    lines[4] = lines[4].replace(b'"status":200', b'"status":201')
    log_path.write_bytes(b"".join(lines))
    monkeypatch.setenv("GATEKEEPER_AUDIT_KEY", KEY.decode())
    code, out = verify(capsys, "--no-checkpoint", str(log_path))
    assert code == 1
    assert "FAIL at seq 5: the mac does not match" in out


def test_verify_rejects_a_checkpoint_not_signed_with_the_key(log_path, capsys, monkeypatch):
    write_log(log_path, 5, key=KEY)
    sidecar = log_path.with_name(log_path.name + ".checkpoint")
    checkpoint = Checkpoint.decode(sidecar.read_bytes())
    forged = Checkpoint(seq=3, hash=checkpoint.hash, file=checkpoint.file, time=checkpoint.time)
    sidecar.write_bytes(forged.signed(b"another key").encode())
    monkeypatch.setenv("GATEKEEPER_AUDIT_KEY", KEY.decode())
    code, out = verify(capsys, str(log_path))
    assert code == 1
    assert "is not signed with this key" in out


def _config_with_key(log_path: Path) -> Path:
    config = log_path.parent / "with-key.toml"
    config.write_text(f'[audit]\npath = "{log_path}"\nhmac_key = "{KEY.decode()}"\n')
    return config


# ------------------------------------------------------------------ checkpoints, rotation, torn tails


def test_a_checkpoint_of_the_head_is_written_every_n_records(log_path):
    audit_log = write_log(log_path, 7, checkpoint_every=5, close=False)
    sidecar = log_path.with_name(log_path.name + ".checkpoint")
    checkpoint = Checkpoint.decode(sidecar.read_bytes())
    assert checkpoint.seq == 5
    assert checkpoint.hash == line_hash(lines_of(log_path)[4].rstrip(b"\n"))
    audit_log.close()
    assert Checkpoint.decode(sidecar.read_bytes()).seq == 7


def test_rotation_carries_the_chain_into_the_next_file(log_path, capsys):
    write_log(log_path, 30, rotate_bytes=1500)
    rotated = sorted(log_path.parent.glob("gatekeeper-audit.0*.jsonl"))
    assert len(rotated) >= 2
    first_file_last = lines_of(rotated[0])[-1].rstrip(b"\n")
    second_file_first = json.loads(lines_of(rotated[1])[0])
    assert second_file_first["prev"] == line_hash(first_file_last)
    assert second_file_first["seq"] == len(lines_of(rotated[0])) + 1
    code, out = verify(capsys, *map(str, [*rotated, log_path]))
    assert code == 0, out
    assert "OK: 30 records (seq 1..30)" in out


def test_verify_of_the_live_file_alone_needs_partial_after_rotation(log_path, capsys):
    write_log(log_path, 30, rotate_bytes=1500)
    code, out = verify(capsys, str(log_path))
    assert code == 1
    assert "earlier records are missing" in out
    code, out = verify(capsys, "--partial", str(log_path))
    assert code == 0, out


def test_a_torn_last_line_is_quarantined_and_the_chain_continues(log_path, capsys):
    write_log(log_path, 5)
    good = log_path.read_bytes()
    torn = b'{"attempts":1,"c2pa":null,"cache":nu'
    log_path.write_bytes(good + torn)

    audit_log = write_log(log_path, 2, close=True)

    quarantined = list(log_path.parent.glob("gatekeeper-audit.jsonl.quarantine.*"))
    assert [q.read_bytes() for q in quarantined] == [torn]
    records = [json.loads(line) for line in lines_of(log_path)]
    recovery = records[5]
    assert recovery["type"] == "recovery"
    assert recovery["reason"] == "torn_tail"
    assert recovery["seq"] == 6
    assert recovery["prev"] == line_hash(good.splitlines()[-1])
    assert recovery["quarantined_bytes"] == len(torn)
    assert recovery["quarantined_sha256"] == hashlib.sha256(torn).hexdigest()
    assert [r["seq"] for r in records] == list(range(1, 9))
    assert audit_log.seq == 8
    code, out = verify(capsys, str(log_path))
    assert code == 0, out
    assert "recovery records at seq 6" in out


def test_garbage_lines_after_a_crash_are_quarantined_too(log_path):
    """A crash can leave zero-filled blocks that end in a newline: not a record, so torn."""
    write_log(log_path, 3)
    log_path.write_bytes(log_path.read_bytes() + b"\x00" * 40 + b"\n")
    write_log(log_path, 1)
    records = [json.loads(line) for line in lines_of(log_path)]
    assert [r.get("type") for r in records] == ["request"] * 3 + ["recovery", "request"]


def test_a_torn_tail_that_is_not_utf8_is_quarantined_too(log_path):
    write_log(log_path, 3)
    log_path.write_bytes(log_path.read_bytes() + b'{"seq":4,"prev":"\xff\xfe"}\n')
    write_log(log_path, 1)
    records = [json.loads(line) for line in lines_of(log_path)]
    assert [r.get("type") for r in records] == ["request"] * 3 + ["recovery", "request"]


def test_a_restart_after_the_tail_was_cut_records_the_gap(log_path, capsys):
    write_log(log_path, 6)
    log_path.write_bytes(b"".join(lines_of(log_path)[:4]))
    write_log(log_path, 1)
    records = [json.loads(line) for line in lines_of(log_path)]
    assert records[4]["type"] == "recovery"
    assert records[4]["reason"] == "behind_checkpoint"
    assert (records[4]["checkpoint_seq"], records[4]["log_seq"]) == (6, 4)


def test_checkpoint_file_round_trips_through_its_canonical_encoding():
    checkpoint = Checkpoint(seq=3, hash="ab" * 32, file="x.jsonl", time="2026-01-01T00:00:00.000Z").signed(KEY)
    assert Checkpoint.decode(checkpoint.encode()) == checkpoint
    assert checkpoint.mac_ok(KEY)
    assert not msgspec.structs.replace(checkpoint, seq=4).mac_ok(KEY)


def test_verify_checks_a_copy_of_the_checkpoint_anchored_elsewhere(log_path, tmp_path, capsys):
    write_log(log_path, 10)
    sidecar = log_path.with_name(log_path.name + ".checkpoint")
    anchored = tmp_path / "worm" / "checkpoint-seq10.json"
    anchored.parent.mkdir()
    anchored.write_bytes(sidecar.read_bytes())
    lines = lines_of(log_path)[:7]
    log_path.write_bytes(b"".join(lines))
    sidecar.write_bytes(Checkpoint(seq=7, hash=line_hash(lines[-1].rstrip(b"\n"))).encode())
    code, out = verify(capsys, str(log_path))
    assert code == 0, "the rewritten local checkpoint matches the cut log"
    code, out = verify(capsys, "--checkpoint", str(anchored), str(log_path))
    assert code == 1
    assert "FAIL at seq 8: truncated tail: a checkpoint records seq 10" in out


def test_a_record_that_cannot_be_encoded_is_replaced_by_one_that_says_so(log_path, capsys):
    audit_log = AuditLog(log_path)
    audit_log.open()
    audit_log.submit({"type": "request", "request_id": "odd", "usage": {"tokens": object()}}).result(timeout=5)
    audit_log.submit({"type": "request", "request_id": "next"}).result(timeout=5)
    audit_log.close()
    records = [json.loads(line) for line in lines_of(log_path)]
    assert records[0]["request_id"] == "odd"
    assert records[0]["error"].startswith("audit record could not be encoded")
    assert records[1]["request_id"] == "next"
    assert verify(capsys, str(log_path))[0] == 0


# ------------------------------------------------------------------ request records


def request_flow(body: dict[str, Any], *, usage: Any = None, request_id: str = "req_1") -> Flow:
    """A finished flow as the pipeline leaves it, for `capture`."""
    request = make_mocked_request("POST", "/v1/images/generations", headers={"content-type": "application/json"})
    flow = Flow(request, request_id, "/v1/images/generations", json.dumps(body).encode())
    flow.principal = Principal(key_id="key-1", tenant="acme")
    flow.status, flow.outcome, flow.cache_status = 200, "ok", "MISS"
    flow.usage, flow.cost_usd = usage, Decimal("0.042490")
    flow.annotations = {"output_image_sha256": ["ab" * 32], "c2pa": [True]}
    flow.time_end = flow.time_start + 0.25
    return flow


def write_request_records(path: Path, flows: list[Flow], *, key: bytes | None = None,
                          log_prompts: bool = False) -> list[bytes]:
    audit_log = AuditLog(path, fsync="batch", key=key)
    audit_log.open()
    audit_log.add_batch([capture(flow, None, flow.annotations, None, log_prompts) for flow in flows], 0.0)
    audit_log.close()
    return [line.rstrip(b"\n") for line in lines_of(path)]


ODD_BODIES = [
    {"model": "gpt-image-1", "prompt": "a fox", "size": "1024x1024", "n": 1},
    {"model": "gpt-image-1", "prompt": "ünïcödé \u2028 \"quoted\"", "quality": {"z": 1, "a": [{"y": 2, "b": 3}]}},
    {"prompt": "a fox", "size": {"method": "GET", "prev": "", "seq": 0}},
]


@pytest.mark.parametrize("key", [None, KEY], ids=["sha256", "hmac"])
@pytest.mark.parametrize("log_prompts", [False, True], ids=["hash-only", "log-prompts"])
def test_request_records_are_canonical_json_and_verify(log_path, key, log_prompts, capsys, monkeypatch):
    usage = {"total_tokens": 3, "input_tokens_details": {"text_tokens": 1, "image_tokens": 0}, "method": "x"}
    flows = [request_flow(body, usage=usage if i else None, request_id=f"req_{i}") for i, body in enumerate(ODD_BODIES)]
    lines = write_request_records(log_path, flows, key=key, log_prompts=log_prompts)
    for line, body in zip(lines, ODD_BODIES):
        record = json.loads(line)
        assert encode_canonical(record) == line, "keys sorted at every depth, no whitespace"
        assert record["params"] == {name: body.get(name) for name in ("size", "quality", "n", "output_format",
                                                                        "background")}
        assert record["prompt_sha256"] == hashlib.sha256(body["prompt"].encode()).hexdigest()
        assert ("prompt" in record) == log_prompts
        assert ("mac" in record) == (key is not None)
    if key is not None:
        monkeypatch.setenv("GATEKEEPER_AUDIT_KEY", KEY.decode())
    assert verify(capsys, str(log_path))[0] == 0


def test_a_request_sent_again_gets_the_same_facts(log_path):
    body = {"model": "gpt-image-1", "prompt": "the same fox", "size": "1024x1024"}
    lines = write_request_records(log_path, [request_flow(body, request_id=f"req_{i}") for i in range(3)])
    records = [json.loads(line) for line in lines]
    assert len({(r["prompt_sha256"], json.dumps(r["params"])) for r in records}) == 1
    assert records[0]["prompt_sha256"] == hashlib.sha256(b"the same fox").hexdigest()


def test_a_request_record_with_usage_that_cannot_be_encoded_is_replaced(log_path, capsys):
    flows = [request_flow({"prompt": "odd"}, usage={"tokens": object()}, request_id="odd"),
             request_flow({"prompt": "next"}, request_id="next")]
    records = [json.loads(line) for line in write_request_records(log_path, flows)]
    assert records[0]["request_id"] == "odd"
    assert records[0]["error"].startswith("audit record could not be encoded")
    assert records[1]["request_id"] == "next"
    assert verify(capsys, str(log_path))[0] == 0


def test_a_body_too_large_to_remember_is_not_kept_and_still_gets_its_facts(log_path):
    body = {"model": "gpt-image-1", "prompt": "fox " * 5000}  # 20 KB
    flow = request_flow(body)
    assert capture(flow, None, flow.annotations, None, False)._body is msgspec.UNSET
    (line,) = write_request_records(log_path, [flow])
    assert json.loads(line)["prompt_sha256"] == hashlib.sha256(body["prompt"].encode()).hexdigest()


def test_records_that_share_one_usage_as_cache_hits_do_each_carry_it_and_others_keep_their_own(log_path, capsys):
    shared = {"output_tokens": 4160, "input_tokens": 50}
    flows = [request_flow({"prompt": "hit"}, usage=shared, request_id=f"hit_{i}") for i in range(3)]
    flows.append(request_flow({"prompt": "other"}, usage={"output_tokens": 7}, request_id="other"))
    flows.append(request_flow({"prompt": "odd"}, usage={"tokens": object()}, request_id="odd"))
    records = [json.loads(line) for line in write_request_records(log_path, flows)]
    assert [r["usage"] for r in records[:3]] == [{"input_tokens": 50, "output_tokens": 4160}] * 3
    assert records[3]["usage"] == {"output_tokens": 7}
    assert records[4]["error"].startswith("audit record could not be encoded")
    assert verify(capsys, str(log_path))[0] == 0
