"""Two `gatekeeper serve` processes sharing Redis (cache) and PostgreSQL (usage) behave as one gateway:
an answer cached by one is a hit on the other, identical concurrent requests split across both
reach the upstream once, and the usage rows add up exactly to the requests made."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from pathlib import Path

import asyncpg
import openai
import pytest_asyncio
import redis.asyncio as aioredis

from gateway_processes import GatewayProcess, free_port, serve_config
from gatekeeper.testing.kit import ADMIN_KEY, CLIENT_KEY

POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
GENERATIONS = "/v1/images/generations"


def replica_config(upstream_url: str, port: int, workdir: Path, table: str, cache_prefix: str) -> str:
    return serve_config(upstream_url, port, server="shutdown_timeout_s = 10", sections=f'''
[auth]
admin_keys = ["{ADMIN_KEY}"]
keys = [{{ id = "replica-app", key = "{CLIENT_KEY}", tenant = "replicas" }}]

[cache]
backend = "redis"
redis_url = "{REDIS_URL}"
key_prefix = "{cache_prefix}"

[metering]
database = "{POSTGRES_DSN}"
table = "{table}"
flush_interval_ms = 50

[audit]
path = "{workdir / 'audit' / 'gatekeeper-audit.jsonl'}"
''')


class Replicas:
    def __init__(self, processes: list[GatewayProcess], table: str) -> None:
        self.processes = processes
        self.table = table

    def client(self, index: int) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.processes[index % 2].base_url, api_key=CLIENT_KEY, max_retries=0)

    async def rows(self) -> list[asyncpg.Record]:
        connection = await asyncpg.connect(POSTGRES_DSN)
        try:
            return await connection.fetch(f'SELECT * FROM "{self.table}"')
        except asyncpg.UndefinedTableError:
            return []
        finally:
            await connection.close()


@pytest_asyncio.fixture
async def replicas(fake_upstream, tmp_path):
    suffix = uuid.uuid4().hex[:10]
    table, cache_prefix = f"gk_replicas_{suffix}", f"gk:replicas:{suffix}"
    processes = []
    for index in range(2):
        workdir = tmp_path / f"replica-{index}"
        workdir.mkdir()
        config, port = workdir / "config.toml", free_port()
        config.write_text(replica_config(fake_upstream.base_url, port, workdir, table, cache_prefix))
        processes.append(GatewayProcess(config, port, workdir / "gatekeeper.log"))
    try:
        await asyncio.gather(*(process.start() for process in processes))
        yield Replicas(processes, table)
    finally:
        codes = await asyncio.gather(*(process.stop() for process in processes))
        await drop_shared_state(table, cache_prefix)
    assert codes == [0, 0], [process.log_text()[-2000:] for process in processes]


async def drop_shared_state(table: str, cache_prefix: str) -> None:
    connection = await asyncpg.connect(POSTGRES_DSN)
    try:
        await connection.execute(f'DROP TABLE IF EXISTS "{table}"')
    finally:
        await connection.close()
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{cache_prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def generate(client: openai.AsyncOpenAI, prompt: str):
    """(image bytes, cache status, gateway request id, usage) of one generation."""
    async with client:
        raw = await client.images.with_raw_response.generate(model="gpt-image-1-mini", prompt=prompt, quality="low")
    result = raw.parse()
    return (base64.b64decode(result.data[0].b64_json), raw.headers["x-gatekeeper-cache"],
            raw.headers["x-gatekeeper-request-id"], result.usage)


async def test_an_answer_cached_by_one_replica_is_a_hit_on_the_other(replicas, fake_upstream):
    image, status, _, _ = await generate(replicas.client(0), "a fox cached on replica one")
    replayed, replayed_status, _, _ = await generate(replicas.client(1), "a fox cached on replica one")
    assert (status, replayed_status) == ("MISS", "HIT")
    assert replayed == image
    assert fake_upstream.count(GENERATIONS) == 1


async def test_identical_requests_split_across_replicas_reach_the_upstream_once(replicas, fake_upstream):
    # A slow upstream keeps the first call open while the others arrive, on both replicas.
    fake_upstream.inject(path=GENERATIONS, status=200, delay_s=1.5)
    results = await asyncio.gather(*(generate(replicas.client(i), "one fox for eight callers") for i in range(8)))
    assert fake_upstream.count(GENERATIONS) == 1
    assert len({image for image, _, _, _ in results}) == 1
    assert sum(status == "MISS" for _, status, _, _ in results) == 1


async def test_usage_rows_from_both_replicas_add_up_to_the_requests_made(replicas, fake_upstream):
    seen = []
    for prompt in ("usage fox one", "usage fox two", "usage fox three"):
        for index in (0, 1, 0):  # a miss on one replica, then hits on both
            seen.append(await generate(replicas.client(index), prompt))
    async with replicas.client(1) as client:
        stream = await client.images.generate(model="gpt-image-1.5", prompt="a streamed fox", stream=True,
                                              partial_images=1, quality="low")
        events = [event async for event in stream]
        stream_id = stream.response.headers["x-gatekeeper-request-id"]

    requests = {request_id: usage for _, _, request_id, usage in seen}
    requests[stream_id] = events[-1].usage
    deadline = time.monotonic() + 10
    while len(rows := await replicas.rows()) < len(requests) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert sorted(row["request_id"] for row in rows) == sorted(requests)
    assert sum(row["input_tokens"] for row in rows) == sum(usage.input_tokens for usage in requests.values())
    assert sum(row["output_tokens"] for row in rows) == sum(usage.output_tokens for usage in requests.values())
    assert sum(not row["cache_hit"] for row in rows) == fake_upstream.count(GENERATIONS) == 4
    assert {row["tenant"] for row in rows} == {"replicas"}
