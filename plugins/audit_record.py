"""Turning a finished flow into an audit record (the fields pinned in issue 8, docs/audit.md).

Request facts come from the body exactly as the client sent it: ``prompt_sha256`` is the SHA-256
of the prompt's UTF-8 bytes as sent (no Unicode normalisation, no trimming), so anyone holding
the prompt text can prove it was, or wasn't, the one used. ``input_image_sha256`` lists the
SHA-256 of every image file of a multipart edit or variation (``image`` / ``image[]`` parts in
body order, then the ``mask``); for JSON edits, each ``images[]`` reference then the ``mask``:
the decoded bytes of a ``data:`` URL, else the UTF-8 of the ``image_url`` / ``file_id`` string.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
from typing import Any

from gatekeeper.errors import GatewayError
from gatekeeper.flow import Flow
from gatekeeper.multipart import parse_form

__all__ = ["RequestFacts", "request_facts", "normalized_input_hashes", "build_record", "iso_time", "IMAGE_ROUTES",
           "PARAM_NAMES"]

IMAGE_ROUTES = frozenset({"images/generations", "images/edits", "images/variations"})
PARAM_NAMES = ("size", "quality", "n", "output_format", "background")
_FILE_PARTS = ("image", "image[]", "mask")


def iso_time(epoch: float) -> str:
    """UTC, millisecond precision, ``Z`` suffix: sorts as text."""
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


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
        try:
            return _sha256(base64.b64decode(value.partition(";base64,")[2], validate=False))
        except (binascii.Error, ValueError):
            pass
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
    facts = RequestFacts()
    if flow.route not in IMAGE_ROUTES:
        return facts
    if flow.content_type == "multipart/form-data":
        _form_facts(flow, facts, log_prompts)
        return facts
    try:
        body = flow.json
    except GatewayError:
        return facts  # unparseable JSON: the record says so through status and outcome
    if isinstance(body, dict):
        _json_facts(body, facts, log_prompts)
    return facts


def _error_code(error: BaseException | None) -> str | None:
    if error is None:
        return None
    if isinstance(error, GatewayError):
        return error.code or error.type
    return type(error).__name__


def build_record(flow: Flow, facts: RequestFacts, images: dict[str, Any] | None,
                 error: BaseException | None, log_prompts: bool) -> dict[str, Any]:
    """The audit record of `flow` (without seq, prev and mac, which the writer adds)."""
    principal = flow.principal
    time_end = flow.time_end or flow.time_start
    status = error.status if isinstance(error, GatewayError) else flow.status
    record: dict[str, Any] = {
        "type": "request",
        "time_start": iso_time(flow.time_start),
        "time_end": iso_time(time_end),
        "latency_ms": round(flow.elapsed_ms, 3),
        "request_id": flow.request_id,
        "upstream_request_id": flow.upstream_request_id,
        "openai_organization": flow.openai_organization,
        "openai_project": flow.openai_project,
        "upstream": flow.upstream_name,
        "tenant": principal.tenant if principal else None,
        "key_id": principal.key_id if principal else None,
        "client_ip": flow.client_ip,
        "method": flow.method,
        "path": flow.path,
        "model": _model(flow),
        "params": facts.params,
        "prompt_sha256": facts.prompt_sha256,
        "input_image_sha256": facts.input_image_sha256,
        "output_image_sha256": images.get("output_image_sha256") if images else None,
        "c2pa": images.get("c2pa") if images else None,
        "status": status,
        "outcome": flow.outcome,
        "error": _error_code(error),
        "cache": flow.cache_status,
        "attempts": flow.attempts,
        "usage": flow.usage,
        "cost_usd": flow.cost_usd,
        "saved_usd": flow.saved_usd,
    }
    if log_prompts:
        record["prompt"] = facts.prompt
    return record


def _model(flow: Flow) -> str | None:
    try:
        return flow.model
    except GatewayError:
        return None
