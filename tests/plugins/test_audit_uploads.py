"""Uploads in the audit log: the files an upload carried, hashed as they streamed upstream.

A record of an upload (`[server] upload_paths`) has `upload_bytes` and `input_file_sha256`, the
SHA-256 of each file in it, which equals `sha256sum` of the file the client sent; `gatekeeper
audit find-file` finds the record from the file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai
import pytest

from gatekeeper.testing.kit import CLIENT_KEY
from gatekeeper_plugins.audit_uploads import UploadFileHasher

GATEKEEPER = [sys.executable, "-m", "gatekeeper"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def records(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit" / "gatekeeper-audit.jsonl").read_bytes().splitlines()]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GATEKEEPER, "audit", *args], capture_output=True, text=True, timeout=60)


async def test_a_files_api_upload_is_recorded_with_the_sha256_of_the_file(gateway_kit, fake_upstream, tmp_path):
    gateway = await gateway_kit.start({"server": {"max_body_bytes": 65536}})
    data = os.urandom(400_000)
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        raw = await client.files.with_raw_response.create(file=("train.jsonl", data), purpose="fine-tune")
        await client.images.generate(model="gpt-image-1.5", prompt="not an upload")
    upload, image = records(tmp_path)
    assert upload["request_id"] == raw.headers["x-gatekeeper-request-id"]
    assert (upload["path"], upload["status"], upload["outcome"]) == ("/v1/files", 200, "ok")
    assert upload["input_file_sha256"] == [sha(data)]
    assert upload["upload_bytes"] == len(fake_upstream.calls[0].body)  # the whole multipart body
    assert "input_file_sha256" not in image and "upload_bytes" not in image


async def test_a_batch_mode_record_has_the_file_digests_too(gateway_kit, tmp_path):
    gateway = await gateway_kit.start({"audit": {"fsync": "batch"}})
    data = os.urandom(100_000)
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        await client.files.create(file=("batch.jsonl", data), purpose="batch")
    for _ in range(100):  # written within the batch window
        path = tmp_path / "audit" / "gatekeeper-audit.jsonl"
        if path.exists() and path.read_bytes():
            break
        await asyncio.sleep(0.05)
    [record] = records(tmp_path)
    assert record["input_file_sha256"] == [sha(data)]


async def test_find_file_prints_the_record_of_the_upload_that_sent_a_file(gateway_kit, tmp_path):
    gateway = await gateway_kit.start()
    sent, other = os.urandom(10_000), os.urandom(10_000)
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        raw = await client.files.with_raw_response.create(file=("a.jsonl", sent), purpose="batch")
        await client.files.create(file=("b.jsonl", other), purpose="batch")
    saved = tmp_path / "a.jsonl"
    saved.write_bytes(sent)
    audit_path = tmp_path / "audit" / "gatekeeper-audit.jsonl"

    found = await asyncio.to_thread(run_cli, "find-file", str(saved), "--path", str(audit_path))

    assert found.returncode == 0, found.stderr
    [line] = found.stdout.splitlines()
    assert json.loads(line)["request_id"] == raw.headers["x-gatekeeper-request-id"]
    saved.write_bytes(b"never sent")
    missing = await asyncio.to_thread(run_cli, "find-file", str(saved), "--path", str(audit_path))
    assert missing.returncode == 1 and missing.stdout == "" and "no audit record" in missing.stderr


async def test_an_upload_that_did_not_arrive_whole_records_its_bytes_and_no_digest(gateway_kit, tmp_path):
    gateway = await gateway_kit.start({"server": {"max_upload_bytes": 50_000}})
    body = multipart([("purpose", None, b"batch"), ("file", "big.jsonl", os.urandom(60_000))], "cut")

    async def chunked():  # no Content-Length: the limit is found while the body streams
        for start in range(0, len(body), 10_000):
            yield body[start:start + 10_000]

    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.base_url + "/files", data=chunked(),
                                headers={"Authorization": f"Bearer {CLIENT_KEY}",
                                         "Content-Type": "multipart/form-data; boundary=cut"}) as response:
            assert response.status == 413
    [record] = records(tmp_path)
    assert (record["status"], record["error"]) == (413, "request_too_large")
    assert record["input_file_sha256"] is None
    assert 50_000 < record["upload_bytes"] <= len(body)


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str) -> bytes:
    out = b"preamble to skip\r\n"
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\nepilogue".encode()


@pytest.mark.parametrize("seed", range(20))
def test_the_hasher_finds_each_file_whatever_the_chunk_edges(seed):
    rng = random.Random(seed)
    boundary = "----formdata-" + str(seed)
    parts = [("purpose", None, b"batch"),
             ("file", "a.jsonl", rng.randbytes(rng.randint(0, 20_000))),
             # Content that nearly holds a delimiter, across a chunk edge or not.
             ("data", "b.bin", (b"\r\n--" + boundary[:-1].encode()) * 5 + b"\r\n-"),
             ("file", "empty.txt", b"")]
    body = multipart(parts, boundary)
    hasher = UploadFileHasher(f'multipart/form-data; boundary="{boundary}"')
    position = 0
    while position < len(body):
        size = rng.choice([1, 2, 7, rng.randint(1, 4000)])
        hasher.feed(body[position:position + size])
        position += size
    assert hasher.finish() == [(sha(data), len(data)) for _, filename, data in parts if filename]


def test_a_body_that_is_not_multipart_is_one_file_and_a_cut_form_is_none():
    whole = UploadFileHasher("application/jsonl")
    whole.feed(b"line 1\n")
    whole.feed(b"line 2\n")
    assert whole.finish() == [(sha(b"line 1\nline 2\n"), 14)]
    cut = UploadFileHasher("multipart/form-data; boundary=b")
    cut.feed(multipart([("file", "a", b"xyz")], "b")[:40])
    assert cut.finish() is None


@pytest.mark.parametrize("seed", range(30))
def test_the_hasher_agrees_with_the_in_memory_form_reader_on_random_forms(seed):
    """Differential: random forms (any number of parts, files or not, part headers with a
    Content-Type, contents that hold pieces of the delimiter) fed in random pieces give the digests
    of exactly the file parts `gatekeeper.multipart.parse_form` finds in the whole body."""
    from gatekeeper.multipart import parse_form

    rng = random.Random(1000 + seed)
    boundary = "".join(rng.choice("abcXYZ0123-_'") for _ in range(rng.randint(1, 40)))
    out = b""
    for index in range(rng.randint(0, 6)):
        headers = f'Content-Disposition: form-data; name="f{index}"'
        if rng.random() < 0.6:
            headers += f'; filename="file {index}.bin"'
        if rng.random() < 0.5:
            headers += "\r\nContent-Type: application/octet-stream"
        while True:  # as a client picks its boundary: one that no content holds
            near_delimiter = b"\r\n--" + boundary.encode()[:rng.randint(0, len(boundary))]
            pieces = [rng.randbytes(rng.randint(0, 3000)), near_delimiter, b"\r\n", b"--",
                      rng.randbytes(rng.randint(0, 50))]
            rng.shuffle(pieces)
            content = b"".join(pieces)
            if b"\r\n--" + boundary.encode() not in b"\r\n" + content:
                break
        out += f"--{boundary}\r\n{headers}\r\n\r\n".encode() + content + b"\r\n"
    body = out + f"--{boundary}--\r\n".encode()
    content_type = f"multipart/form-data; boundary={boundary}"
    expected = [(sha(bytes(part.data)), len(part.data)) for part in parse_form(content_type, body) if part.is_file]
    hasher = UploadFileHasher(content_type)
    position = 0
    while position < len(body):
        size = rng.choice([1, 3, rng.randint(1, 70), rng.randint(1, 5000)])
        hasher.feed(body[position:position + size])
        position += size
    assert hasher.finish() == expected
