"""Audit records are durable before responses leave, survive kill -9, and are never lost when the disk fails."""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gateway_processes import free_port
from gatekeeper.cli import main
from gatekeeper.server import RunningGateway
from gatekeeper.testing.kit import CLIENT_KEY, UPSTREAM_KEY
from gatekeeper_plugins.audit_writer import BATCH_MAX_RECORDS, AuditLog

GATEKEEPER = [sys.executable, "-m", "gatekeeper"]
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


def audit_of(running: RunningGateway) -> Any:
    return running.gateway.plugins.hooks.pm.get_plugin("audit")


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def verify_ok(*paths: Path) -> str:
    """Run `gatekeeper audit verify` in-process; fail the test unless it exits 0."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["audit", "verify", *map(str, paths)])
    assert code == 0, out.getvalue()
    return out.getvalue()


async def generate(gateway: RunningGateway, prompt: str, **extra: Any) -> tuple[int, str, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.base_url + "/images/generations", headers=AUTH,
                                json={"model": "gpt-image-1.5", "prompt": prompt, **extra}) as response:
            body = await response.json()
            return response.status, response.headers["x-gatekeeper-request-id"], body


async def ready_status(gateway: RunningGateway) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/ready") as response:
            return response.status, await response.json()


async def wait_until_ready(gateway: RunningGateway, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (await ready_status(gateway))[0] != 200:
        assert time.monotonic() < deadline, "the audit log never became writable again"
        await asyncio.sleep(0.05)


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "gatekeeper-audit.jsonl"


def failing(error_number: int) -> Callable[..., Any]:
    def fail(*_args: Any) -> Any:
        raise OSError(error_number, os.strerror(error_number))

    return fail


class BlockingFsync:
    """An fsync that waits for `release` (in the writer thread), to observe what waits for it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, fd: int) -> None:
        self.entered.set()
        self.release.wait(10)
        os.fsync(fd)


# ------------------------------------------------------------------ fsync before release


async def test_in_always_mode_a_response_waits_for_its_record_to_be_fsynced(gateway, audit_path):
    blocking = BlockingFsync()
    audit_of(gateway).log.fsync_fn = blocking
    try:
        request = asyncio.create_task(generate(gateway, "durable first"))
        await asyncio.to_thread(blocking.entered.wait, 5)
        await asyncio.sleep(0.3)
        assert not request.done(), "the response left before its record was fsynced"
    finally:
        blocking.release.set()
    status, request_id, _ = await request
    assert status == 200
    assert [r["request_id"] for r in read_records(audit_path)] == [request_id]


async def test_in_batch_mode_a_response_does_not_wait_for_fsync(gateway_kit, audit_path):
    gateway = await gateway_kit.start({"audit": {"fsync": "batch"}})
    blocking = BlockingFsync()
    audit_of(gateway).log.fsync_fn = blocking
    try:
        status, request_id, _ = await asyncio.wait_for(generate(gateway, "fast"), 5)
        assert status == 200
    finally:
        blocking.release.set()
    await gateway_kit.stop_all()
    assert [r["request_id"] for r in read_records(audit_path)] == [request_id]


async def test_in_batch_mode_a_record_is_on_disk_within_the_window_without_a_shutdown(gateway_kit, audit_path):
    gateway = await gateway_kit.start({"audit": {"fsync": "batch"}})
    status, request_id, _ = await generate(gateway, "soon on disk")
    assert status == 200
    answered = time.monotonic()
    while not (audit_path.exists() and request_id.encode() in audit_path.read_bytes()):
        assert time.monotonic() - answered < 0.5, "the batch never reached the writer"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "one-group"])
def test_batch_mode_fsyncs_at_most_every_100_records(audit_path, together):
    audit_log = AuditLog(audit_path, fsync="batch")
    per_fsync: list[int] = []
    lines_since_fsync = 0

    def counting_write(fd: int, data: Any) -> int:
        nonlocal lines_since_fsync
        lines_since_fsync += bytes(data).count(b"\n")
        return os.write(fd, data)

    def counting_fsync(fd: int) -> None:
        nonlocal lines_since_fsync
        per_fsync.append(lines_since_fsync)
        lines_since_fsync = 0
        os.fsync(fd)

    audit_log.write_fn, audit_log.fsync_fn = counting_write, counting_fsync
    audit_log.open()
    records = [{"type": "request", "request_id": f"req_{i}"} for i in range(250)]
    if together:
        assert audit_log.submit_group(records).result(timeout=10) == 250
    else:
        for future in [audit_log.submit(record) for record in records]:
            future.result(timeout=10)
    audit_log.close()
    assert sum(per_fsync) == 250
    assert max(per_fsync) <= BATCH_MAX_RECORDS
    assert len(per_fsync) >= 3


def test_batch_mode_fsyncs_a_lone_record_within_50_ms(audit_path):
    audit_log = AuditLog(audit_path, fsync="batch")
    audit_log.open()
    try:
        started = time.monotonic()
        audit_log.submit({"type": "request", "request_id": "alone"}).result(timeout=5)
        waited = time.monotonic() - started
    finally:
        audit_log.close()
    assert 0.04 <= waited < 0.5


async def test_shutdown_writes_every_queued_batch_record(gateway_kit, audit_path):
    gateway = await gateway_kit.start({"audit": {"fsync": "batch"}})
    results = await asyncio.gather(*(generate(gateway, f"batch {i}") for i in range(20)))
    await gateway_kit.stop_all()
    assert {r["request_id"] for r in read_records(audit_path)} == {request_id for _, request_id, _ in results}
    verify_ok(audit_path)


# ------------------------------------------------------------------ image hashing off the response path


class BlockingImageAnalysis:
    """audit's analyze_images_body, held in its worker thread until `release` is set."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls = 0

    def __call__(self, body: bytes, event_stream: bool) -> Any:
        self.calls += 1
        self.entered.set()
        self.release.wait(10)
        return self.real(body, event_stream)


@pytest.fixture
def hashing(monkeypatch) -> BlockingImageAnalysis:
    """Every image answer counts as large (hashed in a worker thread), and the hashing blocks."""
    import gatekeeper_plugins.audit as audit_module

    blocking = BlockingImageAnalysis(audit_module.analyze_images_body)
    monkeypatch.setattr(audit_module, "OFF_LOOP_BYTES", 0)
    monkeypatch.setattr(audit_module, "analyze_images_body", blocking)
    yield blocking
    blocking.release.set()


async def post_generation(gateway: RunningGateway, prompt: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.base_url + "/images/generations", headers=AUTH,
                                json={"model": "gpt-image-1.5", "prompt": prompt}) as response:
            return response.status, dict(response.headers), await response.json()


async def test_in_batch_mode_a_large_answer_is_released_before_its_images_are_hashed(
        gateway_kit, fake_upstream, audit_path, hashing):
    gateway = await gateway_kit.start({"audit": {"fsync": "batch"}})
    status, headers, body = await asyncio.wait_for(post_generation(gateway, "hashed later"), 5)
    assert status == 200 and headers["x-gatekeeper-cache"] == "MISS"
    assert await asyncio.to_thread(hashing.entered.wait, 5), "the images were never hashed"

    # Meanwhile the entry isn't stored yet: the same request waits for it, and is not forwarded again.
    again = asyncio.create_task(post_generation(gateway, "hashed later"))
    await asyncio.sleep(0.2)
    assert not again.done(), "the entry was stored before its image hashes were known"
    hashing.release.set()
    status, again_headers, again_body = await asyncio.wait_for(again, 5)
    assert status == 200 and again_headers["x-gatekeeper-cache"] == "HIT"
    assert again_body == body
    assert fake_upstream.count("/v1/images/generations") == 1
    assert hashing.calls == 1, "the hit hashed the images again"

    await gateway_kit.stop_all()
    image = base64.b64decode(body["data"][0]["b64_json"])
    records = {r["request_id"]: r for r in read_records(audit_path)}
    miss_record = records[headers["x-gatekeeper-request-id"]]
    hit_record = records[again_headers["x-gatekeeper-request-id"]]
    assert miss_record["output_image_sha256"] == [hashlib.sha256(image).hexdigest()]
    assert hit_record["output_image_sha256"] == miss_record["output_image_sha256"]
    verify_ok(audit_path)


async def test_in_batch_mode_once_the_hashing_falls_behind_a_response_waits_for_its_own(
        gateway_kit, audit_path, hashing, monkeypatch):
    import gatekeeper_plugins.audit as audit_module

    monkeypatch.setattr(audit_module, "LATER_MAX_BYTES", 1)  # one answer waiting is already too many
    gateway = await gateway_kit.start({"audit": {"fsync": "batch"}})
    status, first, _ = await asyncio.wait_for(post_generation(gateway, "released first"), 5)
    assert status == 200, "the first answer waiting for its hashing is released at once"
    assert await asyncio.to_thread(hashing.entered.wait, 5)

    second = asyncio.create_task(post_generation(gateway, "held back"))
    await asyncio.sleep(0.3)
    assert not second.done(), "a second answer was released while the first still held its body for hashing"
    hashing.release.set()
    status, held, _ = await asyncio.wait_for(second, 5)
    assert status == 200

    await gateway_kit.stop_all()
    records = {r["request_id"]: r for r in read_records(audit_path)}
    for headers in (first, held):
        assert len(records[headers["x-gatekeeper-request-id"]]["output_image_sha256"]) == 1
    verify_ok(audit_path)


async def test_a_client_that_leaves_while_its_answer_waits_for_the_hashing_still_gets_its_record(
        gateway_kit, audit_path, hashing, monkeypatch):
    import gatekeeper_plugins.audit as audit_module

    monkeypatch.setattr(audit_module, "LATER_MAX_BYTES", 1)
    gateway = await gateway_kit.start({"audit": {"fsync": "batch"}})
    status, _, _ = await asyncio.wait_for(post_generation(gateway, "released first"), 5)
    assert status == 200
    assert await asyncio.to_thread(hashing.entered.wait, 5)

    leaving = asyncio.create_task(post_generation(gateway, "client leaves"))
    await asyncio.sleep(0.3)
    leaving.cancel()  # the client hangs up while its answer waits for the hashing
    await asyncio.sleep(0.2)
    hashing.release.set()
    await gateway_kit.stop_all()
    records = read_records(audit_path)
    assert len(records) == 2, "the record of the request whose client left was lost"
    assert all(len(record["output_image_sha256"]) == 1 for record in records)
    verify_ok(audit_path)


async def test_shutdown_waits_for_records_whose_images_are_still_being_hashed(gateway_kit, audit_path, hashing):
    gateway = await gateway_kit.start({"audit": {"fsync": "batch"}})
    status, headers, _ = await asyncio.wait_for(post_generation(gateway, "hashed at shutdown"), 5)
    assert status == 200
    assert await asyncio.to_thread(hashing.entered.wait, 5)
    threading.Timer(0.2, hashing.release.set).start()
    await gateway_kit.stop_all()
    [record] = read_records(audit_path)
    assert record["request_id"] == headers["x-gatekeeper-request-id"]
    assert len(record["output_image_sha256"]) == 1
    verify_ok(audit_path)


async def test_in_always_mode_a_large_answer_still_waits_for_its_record(gateway, audit_path, hashing):
    request = asyncio.create_task(post_generation(gateway, "hashed first"))
    assert await asyncio.to_thread(hashing.entered.wait, 5)
    await asyncio.sleep(0.2)
    assert not request.done(), "the response left before its record (with the image hashes) was written"
    hashing.release.set()
    status, headers, _ = await asyncio.wait_for(request, 5)
    assert status == 200
    [record] = read_records(audit_path)
    assert len(record["output_image_sha256"]) == 1


# ------------------------------------------------------------------ disk full, EIO


async def test_disk_full_answers_503_forwards_nothing_and_loses_no_record(gateway, fake_upstream, audit_path):
    audit = audit_of(gateway)
    status, before, _ = await generate(gateway, "before the disk filled")
    assert status == 200

    audit.log.write_fn = failing(errno.ENOSPC)
    status, failed, body = await generate(gateway, "while the disk is full")
    assert (status, body["error"]["code"], body["error"]["type"]) == (503, "audit_unavailable", "server_error")
    forwarded = fake_upstream.count("/v1/images/generations")
    status, refused, body = await generate(gateway, "refused up front")
    assert (status, body["error"]["code"]) == (503, "audit_unavailable")
    assert fake_upstream.count("/v1/images/generations") == forwarded, "a request was forwarded while unaudited"
    ready, report = await ready_status(gateway)
    assert ready == 503
    assert report["plugins"]["audit"]["error"].startswith("ENOSPC")

    audit.log.write_fn = os.write
    await wait_until_ready(gateway)
    status, after, _ = await generate(gateway, "after the disk was freed")
    assert status == 200

    records = read_records(audit_path)
    by_id = {r.get("request_id"): r for r in records}
    assert by_id[before]["outcome"] == "ok"
    assert (by_id[failed]["status"], by_id[failed]["error"]) == (503, "audit_unavailable")
    assert by_id[failed]["upstream_request_id"], "the billed upstream call is on record"
    assert (by_id[refused]["status"], by_id[refused]["attempts"]) == (503, 0)
    assert by_id[after]["outcome"] == "ok"
    outage = [r for r in records if r["type"] == "outage"]
    assert len(outage) == 1 and outage[0]["error"].startswith("ENOSPC")
    verify_ok(audit_path)


async def test_an_fsync_error_leaves_no_duplicate_or_torn_line(gateway, audit_path):
    audit = audit_of(gateway)
    audit.log.fsync_fn = failing(errno.EIO)
    status, failed, _ = await generate(gateway, "eio")
    assert status == 503
    audit.log.fsync_fn = os.fsync
    await wait_until_ready(gateway)
    status, after, _ = await generate(gateway, "fine again")
    assert status == 200
    ids = [r.get("request_id") for r in read_records(audit_path)]
    assert ids.count(failed) == 1 and ids.count(after) == 1
    assert audit_path.read_bytes().endswith(b"\n")
    verify_ok(audit_path)


def test_a_partial_write_is_cut_back_before_the_next_record(audit_path):
    audit_log = AuditLog(audit_path)
    audit_log.open()
    audit_log.submit({"type": "request", "request_id": "first"}).result(timeout=5)

    def half_then_full(fd: int, data: Any) -> int:
        os.write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    audit_log.write_fn = half_then_full
    second = audit_log.submit({"type": "request", "request_id": "second"})
    with pytest.raises(Exception, match="ENOSPC"):
        second.result(timeout=5)
    audit_log.write_fn = os.write
    deadline = time.monotonic() + 5
    while audit_log.broken and time.monotonic() < deadline:
        time.sleep(0.01)
    audit_log.close()
    records = read_records(audit_path)
    assert [r.get("request_id") for r in records] == ["first", None, "second"]
    assert records[1]["type"] == "outage"
    verify_ok(audit_path)


async def test_with_required_false_write_failures_do_not_fail_requests_and_records_follow(gateway_kit, audit_path):
    gateway = await gateway_kit.start({"audit": {"required": False}})
    audit = audit_of(gateway)
    audit.log.write_fn = failing(errno.EIO)
    status, request_id, _ = await generate(gateway, "best effort")
    assert status == 200
    audit.log.write_fn = os.write
    await gateway_kit.stop_all()
    assert [r.get("request_id") for r in read_records(audit_path) if r["type"] == "request"] == [request_id]
    verify_ok(audit_path)


async def test_a_stream_whose_record_cannot_be_written_is_broken_off(gateway, fake_upstream, audit_path):
    fake_upstream.stream_interval_s = 0.05  # the partial image arrives as a chunk of its own
    audit = audit_of(gateway)

    def fail_on_first_use(fd: int) -> None:
        audit.log.fsync_fn = os.fsync
        raise OSError(errno.EIO, "Input/output error")

    audit.log.fsync_fn = fail_on_first_use
    events: list[str] = []
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        stream = await client.images.generate(model="gpt-image-1.5", prompt="unrecorded", stream=True,
                                              partial_images=1)
        with pytest.raises(openai.APIConnectionError):
            async for event in stream:
                events.append(event.type)
    assert events == ["image_generation.partial_image"], "the completed image left without its record"
    await wait_until_ready(gateway)
    records = [r for r in read_records(audit_path) if r["type"] == "request"]
    assert [(r["error"], r["outcome"]) for r in records] == [("audit_unavailable", "rejected")]


async def test_a_full_tmpfs_answers_503_and_loses_no_record(gateway_kit, fake_upstream, tmp_path):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({mounted.stderr.decode().strip()}); "
                    "test_disk_full_answers_503_forwards_nothing_and_loses_no_record injects ENOSPC instead")
    audit_path = disk / "gatekeeper-audit.jsonl"
    filler = disk / "filler"
    try:
        gateway = await gateway_kit.start({"audit": {"path": str(audit_path)}})
        answered = []
        status, request_id, _ = await generate(gateway, "room to spare")
        assert status == 200
        answered.append(request_id)
        with open(filler, "wb", buffering=0) as handle:  # fill every last block
            with pytest.raises(OSError) as full:
                while True:
                    handle.write(b"\0" * 4096)
            assert full.value.errno == errno.ENOSPC
        failed = None
        for attempt in range(20):  # the log's last page may still hold a record or two
            status, request_id, body = await generate(gateway, f"disk full {attempt}")
            if status == 503:
                assert body["error"]["code"] == "audit_unavailable"
                failed = request_id
                break
            answered.append(request_id)
        assert failed is not None, "the full disk was never noticed"
        filler.unlink()
        await wait_until_ready(gateway)
        status, request_id, _ = await generate(gateway, "room again")
        assert status == 200
        answered.append(request_id)
        await gateway_kit.stop_all()
        ids = [r.get("request_id") for r in read_records(audit_path)]
        for request_id in [*answered, failed]:
            assert ids.count(request_id) == 1
        verify_ok(audit_path)
    finally:
        await gateway_kit.stop_all()
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ------------------------------------------------------------------ kill -9 under load


def write_config(path: Path, upstream_url: str, port: int) -> None:
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
log_format = "json"

[upstream]
base_url = "{upstream_url}"
api_key = "{UPSTREAM_KEY}"
max_retries = 0

[plugins]
builtins = ["auth", "forward", "audit"]

[auth]
keys = [{{ id = "test-1", key = "{CLIENT_KEY}", tenant = "test" }}]

[audit]
path = "audit/gatekeeper-audit.jsonl"
fsync = "always"
checkpoint_every = 25
""")


def start_server(config: Path, log_file: Path) -> subprocess.Popen[bytes]:
    with open(log_file, "ab") as output:
        return subprocess.Popen([*GATEKEEPER, "serve", "--config", str(config)], stdout=output,
                                stderr=subprocess.STDOUT, cwd=config.parent)


async def wait_for_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert process.poll() is None, "the gateway exited during start-up"
            try:
                async with session.get(url + "/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("the gateway never became ready")


async def client_worker(url: str, worker: int, received: set[str], stop: asyncio.Event) -> None:
    """Send requests back to back; remember the id of every response read in full."""
    async with aiohttp.ClientSession() as session:
        number = 0
        while not stop.is_set():
            number += 1
            body: dict[str, Any] = {"model": "gpt-image-1.5", "prompt": f"load {worker}-{number}"}
            if number % 5 == 0:
                body.update(stream=True, partial_images=1)
            key = "sk-gk-wrong" if number % 7 == 0 else CLIENT_KEY
            try:
                async with session.post(url + "/v1/images/generations", json=body,
                                        headers={"Authorization": f"Bearer {key}"}) as response:
                    await response.read()
                    received.add(response.headers["x-gatekeeper-request-id"])
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return


async def test_kill_9_under_load_then_restart_keeps_every_record_a_client_received(fake_upstream, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "gatekeeper.toml"
    write_config(config, fake_upstream.base_url, port)  # type: ignore[attr-defined]
    server_log = tmp_path / "server.log"
    audit_path = tmp_path / "audit" / "gatekeeper-audit.jsonl"

    server = start_server(config, server_log)
    received: set[str] = set()
    stop = asyncio.Event()
    try:
        await wait_for_ready(url, server)
        workers = [asyncio.create_task(client_worker(url, i, received, stop)) for i in range(16)]
        deadline = time.monotonic() + 10
        while len(received) < 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        server.send_signal(signal.SIGKILL)  # mid-load: requests are in flight
        server.wait(10)
        stop.set()
        await asyncio.gather(*workers)
    finally:
        if server.poll() is None:
            server.kill()
    assert len(received) >= 100, server_log.read_text()[-2000:]

    restarted = start_server(config, server_log)
    try:
        await wait_for_ready(url, restarted)
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(30)

    verify = await asyncio.to_thread(subprocess.run, [*GATEKEEPER, "audit", "verify", "--config", str(config)],
                                     capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "checkpoint(s) matched" in verify.stdout
    recorded = {r.get("request_id") for r in read_records(audit_path)}
    missing = received - recorded
    assert not missing, f"{len(missing)} responses reached a client without a record"
