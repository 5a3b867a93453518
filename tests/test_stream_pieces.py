"""An image stream reaches every stage the same however it was cut into pieces on the way: split at
random bytes, with LF or CRLF line ends, the client gets the upstream's bytes, metering the usage,
the audit the image's hash, and the cache an entry that replays the same bytes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import sqlite3

import aiohttp
import pytest
from aiohttp import web

from gatekeeper.testing.fake_upstream import png_bytes
from gatekeeper.testing.kit import CLIENT_KEY

USAGE = {"total_tokens": 300, "input_tokens": 50, "output_tokens": 250,
         "input_tokens_details": {"text_tokens": 50, "image_tokens": 0}}
FINAL, PARTIAL = png_bytes("final image"), png_bytes("partial image")


def image_stream(newline: str) -> bytes:
    shape = {"created_at": 1, "size": "1024x1024", "quality": "low", "background": "opaque", "output_format": "png"}
    events = [
        ("image_generation.partial_image", {"type": "image_generation.partial_image", "partial_image_index": 0,
                                            "b64_json": base64.b64encode(PARTIAL).decode(), **shape}),
        ("image_generation.completed", {"type": "image_generation.completed", "usage": USAGE,
                                        "b64_json": base64.b64encode(FINAL).decode(), **shape}),
    ]
    return "".join(f"event: {name}{newline}data: {json.dumps(data)}{newline}{newline}"
                   for name, data in events).encode()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
async def test_an_image_stream_cut_anywhere_reaches_every_stage_whole(gateway_kit, custom_upstream, tmp_path,
                                                                       seed, newline):
    body, pieces = image_stream(newline), random.Random(seed)

    async def upstream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        sent = 0
        while sent < len(body):
            size = pieces.randint(1, 200)
            await response.write(body[sent:sent + size])
            sent += size
            if pieces.random() < 0.1:
                await asyncio.sleep(0.001)  # so pieces also arrive apart, not only in one read
        await response.write_eof()
        return response

    gateway = await gateway_kit.start({"upstream": {"base_url": await custom_upstream(upstream)},
                                       "metering": {"flush_interval_ms": 10}})
    request = {"model": "gpt-image-1", "prompt": "pieces", "stream": True, "partial_images": 1, "quality": "low"}
    answers = []
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(gateway.base_url + "/images/generations", json=request,
                                    headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as response:
                answers.append((await response.read(), response.headers["x-gatekeeper-cache"]))
    await gateway_kit.stop_all()  # flushes metering and the audit

    assert answers == [(body, "MISS"), (body, "HIT")]
    with sqlite3.connect(tmp_path / "usage.db") as usage:
        rows = usage.execute("SELECT cache_hit, input_tokens, output_tokens FROM gatekeeper_usage ORDER BY ts").fetchall()
    assert rows == [(0, 50, 250), (1, 50, 250)]
    records = [json.loads(line) for line in (tmp_path / "audit" / "gatekeeper-audit.jsonl").read_text().splitlines()]
    assert [record["output_image_sha256"] for record in records if record["type"] == "request"] == [
        [hashlib.sha256(FINAL).hexdigest()]] * 2
