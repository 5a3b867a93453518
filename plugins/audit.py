"""The compliance audit log: one tamper-evident, durable record per request.

Every flow, answered or refused, becomes one line of canonical JSON in ``[audit] path``: who
asked (tenant, key id, client IP, never a key), what (model, parameters, the prompt's SHA-256),
what came back (the SHA-256 and C2PA presence of every returned image, usage, cost) and the
upstream's ids (``x-request-id``, ``openai-organization``). Lines are hash-chained (``prev``),
optionally HMAC-signed (``mac``), and checkpointed, so edits, deletions and a cut-off tail are
detectable with ``gatekeeper audit verify``.

With ``fsync = "always"`` a response is released only after its record is on disk; when the
disk refuses writes and ``required = true``, the gateway answers 503 ``audit_unavailable`` and
forwards nothing until writes succeed again. See docs/audit.md.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import socket
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from aiohttp import web

from gatekeeper import hookimpl
from gatekeeper.config import Config, ConfigError
from gatekeeper.errors import GatewayError
from gatekeeper.flow import Flow, Outcome
from gatekeeper.logs import get_logger, register_secret, register_url_secrets
from gatekeeper_plugins.audit_chain import log_files
from gatekeeper_plugins.audit_cli import matching_lines, parse_search_query, search_filter
from gatekeeper_plugins.audit_images import ImageFacts, analyze_images_body, analyze_responses_body
from gatekeeper_plugins.audit_pg import TABLE_NAME, PostgresCheckpoints
from gatekeeper_plugins.audit_record import (
    IMAGE_ROUTES,
    RequestFacts,
    RequestRecord,
    capture,
    normalized_input_hashes,
    request_facts,
)
from gatekeeper_plugins.audit_uploads import UploadFileHasher
from gatekeeper_plugins.audit_writer import BATCH_MAX_RECORDS, BATCH_WINDOW_S, AuditLog, AuditUnavailable

if TYPE_CHECKING:
    from gatekeeper.app import Gateway

__all__ = ["Plugin", "AuditConfig", "register_commands", "resolve_log_path", "log_name_for"]

log = get_logger("gatekeeper.audit")

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
OFF_LOOP_BYTES = 256 * 1024  # bodies above this are hashed in a worker thread, off the event loop
# Batch mode hashes large answers after the response is released; the bodies waiting for that
# stay in memory. Past this many bytes waiting, a response waits for its own hashing instead, so
# a gateway whose hashing falls behind (a CPU-starved container) slows down rather than growing.
LATER_MAX_BYTES = 32 * 1024 * 1024
SHUTDOWN_FLUSH_S = 10.0


class AuditConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: str = "audit/gatekeeper-audit.jsonl"  # relative to the config file's folder
    fsync: Literal["always", "batch"] = "always"
    hmac_key: str | None = None  # empty or unset: a plain sha256 chain
    log_prompts: bool = False
    required: bool = True
    rotate_bytes: PositiveInt = 104857600
    checkpoint_every: PositiveInt = 1000
    checkpoint_dsn: str | None = None  # postgresql://... : also keep every checkpoint in a table
    checkpoint_table: str = "gatekeeper_audit_checkpoints"


def resolve_log_path(path: str, config_path: str) -> Path:
    """A relative ``[audit] path`` is taken from the config file's folder (not the cwd)."""
    resolved = Path(path).expanduser()
    if not resolved.is_absolute() and not config_path.startswith("<"):
        resolved = Path(config_path).resolve().parent / resolved
    return resolved.absolute()


def log_name_for(path: Path) -> str:
    """How checkpoints name this log in a shared table: host and absolute path."""
    return f"{socket.gethostname()}:{path}"


def _unavailable() -> GatewayError:
    return GatewayError(
        503,
        "The gateway cannot write its audit log right now, so it is not accepting requests. Retry shortly.",
        type="server_error",
        code="audit_unavailable",
        headers={"retry-after": "1"},
        outcome=Outcome.REJECTED,
    )


class Plugin:
    """Write one chained audit record per flow; refuse traffic while records can't be written."""

    name = "audit"
    config_section = "audit"
    Config = AuditConfig

    def __init__(self, config: Config, settings: AuditConfig | None) -> None:
        self.settings = settings = settings or AuditConfig()
        if not TABLE_NAME.fullmatch(settings.checkpoint_table):
            raise ConfigError(f"{config.path}: [audit.checkpoint_table] must be a table name like "
                              f"'audit_checkpoints' or 'schema.table', got {settings.checkpoint_table!r}")
        self.path = resolve_log_path(settings.path, config.path)
        self.key = settings.hmac_key.encode() if settings.hmac_key else None
        register_secret(settings.hmac_key)
        register_secret(settings.checkpoint_dsn)
        register_url_secrets(settings.checkpoint_dsn)
        self.log_prompts = settings.log_prompts
        self.required = settings.required
        self.wait_for_disk = settings.fsync == "always"
        self.checkpoints = (PostgresCheckpoints(settings.checkpoint_dsn, settings.checkpoint_table)
                            if settings.checkpoint_dsn else None)
        self.log = AuditLog(
            self.path,
            fsync=settings.fsync,
            key=self.key,
            rotate_bytes=settings.rotate_bytes,
            checkpoint_every=settings.checkpoint_every,
            log_name=log_name_for(self.path),
            on_checkpoint=self.checkpoints.submit if self.checkpoints else None,
        )
        self._batch: list[RequestRecord] = []
        self._batch_started = 0.0
        self._batch_timer: asyncio.TimerHandle | None = None
        self._groups: dict[bool, tuple[list[RequestRecord], asyncio.Future[int]]] = {}  # by `retain`
        # Batch records still hashing their images, with the bytes of the bodies each holds.
        self._later: dict[asyncio.Task[None], int] = {}

    def describe(self) -> str:
        chain = "HMAC-signed chain" if self.key else "sha256 chain"
        sink = f", checkpoints also in {self.settings.checkpoint_table}" if self.checkpoints else ""
        return f"writes {self.path} (fsync {self.settings.fsync}, {chain}{sink})"

    # ------------------------------------------------------------ lifecycle

    @hookimpl
    async def startup(self, gateway: Gateway) -> None:
        """Recover the log's tail and start the writer thread before the first request."""
        if self.checkpoints is not None:
            await self.checkpoints.start()
        await asyncio.to_thread(self.log.open)
        log.info("audit log open", path=str(self.path), seq=self.log.seq, fsync=self.settings.fsync)

    @hookimpl
    async def shutdown(self, gateway: Gateway) -> None:
        """Write every queued record and the final checkpoint, then stop the writer."""
        if self._later:
            await asyncio.wait(list(self._later), timeout=SHUTDOWN_FLUSH_S)
        self._hand_over()
        for retain in list(self._groups):
            self._hand_over_group(retain)
        await asyncio.to_thread(self.log.close, SHUTDOWN_FLUSH_S)
        if self.checkpoints is not None:
            await self.checkpoints.close()

    @hookimpl
    def ready_check(self, gateway: Gateway) -> dict[str, Any]:
        """Not ready while records can't be written and the log is required."""
        audit_log = self.log
        report: dict[str, Any] = {
            "ready": not (self.required and audit_log.broken),
            "path": str(self.path),
            "seq": audit_log.seq,
            "pending": audit_log.pending + len(self._batch),
            "fsync": self.settings.fsync,
            "error": audit_log.broken,
            "dropped": audit_log.dropped,
            "tail_ok": audit_log.tail_ok,
            "checkpoint_seq": audit_log.last_checkpoint.seq if audit_log.last_checkpoint else None,
            "checkpoint_error": audit_log.checkpoint_error,
        }
        if self.checkpoints is not None:
            report["postgres_checkpoint_seq"] = self.checkpoints.stored_seq
            report["postgres_error"] = self.checkpoints.error
        return report

    @hookimpl
    def register_routes(self) -> list[web.RouteDef]:
        return [web.get("/admin/audit", self.search_route)]

    async def search_route(self, request: web.Request) -> web.Response:
        """``GET /admin/audit?tenant=&since=&...&limit=``: this process's records that pass every
        filter, as stored (one JSON line each, oldest first), what ``gatekeeper audit search`` prints.
        The files are read in a worker thread; past `limit` records the answer says it was cut."""
        try:
            values, limit = parse_search_query(request.query)
        except ValueError as error:
            param, message = error.args
            raise GatewayError(400, message, param=param, code="invalid_audit_query") from None
        wanted = search_filter(values)
        lines = await asyncio.to_thread(lambda: list(matching_lines(log_files(self.path), wanted, limit + 1)))
        truncated = len(lines) > limit
        body = b"".join(line + b"\n" for line in lines[:limit])
        return web.Response(body=body, content_type="application/x-ndjson",
                            headers={"x-gatekeeper-truncated": "true" if truncated else "false"})

    @hookimpl
    def reload_config(self, gateway: Gateway, config: Config) -> None:
        """Take up ``log_prompts`` and ``required`` live; the file, fsync mode and key need a restart."""
        from gatekeeper.config import decode_section

        fresh = decode_section(config.sections.get(self.config_section), AuditConfig, self.config_section, config.path)
        self.log_prompts, self.required = fresh.log_prompts, fresh.required
        kept = ("path", "fsync", "hmac_key", "rotate_bytes", "checkpoint_every", "checkpoint_dsn", "checkpoint_table")
        changed = [name for name in kept if getattr(fresh, name) != getattr(self.settings, name)]
        if changed:
            log.warning("audit settings take effect on restart only", keys=changed)

    # ------------------------------------------------------------ request stages

    @hookimpl
    def check_request(self, flow: Flow) -> None:
        """Refuse while records can't be written, before anything is forwarded (or billed)."""
        if self.required and self.log.broken:
            raise _unavailable()
        if flow.upload is not None:
            # An upload streams upstream unread: its files are hashed on the way (input_file_sha256).
            hasher = UploadFileHasher(flow.headers.get("Content-Type", ""))
            flow.upload.observers.append(hasher.feed)
            self._state(flow)["upload"] = hasher
            return
        if self._hashes_inputs_off_loop(flow):
            # Large edits: hash the inputs in a worker thread while the upstream works.
            try:
                flow.json  # decoded here, on the loop, so the thread only reads it
            except GatewayError:
                return
            self._state(flow)["facts"] = asyncio.ensure_future(
                asyncio.to_thread(request_facts, flow, self.log_prompts))

    @hookimpl
    def wrap_response_stream(self, flow: Flow) -> None:
        """Ask for the whole body of image responses whose image hashes are not known yet."""
        if (200 <= (flow.status or 0) < 300 and "output_image_sha256" not in flow.annotations
                and _returns_images(flow)):
            flow.collect_response_body = True
        return None

    @hookimpl
    def exchange_complete(self, flow: Flow) -> Awaitable[None] | None:
        """Record the exchange; in ``always`` mode the returned awaitable ends once the record is on
        disk. In ``batch`` mode this returns None and does no more than read the flow: every
        microsecond spent on the event loop costs the loop's throughput, and the writer thread
        does the rest in batches. A large body is hashed in a worker thread after the response is
        released."""
        if self.required and self.log.broken:
            raise _unavailable()  # exchange_error records the refusal
        if self.wait_for_disk:
            return self._complete_and_wait(flow)
        unhashed = self._unhashed_images(flow)
        if (self._facts_task(flow) is not None  # from check_request
                or (unhashed is not None and len(unhashed) > OFF_LOOP_BYTES) or self._hashes_inputs_off_loop(flow)):
            # Nothing waits for a batch record, so the client need not wait for the hashing
            # either: the record is built when the worker thread is done, and the cache stores
            # the entry with the image hashes then (flow.annotate_later).
            self._state(flow)["submitted"] = True
            held = len(flow.body) + (len(unhashed) if unhashed is not None else 0)
            behind = bool(self._later) and sum(self._later.values()) + held > LATER_MAX_BYTES
            task = self._complete_later(flow, held)
            if behind:
                # The hashing is behind: this response waits for its own. Shielded, so a client
                # that leaves meanwhile doesn't take the record with it.
                return asyncio.shield(task)
            flow.annotate_later(task)
            return None
        if unhashed is not None:
            self._keep_image_facts(flow, _analyze(flow.route, unhashed, self._is_event_stream(flow)))
        self._state(flow)["submitted"] = True
        self._collect(self._capture(flow, None, flow.annotations, None))
        return None

    def _complete_later(self, flow: Flow, held: int) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._complete_in_background(flow))
        self._later[task] = held
        task.add_done_callback(self._later.pop)
        return task

    async def _complete_in_background(self, flow: Flow) -> None:
        try:
            await self._analyze_images_in_thread(flow)
        except Exception:  # the record is kept without the image facts rather than lost
            log.exception("audit could not read the returned images", request_id=flow.request_id)
        self._collect(self._capture(flow, await self._request_facts_in_thread(flow), flow.annotations, None))

    async def _complete_and_wait(self, flow: Flow) -> None:
        """``always`` mode: the response waits until its record is on disk."""
        if self._unhashed_images(flow) is not None:
            await self._analyze_images_in_thread(flow)
        record = self._capture(flow, await self._request_facts_in_thread(flow), flow.annotations, None)
        state = self._state(flow)
        state["submitted"] = True
        must_wait = not self.log.broken
        written = self._write_soon(record, retain=not (must_wait and self.required))
        if not must_wait:
            return
        try:
            await asyncio.shield(written)  # shared with the group: a client gone must not cancel it
        except AuditUnavailable as error:
            if self.required:
                state["submitted"] = False
                raise _unavailable() from error

    @hookimpl
    async def exchange_error(self, flow: Flow, error: BaseException) -> None:
        """Record refusals, upstream failures, truncations and aborts; a record is never skipped."""
        state = self._state(flow)
        if state.get("submitted"):
            return
        images = flow.annotations if "output_image_sha256" in flow.annotations else None
        record = self._capture(flow, await self._request_facts_in_thread(flow), images, error)
        state["submitted"] = True
        if not self.wait_for_disk:
            self._collect(record)
            return
        written = self._write_soon(record, retain=True)
        if (not self.log.broken
                and flow.outcome not in (Outcome.CLIENT_ABORT, Outcome.TRUNCATED)):
            try:
                await asyncio.shield(written)
            except AuditUnavailable:
                pass  # still queued and retried; the writer logged the failure

    def _capture(self, flow: Flow, facts: RequestFacts | None, images: dict[str, Any] | None,
                 error: BaseException | None) -> RequestRecord:
        record = capture(flow, facts, images, error, self.log_prompts)
        if flow.upload is not None:
            record.upload_bytes = flow.upload.bytes_read
            hasher = self._state(flow).get("upload")
            record.input_file_sha256 = (
                [digest for digest, _ in files] if hasher is not None and flow.upload.complete
                and (files := hasher.finish()) is not None else None)
        return record

    def _state(self, flow: Flow) -> dict[str, Any]:
        state = flow.scratch.get(self.name)
        if state is None:
            state = flow.scratch[self.name] = {}
        return state

    # ------------------------------------------------------------ batch mode: collected on the loop

    def _collect(self, record: RequestRecord) -> None:
        """Keep `record` until the batch is full or 50 ms old, then hand the whole batch over: the
        writer thread is woken once per batch (a wake-up costs more CPU than a record), and
        completes, encodes and chains the records off the event loop, in one tight loop."""
        batch = self._batch
        if not batch:
            self._batch_started = time.monotonic()
            self._batch_timer = asyncio.get_running_loop().call_later(BATCH_WINDOW_S, self._hand_over)
        batch.append(record)
        if len(batch) >= BATCH_MAX_RECORDS:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        batch, self._batch = self._batch, []
        if batch:
            self.log.add_batch(batch, self._batch_started)

    # ------------------------------------------------------------ always mode: grouped per loop turn

    def _write_soon(self, record: RequestRecord, retain: bool) -> asyncio.Future[int]:
        """Queue `record` with the others finished in this turn of the event loop: the group goes to
        the writer in one hand-over, shares its write and fsync, and is answered with one callback
        into the loop rather than one per record."""
        group = self._groups.get(retain)
        if group is None:
            loop = asyncio.get_running_loop()
            answer: asyncio.Future[int] = loop.create_future()
            answer.add_done_callback(_mark_retrieved)
            group = self._groups[retain] = ([], answer)
            loop.call_soon(self._hand_over_group, retain)
        group[0].append(record)
        return group[1]

    def _hand_over_group(self, retain: bool) -> None:
        group = self._groups.pop(retain, None)
        if group is None:
            return
        records, answer = group
        loop = asyncio.get_running_loop()
        self.log.submit_group(records, retain=retain).add_done_callback(
            lambda written: loop.call_soon_threadsafe(_pass_on, written, answer))

    # ------------------------------------------------------------ facts, computed once

    def _facts_task(self, flow: Flow) -> asyncio.Future[RequestFacts] | None:
        state = flow.scratch.get(self.name)
        return state.get("facts") if state is not None else None

    @staticmethod
    def _unhashed_images(flow: Flow) -> bytes | None:
        """The body of an image response whose images haven't been hashed yet (a miss), else None.
        On a hit the cache restores flow.annotations with the hashes, so nothing is decoded again."""
        body = flow.response_body
        if (body is None or "output_image_sha256" in flow.annotations or not 200 <= (flow.status or 0) < 300
                or not _returns_images(flow)):
            return None
        return body

    async def _analyze_images_in_thread(self, flow: Flow) -> None:
        body = self._unhashed_images(flow)
        if body is None:
            return
        event_stream = self._is_event_stream(flow)
        if len(body) > OFF_LOOP_BYTES:
            facts = await asyncio.to_thread(_analyze, flow.route, body, event_stream)
        else:
            facts = _analyze(flow.route, body, event_stream)
        self._keep_image_facts(flow, facts)

    @staticmethod
    def _is_event_stream(flow: Flow) -> bool:
        return flow.response is not None and flow.response.is_event_stream

    @staticmethod
    def _keep_image_facts(flow: Flow, facts: ImageFacts) -> None:
        """Into flow.annotations, which the cache stores with the entry and restores on a hit."""
        flow.annotations["output_image_sha256"] = facts.sha256
        flow.annotations["c2pa"] = facts.c2pa

    @staticmethod
    def _hashes_inputs_off_loop(flow: Flow) -> bool:
        """Large image requests whose input hashes the normalize plugin hasn't computed already."""
        return (flow.route in IMAGE_ROUTES and len(flow.body) > OFF_LOOP_BYTES
                and normalized_input_hashes(flow) is None)

    async def _request_facts_in_thread(self, flow: Flow) -> RequestFacts | None:
        """The facts of a large request, hashed in a worker thread; None: small enough to be read
        from the flow when the record is built."""
        task = self._facts_task(flow)
        try:
            if task is not None:
                return await task
            if self._hashes_inputs_off_loop(flow):
                return await asyncio.to_thread(request_facts, flow, self.log_prompts)
        except Exception:  # a parse problem must never cost the record itself
            log.exception("audit could not read the request", request_id=flow.request_id)
            return RequestFacts()
        return None


def _returns_images(flow: Flow) -> bool:
    """Whether the answer may carry generated images: the Images API, and Responses requests that
    give the model the ``image_generation`` tool (contract 4.4), so no image escapes the log."""
    if flow.route in IMAGE_ROUTES:
        return True
    if flow.route != "responses":
        return False
    try:
        tools = flow.json.get("tools") if isinstance(flow.json, dict) else None
    except GatewayError:
        return False
    return isinstance(tools, list) and any(isinstance(tool, dict) and tool.get("type") == "image_generation"
                                           for tool in tools)


def _analyze(route: str, body: bytes, event_stream: bool) -> ImageFacts:
    if route == "responses":
        return analyze_responses_body(body, event_stream)
    return analyze_images_body(body, event_stream)


def _pass_on(written: concurrent.futures.Future[int], answer: asyncio.Future[int]) -> None:
    if answer.done():
        return
    error = written.exception()
    if error is None:
        answer.set_result(written.result())
    else:
        answer.set_exception(error)


def _mark_retrieved(answer: asyncio.Future[int]) -> None:
    """A group's failure may have no waiter left (clients gone, or nobody waits while broken)."""
    if not answer.cancelled():
        answer.exception()


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    """``gatekeeper audit verify | find-image | search``."""
    from gatekeeper_plugins.audit_cli import add_audit_commands

    add_audit_commands(subparsers)
