"""Turning a finished flow into an audit record (the fields pinned in issue 8, docs/audit.md).

Request facts come from the body exactly as the client sent it: ``prompt_sha256`` is the SHA-256
of the prompt's UTF-8 bytes as sent (no Unicode normalisation, no trimming), so anyone holding
the prompt text can prove it was, or wasn't, the one used. ``input_image_sha256`` lists the
SHA-256 of every image file of a multipart edit or variation (``image`` / ``image[]`` parts in
body order, then the ``mask``); for JSON edits, each ``images[]`` reference then the ``mask``:
the decoded bytes of a ``data:`` URL, else the UTF-8 of the ``image_url`` / ``file_id`` string.
"""

from __future__ import annotations

import hashlib
import time
from decimal import Decimal
from typing import Any

import msgspec

from gatekeeper.errors import GatewayError
from gatekeeper.flow import Flow, Principal
from gatekeeper.logs import get_logger
from gatekeeper.multipart import parse_form
from gatekeeper_plugins.audit_images import b64decode

__all__ = ["RequestFacts", "request_facts", "json_facts", "normalized_input_hashes", "Captured", "capture",
           "build_record", "iso_time", "IMAGE_ROUTES", "PARAM_NAMES"]

log = get_logger("gatekeeper.audit")

IMAGE_ROUTES = frozenset({"images/generations", "images/edits", "images/variations"})
PARAM_NAMES = ("size", "quality", "n", "output_format", "background")
_FILE_PARTS = ("image", "image[]", "mask")


_formatted_second: tuple[int, str] = (-1, "")  # (second, its text): formatting a date per record costs 2 us


def iso_time(epoch: float) -> str:
    """UTC, millisecond precision, ``Z`` suffix: sorts as text."""
    global _formatted_second
    second, millis = divmod(int(epoch * 1000), 1000)
    known, text = _formatted_second
    if second != known:
        text = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        _formatted_second = (second, text)
    return f"{text}{millis:03d}Z"


class RequestFacts:
    """What was asked: parameters, the prompt's hash (and text) and input image hashes."""

    __slots__ = ("params", "prompt_sha256", "prompt", "input_image_sha256")

    def __init__(self) -> None:
        self.params: dict[str, Any] | None = None
        self.prompt_sha256: str | None = None
        self.prompt: str | None = None
        self.input_image_sha256: list[str] | None = None


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _reference_sha256(reference: Any) -> str | None:
    if not isinstance(reference, dict):
        return None
    value = reference.get("image_url") or reference.get("file_id")
    if not isinstance(value, str):
        return None
    if value.startswith("data:") and ";base64," in value[:200]:
        decoded = b64decode(value.partition(";base64,")[2])
        if decoded is not None:
            return _sha256(decoded)
    return _sha256(value.encode("utf-8", "surrogatepass"))


def _json_facts(body: dict[str, Any], facts: RequestFacts, log_prompts: bool) -> None:
    facts.params = {name: body.get(name) for name in PARAM_NAMES}
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        facts.prompt_sha256 = _sha256(prompt.encode("utf-8", "surrogatepass"))
        if log_prompts:
            facts.prompt = prompt
    images = body.get("images")
    if isinstance(images, list) or "mask" in body:
        references = [*(images if isinstance(images, list) else ()), body.get("mask")]
        facts.input_image_sha256 = [h for h in map(_reference_sha256, references) if h is not None]


def normalized_input_hashes(flow: Flow) -> list[str] | None:
    """The input image hashes the normalize plugin already computed for a multipart body (the
    same sha256 of each file part), so large edits are not hashed twice."""
    known = flow.scratch.get("normalize")
    if not isinstance(known, dict) or not known.get("multipart") or not isinstance(known.get("input_images"), list):
        return None
    mask = known.get("mask")
    return [*known["input_images"], *([mask] if isinstance(mask, str) else [])]


def _form_facts(flow: Flow, facts: RequestFacts, log_prompts: bool) -> None:
    try:
        parts = parse_form(flow.headers.get("content-type", ""), flow.body)
    except GatewayError:
        return
    params: dict[str, Any] = dict.fromkeys(PARAM_NAMES)
    known = normalized_input_hashes(flow)
    images: list[str] = []
    masks: list[str] = []
    for part in parts:
        if part.name in _FILE_PARTS and part.is_file:
            if known is None:
                (masks if part.name == "mask" else images).append(_sha256(part.data))
        elif part.name == "prompt":
            facts.prompt_sha256 = _sha256(part.data)
            if log_prompts:
                facts.prompt = part.text()
        elif part.name in params:
            text = part.text()
            params[part.name] = int(text) if part.name == "n" and text.isdigit() else text
    facts.params = params
    facts.input_image_sha256 = known if known is not None else images + masks


def request_facts(flow: Flow, log_prompts: bool) -> RequestFacts:
    """Read what was asked from the flow's body (JSON already decoded once by the flow)."""
    request = _request_of(flow, log_prompts)
    return request if isinstance(request, RequestFacts) else json_facts(request, log_prompts)


def json_facts(body: dict[str, Any], log_prompts: bool) -> RequestFacts:
    """What a JSON image request asked for."""
    facts = RequestFacts()
    _json_facts(body, facts, log_prompts)
    return facts


def _request_of(flow: Flow, log_prompts: bool) -> RequestFacts | dict[str, Any]:
    """The facts of a multipart request (read now: the body is not kept), or the decoded JSON body
    itself, to be read when the record is built."""
    if flow.route not in IMAGE_ROUTES:
        return _NO_FACTS
    try:
        body = flow.json
    except GatewayError:
        return _NO_FACTS  # unparseable JSON: the record says so through status and outcome
    if isinstance(body, dict):
        return body
    facts = RequestFacts()
    if flow.content_type == "multipart/form-data":
        try:
            _form_facts(flow, facts, log_prompts)
        except Exception:  # a parse problem must never cost the record itself
            log.exception("audit could not read the request", request_id=flow.request_id)
    return facts


_NO_FACTS = RequestFacts()  # shared, never changed: nothing was asked that a record keeps


class Captured(msgspec.Struct, gc=False):
    """What the record of a finished flow needs, read on the event loop in a few hundred
    nanoseconds; `build_record` turns it into the record later, in a batch with others, so that
    code runs hot once per batch instead of cold once per request."""

    time_start: float
    time_end: float
    latency_ms: float
    request_id: str
    upstream_request_id: str | None
    openai_organization: str | None
    openai_project: str | None
    upstream: str | None
    principal: Principal | None
    client_ip: str | None
    method: str
    path: str
    model: str | None
    request: Any  # RequestFacts, or the JSON body to read them from
    log_prompts: bool
    images: dict[str, Any] | None  # flow.annotations, when they hold the image facts
    status: int | None
    outcome: str | None
    error: str | None
    cache: str | None
    attempts: int
    usage: dict[str, Any] | None
    cost_usd: Decimal | None
    saved_usd: Decimal | None


def capture(flow: Flow, facts: RequestFacts | None, images: dict[str, Any] | None,
            error: BaseException | None, log_prompts: bool) -> Captured:
    """Read `flow` for its record; `facts` None: read them from the flow's body."""
    return Captured(
        flow.time_start,
        flow.time_end or flow.time_start,
        flow.elapsed_ms,
        flow.request_id,
        flow.upstream_request_id,
        flow.openai_organization,
        flow.openai_project,
        flow.upstream_name,
        flow.principal,
        flow.client_ip,
        flow.method,
        flow.path,
        _model(flow),
        facts if facts is not None else _request_of(flow, log_prompts),
        log_prompts,
        images,
        error.status if isinstance(error, GatewayError) else flow.status,
        flow.outcome,
        _error_code(error),
        flow.cache_status,
        flow.attempts,
        flow.usage,
        flow.cost_usd,
        flow.saved_usd,
    )


def _error_code(error: BaseException | None) -> str | None:
    if error is None:
        return None
    if isinstance(error, GatewayError):
        return error.code or error.type
    return type(error).__name__


def build_record(captured: Captured) -> dict[str, Any]:
    """The audit record of a captured flow (without seq, prev and mac, which the writer adds)."""
    request = captured.request
    try:
        facts = request if isinstance(request, RequestFacts) else json_facts(request, captured.log_prompts)
    except Exception:  # a parse problem must never cost the record itself
        log.exception("audit could not read the request", request_id=captured.request_id)
        facts = _NO_FACTS
    principal = captured.principal
    images = captured.images
    record: dict[str, Any] = {
        "type": "request",
        "time_start": iso_time(captured.time_start),
        "time_end": iso_time(captured.time_end),
        "latency_ms": round(captured.latency_ms, 3),
        "request_id": captured.request_id,
        "upstream_request_id": captured.upstream_request_id,
        "openai_organization": captured.openai_organization,
        "openai_project": captured.openai_project,
        "upstream": captured.upstream,
        "tenant": principal.tenant if principal else None,
        "key_id": principal.key_id if principal else None,
        "client_ip": captured.client_ip,
        "method": captured.method,
        "path": captured.path,
        "model": captured.model,
        "params": facts.params,
        "prompt_sha256": facts.prompt_sha256,
        "input_image_sha256": facts.input_image_sha256,
        "output_image_sha256": images.get("output_image_sha256") if images else None,
        "c2pa": images.get("c2pa") if images else None,
        "status": captured.status,
        "outcome": captured.outcome,
        "error": captured.error,
        "cache": captured.cache,
        "attempts": captured.attempts,
        "usage": captured.usage,
        "cost_usd": captured.cost_usd,
        "saved_usd": captured.saved_usd,
    }
    if captured.log_prompts:
        record["prompt"] = facts.prompt
    return record


def _model(flow: Flow) -> str | None:
    try:
        return flow.model
    except GatewayError:
        return None
