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
from msgspec import UNSET, UnsetType

from gatekeeper.errors import GatewayError
from gatekeeper.flow import Flow
from gatekeeper.logs import get_logger
from gatekeeper.memo import BoundedMemo
from gatekeeper.multipart import parse_form
from gatekeeper_plugins.audit_images import b64decode

__all__ = ["RequestFacts", "request_facts", "json_facts", "normalized_input_hashes", "RequestRecord", "capture",
           "complete", "iso_time", "IMAGE_ROUTES", "PARAM_NAMES"]

log = get_logger("gatekeeper.audit")

IMAGE_ROUTES = frozenset({"images/generations", "images/edits", "images/variations"})
PARAM_NAMES = ("size", "quality", "n", "output_format", "background")
_SORTED_PARAM_NAMES = tuple(sorted(PARAM_NAMES))
_FILE_PARTS = ("image", "image[]", "mask")
_NESTED = frozenset({dict, list})
RECENT_FACTS_MAX = 256  # request bodies whose facts are remembered ...
RECENT_FACTS_MAX_BODY = 16 * 1024  # ... when no larger than this

_JsonFacts = tuple[dict[str, Any] | msgspec.Raw, str | None, str | None, list[str] | None]
_recent_json_facts: BoundedMemo[bytes, _JsonFacts] = BoundedMemo(RECENT_FACTS_MAX)
_encode_sorted = msgspec.json.Encoder(order="sorted").encode


_MILLIS = tuple(f"{millis:03d}Z" for millis in range(1000))
_formatted_second: tuple[int, str] = (-1, "")  # (second, its text): formatting a date per record costs 2 us


def iso_time(epoch: float) -> str:
    """UTC, millisecond precision, ``Z`` suffix: sorts as text."""
    global _formatted_second
    second, millis = divmod(int(epoch * 1000), 1000)
    known, text = _formatted_second
    if second != known:
        text = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        _formatted_second = (second, text)
    return text + _MILLIS[millis]


class RequestFacts(msgspec.Struct, kw_only=True, gc=False):
    """What was asked: parameters, the prompt's hash (and text) and input image hashes."""

    params: dict[str, Any] | msgspec.Raw | None = None
    prompt_sha256: str | None = None
    prompt: str | None = None
    input_image_sha256: list[str] | None = None


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


def _json_parts(body: dict[str, Any]) -> _JsonFacts:
    """The params, prompt, prompt hash and input image hashes of a JSON image request."""
    get = body.get  # PARAM_NAMES, spelt out and in sorted order: the line keeps this key order
    params: dict[str, Any] | msgspec.Raw = {
        "background": get("background"), "n": get("n"), "output_format": get("output_format"),
        "quality": get("quality"), "size": get("size")}
    for value in params.values():  # type: ignore[union-attr]
        if type(value) in _NESTED:  # an object sent as a parameter: its keys need sorting too
            params = msgspec.Raw(_encode_sorted(params))
            break
    prompt = get("prompt")
    if not isinstance(prompt, str):
        prompt = None
    images = get("images")
    input_hashes = None
    if isinstance(images, list) or "mask" in body:
        references = [*(images if isinstance(images, list) else ()), get("mask")]
        input_hashes = [h for h in map(_reference_sha256, references) if h is not None]
    prompt_sha256 = _sha256(prompt.encode("utf-8", "surrogatepass")) if prompt is not None else None
    return params, prompt_sha256, prompt, input_hashes


def json_facts(body: dict[str, Any], log_prompts: bool) -> RequestFacts:
    """What a JSON image request asked for."""
    params, prompt_sha256, prompt, input_hashes = _json_parts(body)
    return RequestFacts(
        params=params,
        prompt_sha256=prompt_sha256,
        prompt=prompt if log_prompts else None,
        input_image_sha256=input_hashes,
    )


def _json_facts_of(body: bytes | UnsetType, document: dict[str, Any]) -> _JsonFacts:
    """`_json_parts` of `document`, decoded from `body`; remembered for the bodies seen last, so a
    request sent again (what a cache hit usually is) costs one dict lookup. Writer thread only."""
    if type(body) is not bytes:  # too large to be remembered
        return _json_parts(document)
    known = _recent_json_facts.get(body)
    if known is None:
        known = _recent_json_facts.remember(body, _json_parts(document))
    return known


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
    params: dict[str, Any] = dict.fromkeys(_SORTED_PARAM_NAMES)
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


class RequestRecord(msgspec.Struct, gc=False):
    """One request's audit line: the fields pinned in issue 8.

    `capture` makes it on the event loop from plain reads of the flow, and `complete` fills in the
    rest in the writer thread (the times as text, what the request asked) from the underscored
    fields, which it then unsets: `UNSET` fields are never encoded, so neither are `prompt` and
    `mac` unless they are set. Reading the flow is all the event loop pays for a record.

    The fields are declared in sorted order and `complete` leaves nothing unsorted inside them
    (objects from the request or the upstream become `msgspec.Raw` canonical JSON), so encoding
    the struct field by field already gives the canonical line: no sorting per record.
    """

    _body: bytes | UnsetType  # the request body as sent: the key to facts already read from it
    _ended: float | UnsetType
    _log_prompts: bool | UnsetType
    _request: Any  # RequestFacts, the JSON body to read them from, or what was read from the same body lately
    _started: float | UnsetType
    attempts: int
    c2pa: list[bool] | None
    cache: str | None
    client_ip: str | None
    cost_usd: Decimal | None
    error: str | None
    input_file_sha256: list[str] | None | UnsetType  # only for uploads
    input_image_sha256: list[str] | None
    key_id: str | None
    latency_ms: float
    mac: str | UnsetType  # only with an HMAC key
    method: str
    model: str | None
    openai_organization: str | None
    openai_project: str | None
    outcome: str | None
    output_image_sha256: list[str] | None
    params: dict[str, Any] | msgspec.Raw | None
    path: str
    prev: str
    prompt: str | None | UnsetType  # only with log_prompts
    prompt_sha256: str | None
    request_id: str
    saved_usd: Decimal | None
    seq: int
    status: int | None
    tenant: str | None
    time_end: str
    time_start: str
    type: str
    upload_bytes: int | UnsetType  # only for uploads
    upstream: str | None
    upstream_request_id: str | None
    usage: dict[str, Any] | msgspec.Raw | None


def capture(flow: Flow, facts: RequestFacts | None, images: dict[str, Any] | None,
            error: BaseException | None, log_prompts: bool) -> RequestRecord:
    """The record of `flow`, to be completed by `complete`; `facts` None: read them from the flow's
    body then. Positional arguments, in field order: keywords cost 20 times as much here."""
    principal = flow.principal
    request: Any = facts
    body: Any = UNSET  # kept only when small enough to be remembered: a queued record must stay small
    if request is None:
        request = _request_of(flow, log_prompts)
        if type(request) is dict and type(flow.body) is bytes and len(flow.body) <= RECENT_FACTS_MAX_BODY:
            body = flow.body
            # A body sent lately (a cache hit, usually): its facts now, while the body is in the CPU cache.
            request = _recent_json_facts.get(body, request)
    return RequestRecord(
        body,  # _body
        flow.time_end or flow.time_start,  # _ended
        log_prompts,  # _log_prompts
        request,  # _request
        flow.time_start,  # _started
        flow.attempts,  # attempts
        images.get("c2pa") if images else None,  # c2pa
        flow.cache_status,  # cache
        flow.client_ip,  # client_ip
        flow.cost_usd,  # cost_usd
        _error_code(error) if error is not None else None,  # error
        UNSET,  # input_file_sha256
        None,  # input_image_sha256
        principal.key_id if principal else None,  # key_id
        flow.elapsed_ms,  # latency_ms
        UNSET,  # mac
        flow.method,  # method
        _model(flow),  # model
        flow.openai_organization,  # openai_organization
        flow.openai_project,  # openai_project
        flow.outcome,  # outcome
        images.get("output_image_sha256") if images else None,  # output_image_sha256
        None,  # params
        flow.path,  # path
        "",  # prev
        UNSET,  # prompt
        None,  # prompt_sha256
        flow.request_id,  # request_id
        flow.saved_usd,  # saved_usd
        0,  # seq
        error.status if isinstance(error, GatewayError) else flow.status,  # status
        principal.tenant if principal else None,  # tenant
        "",  # time_end
        "",  # time_start
        "request",  # type
        UNSET,  # upload_bytes
        flow.upstream_name,  # upstream
        flow.upstream_request_id,  # upstream_request_id
        flow.usage,  # usage
    )


def _error_code(error: BaseException) -> str:
    if isinstance(error, GatewayError):
        return error.code or error.type
    return type(error).__name__


def complete(record: RequestRecord) -> RequestRecord:
    """Fill in what `capture` left for the writer thread (seq, prev and mac come with the seal)."""
    if record._started is UNSET:
        return record
    request, log_prompts = record._request, record._log_prompts is True
    if log_prompts:
        record.prompt = None
    try:
        if type(request) is tuple or type(request) is dict:
            params, prompt_sha256, prompt, input_hashes = (
                request if type(request) is tuple else _json_facts_of(record._body, request))  # type: ignore[arg-type]
            record.params, record.prompt_sha256, record.input_image_sha256 = params, prompt_sha256, input_hashes
            if log_prompts:
                record.prompt = prompt
        elif isinstance(request, RequestFacts):
            record.params = request.params
            record.prompt_sha256 = request.prompt_sha256
            record.input_image_sha256 = request.input_image_sha256
            if log_prompts:
                record.prompt = request.prompt
    except Exception:  # a parse problem must never cost the record itself
        log.exception("audit could not read the request", request_id=record.request_id)
    record.time_start = iso_time(record._started)
    record.time_end = iso_time(record._ended)
    record.latency_ms = int(record.latency_ms * 1000.0 + 0.5) / 1000.0  # to the microsecond; round() costs 3x
    usage = record.usage
    if usage is not None:
        known = _recent_usage.get(id(usage))
        if known is not None and known[0] is usage:  # every hit of a cache entry shares its usage
            record.usage = known[1]
        else:
            try:
                record.usage = _recent_usage.remember(id(usage), (usage, msgspec.Raw(_encode_sorted(usage))))[1]
            except (TypeError, ValueError, msgspec.EncodeError):
                pass  # left as it is: the seal replaces the record by one that says why
    record._body = record._started = record._ended = record._request = record._log_prompts = UNSET
    return record


# The usage of the records completed lately, encoded, by identity (holding each usage keeps its id
# from being reused). Writer thread only.
_recent_usage: BoundedMemo[int, tuple[Any, msgspec.Raw]] = BoundedMemo(256)


def _model(flow: Flow) -> str | None:
    try:
        return flow.model
    except GatewayError:
        return None
