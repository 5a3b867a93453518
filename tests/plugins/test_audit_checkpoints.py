"""Checkpoints of the chain head outside the log directory (PostgreSQL) expose a cut-off tail even
when the local checkpoint file was rewritten to match."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import secrets
from pathlib import Path

import asyncpg
import openai
import pytest

from gatekeeper.cli import main
from gatekeeper.testing.kit import CLIENT_KEY
from gatekeeper_plugins.audit_chain import Checkpoint, line_hash

DSN = os.environ.get("GATEKEEPER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
async def table():
    name = f"audit_checkpoints_test_{secrets.token_hex(4)}"
    yield name
    connection = await asyncpg.connect(DSN)
    try:
        await connection.execute(f"DROP TABLE IF EXISTS {name}")
    finally:
        await connection.close()


def verify(*args: str) -> tuple[int, str]:
    """`gatekeeper audit verify` in-process (in a worker thread: it runs its own event loop)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["audit", "verify", *args])
    return code, out.getvalue()


async def test_checkpoints_go_to_postgres_and_expose_a_tail_cut_together_with_the_local_checkpoint(
        gateway_kit, tmp_path, table, monkeypatch):
    monkeypatch.delenv("GATEKEEPER_AUDIT_KEY", raising=False)
    audit_path = tmp_path / "audit" / "gatekeeper-audit.jsonl"
    settings = {"checkpoint_every": 2, "checkpoint_dsn": DSN, "checkpoint_table": table}
    gateway = await gateway_kit.start({"audit": settings})
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        for number in range(4):
            await client.images.generate(model="gpt-image-1.5", prompt=f"anchored {number}")
    await gateway_kit.stop_all()

    connection = await asyncpg.connect(DSN)
    try:
        rows = await connection.fetch(f"SELECT seq, hash FROM {table} ORDER BY id")
    finally:
        await connection.close()
    lines = audit_path.read_bytes().splitlines()
    assert [row["seq"] for row in rows] == [2, 4, 4]  # every 2 records, and the head at shutdown
    assert rows[0]["hash"] == line_hash(lines[1])

    config = tmp_path / "gatekeeper.toml"
    config.write_text("[audit]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in
                                            {"path": str(audit_path), **settings}.items()))
    code, out = await asyncio.to_thread(verify, "--config", str(config))
    assert code == 0, out
    assert "4 checkpoint(s) matched" in out  # the file's and the table's three

    # Cut the last record and rewrite the local checkpoint to match: only the table remembers.
    audit_path.write_bytes(b"\n".join(lines[:3]) + b"\n")
    sidecar = audit_path.with_name(audit_path.name + ".checkpoint")
    local = Checkpoint.decode(sidecar.read_bytes())
    sidecar.write_bytes(Checkpoint(seq=3, hash=line_hash(lines[2]), file=local.file, log_name=local.log_name).encode())
    code, out = await asyncio.to_thread(verify, str(audit_path))
    assert code == 0, "the local checkpoint alone was fooled"
    code, out = await asyncio.to_thread(verify, "--config", str(config))
    assert code == 1
    assert "FAIL at seq 4: truncated tail: a checkpoint records seq 4 but the log ends at seq 3" in out


async def test_an_unreachable_checkpoint_table_does_not_stop_the_log(gateway_kit, tmp_path, table):
    unreachable = "postgresql://postgres@127.0.0.1:1/postgres"
    gateway = await gateway_kit.start({"audit": {"checkpoint_every": 1, "checkpoint_dsn": unreachable,
                                                 "checkpoint_table": table}})
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        await client.images.generate(model="gpt-image-1.5", prompt="still audited")
    audit = gateway.gateway.plugins.hooks.pm.get_plugin("audit")
    report = audit.ready_check(gateway.gateway)
    assert report["ready"] is True
    assert report["postgres_error"]
    assert len(Path(report["path"]).read_bytes().splitlines()) == 1
