"""Usage rows are written in batches off the response path and never lost on a graceful stop."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
import openai
import pytest

from gateway_processes import free_port
from gatekeeper.testing.kit import ADMIN_KEY, UPSTREAM_KEY
from gatekeeper_plugins.metering_store import UsageRow, store_for_url
from metering_support import (  # noqa: F401
    AUTH,
    DESIGN_KEY,
    MARKETING_KEY,
    PG_URL,
    drop_usage_table,
    gateway_config,
    metering_plugin,
    usage_db,
    usage_rows,
)

PROMPT = "a red fox in the snow"


async def generate(client: openai.AsyncOpenAI) -> None:
    await client.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024")


async def test_rows_wait_in_the_queue_until_a_batch_fills(usage_db, gateway_kit):
    gateway = await gateway_kit.start(gateway_config(usage_db, batch_rows=3, flush_interval_ms=60_000))
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as client:
        for _ in range(2):
            await generate(client)
        await asyncio.sleep(0.1)
        assert len(metering_plugin(gateway).writer.queue) == 2  # answered, not yet written
        await generate(client)  # the third row fills the batch: written now, not in a minute
        for _ in range(250):
            if metering_plugin(gateway).writer.written == 3:
                break
            await asyncio.sleep(0.02)
    assert len(await usage_rows(usage_db)) == 3


async def test_a_graceful_stop_writes_every_queued_row(usage_db, gateway_kit):
    gateway = await gateway_kit.start(gateway_config(usage_db, batch_rows=1000, flush_interval_ms=60_000))
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as client:
        for _ in range(5):
            await generate(client)
    assert len(metering_plugin(gateway).writer.queue) == 5
    gateway_kit.running.remove(gateway)
    await gateway.stop()
    assert len(await usage_rows(usage_db)) == 5


async def test_rows_survive_a_database_outage_and_are_written_when_it_returns(usage_db, gateway_kit):
    gateway = await gateway_kit.start(gateway_config(usage_db, flush_interval_ms=60_000))
    await drop_usage_table(usage_db)
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as client:
        await generate(client)  # the answer does not wait for, or depend on, the database
    writer = metering_plugin(gateway).writer
    assert await writer.flush() is False
    assert len(writer.queue) == 1 and writer.last_error
    restored = store_for_url(usage_db["database"], usage_db["table"])
    await restored.open(create=True)  # the table is back
    await restored.close()
    assert await writer.flush() is True
    assert len(await usage_rows(usage_db)) == 1


async def test_a_locked_sqlite_file_fails_the_batch_at_once_and_a_later_flush_writes_it(tmp_path, gateway_kit):
    # Rows are inserted on the event loop, which must never wait for another process's lock.
    storage = {"database": f"sqlite:///{tmp_path}/usage.db", "table": "usage"}
    gateway = await gateway_kit.start(gateway_config(storage, flush_interval_ms=60_000))
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as client:
        await generate(client)
    writer = metering_plugin(gateway).writer
    other = sqlite3.connect(tmp_path / "usage.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        started = time.monotonic()
        assert await writer.flush() is False
        assert time.monotonic() - started < 1.0
        assert len(writer.queue) == 1 and "locked" in writer.last_error
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert await writer.flush() is True
    assert len(await usage_rows(storage)) == 1


async def test_sqlite_rows_reach_the_database_file_through_checkpoints_run_off_the_loop(tmp_path):
    # The connection that inserts on the event loop never checkpoints (a checkpoint fsyncs);
    # the store runs checkpoints on its database thread instead, so the WAL does not grow forever.
    database = tmp_path / "usage.db"
    store = store_for_url(f"sqlite:///{database}", "usage")
    await store.open(create=True)
    try:
        empty = database.stat().st_size
        for batch in range(10):
            await store.insert([UsageRow(
                request_id=f"req-{batch}-{index:04d}", time=time.time(), tenant="design", key_id="key-design",
                labels={}, model="gpt-image-1.5", route="images/generations", status=200, outcome="ok",
                cache_hit=False, stream=False, unmetered=False, cost_micros=index) for index in range(1000)])
        for _ in range(100):
            if database.stat().st_size > empty + 1_000_000:
                break
            await asyncio.sleep(0.05)
        assert database.stat().st_size > empty + 1_000_000
    finally:
        await store.close()


@pytest.mark.parametrize("count", [1, 3, 1000, 2500])
async def test_a_batch_of_any_size_is_written_row_for_row(usage_db, count):
    # SQLite writes a batch as power-of-two INSERTs padded with repeats of the last row, and splits
    # it past 1024 rows: every row must land once, with its own values.
    store = store_for_url(usage_db["database"], usage_db["table"])
    await store.open(create=True)
    try:
        await store.insert([UsageRow(
            request_id=f"req-{index:05d}", time=time.time(), tenant="design", key_id="key-design", labels={},
            model="gpt-image-1.5", route="images/generations", status=200, outcome="ok", cache_hit=index % 2 == 1,
            stream=False, unmetered=False, cost_micros=index) for index in range(count)])
    finally:
        await store.close()
    rows = sorted(await usage_rows(usage_db), key=lambda row: row["request_id"])
    assert [(row["request_id"], row["cost_micros"], row["cache_hit"]) for row in rows] == [
        (f"req-{index:05d}", index, index % 2 == 1) for index in range(count)]


# ---------------------------------------------------------------- two gateway processes


def serve_config(path: Path, port: int, upstream_url: str, table: str) -> Path:
    keys = "\n".join(f'[[auth.keys]]\nid = "{key["id"]}"\nkey = "{key["key"]}"\ntenant = "{key["tenant"]}"\n'
                     for key in AUTH["keys"])
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
log_format = "json"
access_log = false

[upstream]
base_url = "{upstream_url}"
api_key = "{UPSTREAM_KEY}"
max_retries = 0

[plugins]
builtins = ["auth", "forward", "metering"]
entry_points = false

[auth]
admin_keys = ["{ADMIN_KEY}"]
{keys}
[metering]
database = "{PG_URL}"
table = "{table}"
batch_rows = 10
flush_interval_ms = 50
""")
    return path


async def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with aiohttp.ClientSession() as session:
        while asyncio.get_running_loop().time() < deadline:
            assert process.poll() is None, "the gateway process exited during start-up"
            try:
                async with session.get(url + "/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never became ready")


@pytest.fixture
async def pg_table():
    table = "gk_metering_replicas_" + secrets.token_hex(6)
    yield table
    connection = await asyncpg.connect(PG_URL)
    try:
        await connection.execute(f'DROP TABLE IF EXISTS "{table}"')
    finally:
        await connection.close()


async def test_two_gateway_processes_writing_to_one_postgres_lose_no_rows(fake_upstream, pg_table, tmp_path):
    processes, urls = [], []
    try:
        for index in range(2):
            port = free_port()
            config = serve_config(tmp_path / f"gateway-{index}.toml", port, fake_upstream.base_url, pg_table)
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "gatekeeper", "serve", "--config", str(config)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
            urls.append(f"http://127.0.0.1:{port}")
        for url, process in zip(urls, processes):
            await wait_ready(url, process)
        clients = [openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
                   for url, key in zip(urls, (DESIGN_KEY, MARKETING_KEY))]
        await asyncio.gather(*(generate(clients[i % 2]) for i in range(120)))
        for client in clients:
            await client.close()
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        exit_codes = [process.wait(timeout=30) for process in processes]
    assert exit_codes == [0, 0]
    rows = await usage_rows({"database": PG_URL, "table": pg_table})
    assert len(rows) == len({row["request_id"] for row in rows}) == 120
    assert {tenant: sum(1 for row in rows if row["tenant"] == tenant) for tenant in ("design", "marketing")} == {
        "design": 60, "marketing": 60}
    assert sum(row["cost_micros"] for row in rows) == 120 * 8734


async def test_a_postgres_schema_is_created_and_holds_the_table(fake_upstream, gateway_kit):
    schema = "gk_metering_schema_" + secrets.token_hex(6)
    try:
        gateway = await gateway_kit.start(gateway_config({"database": PG_URL, "table": "usage", "schema": schema}))
        async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as client:
            await generate(client)
        gateway_kit.running.remove(gateway)
        await gateway.stop()
        connection = await asyncpg.connect(PG_URL)
        try:
            assert await connection.fetchval(f'SELECT cost_micros FROM "{schema}"."usage"') == 8734
        finally:
            await connection.close()
    finally:
        connection = await asyncpg.connect(PG_URL)
        try:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await connection.close()
