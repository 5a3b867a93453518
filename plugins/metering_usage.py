"""Reading `usage` out of responses: JSON bodies once, event streams as they pass.

JSON bodies are decoded into Structs that name only ``usage``, ``model`` and the number of
``data`` items, so msgspec skips base64 images and embedding vectors without building them.
Large images bodies are skimmed first (`summarize_json` with ``skim``): `skim_images_body`
cuts their base64 strings out, and msgspec reads the few hundred bytes that are left.
Event streams are scanned line by line by `SseUsageScanner`: it keeps only the current line
and only when that line can carry usage (an image ``*.completed`` event, a terminal
``response.*`` event, a chat chunk). Partial-image lines, megabytes of base64 each, are skipped
as they arrive without being kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from gatekeeper.errors import MALFORMED_JSON, GatewayError
from gatekeeper.images_body import skim_images_body
from gatekeeper.logs import get_logger
from gatekeeper.multipart import parse_form
from gatekeeper_plugins.metering_prices import Tokens

__all__ = [
    "IMAGE_ROUTES",
    "METERED_ROUTES",
    "JsonSummary",
    "RequestFacts",
    "SseUsageScanner",
    "add_usage",
    "default_image_model",
    "request_facts",
    "requested_model",
    "summarize_json",
    "tokens_from_usage",
]

if TYPE_CHECKING:
    from gatekeeper.flow import Flow

log = get_logger("gatekeeper.metering")

IMAGE_ROUTES = frozenset({"images/generations", "images/edits", "images/variations"})
METERED_ROUTES = IMAGE_ROUTES | {"chat/completions", "completions", "responses", "embeddings"}
_RESPONSE_TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete"})


class _Details(msgspec.Struct):
    text_tokens: int | None = None
    image_tokens: int | None = None
    cached_tokens: int | None = None


class _UsageFields(msgspec.Struct):
    """Every usage shape OpenAI sends: images, responses (input/output) and chat (prompt/completion)."""

    input_tokens: int | None = None
    input_tokens_details: _Details | None = None
    output_tokens: int | None = None
    output_tokens_details: _Details | None = None
    prompt_tokens: int | None = None
    prompt_tokens_details: _Details | None = None
    completion_tokens: int | None = None


def tokens_from_usage(usage: dict[str, Any] | None, image_route: bool) -> Tokens | None:
    """Split a `usage` object into priced kinds of tokens; None when it has no token counts.

    On image routes input tokens are split by ``input_tokens_details`` (text/image) and output
    tokens by ``output_tokens_details``; streamed image usage has no output details, and all
    its output tokens are image tokens. Elsewhere every token is a text token, and
    ``cached_tokens`` are the prompt-cache share of the input.
    """
    if not usage:
        return None
    try:
        fields = msgspec.convert(usage, _UsageFields, strict=False)
    except msgspec.ValidationError:
        return None
    input_total = fields.input_tokens if fields.input_tokens is not None else fields.prompt_tokens
    output_total = fields.output_tokens if fields.output_tokens is not None else fields.completion_tokens
    if input_total is None and output_total is None:
        return None
    input_total, output_total = input_total or 0, output_total or 0
    in_details = fields.input_tokens_details or fields.prompt_tokens_details or _Details()
    cached = in_details.cached_tokens or 0
    if not image_route:
        return Tokens(text_input=max(input_total - cached, 0), text_cached=min(cached, input_total),
                      text_output=output_total)
    image_in = in_details.image_tokens or 0
    text_in = in_details.text_tokens if in_details.text_tokens is not None else max(input_total - image_in, 0)
    out_details = fields.output_tokens_details
    if out_details is None or (out_details.image_tokens is None and out_details.text_tokens is None):
        image_out, text_out = output_total, 0
    else:
        text_out = out_details.text_tokens or 0
        image_out = out_details.image_tokens
        if image_out is None:
            image_out = max(output_total - text_out, 0)
    return Tokens(text_input=text_in, image_input=image_in, text_output=text_out, image_output=image_out)


def add_usage(total: dict[str, Any] | None, more: dict[str, Any]) -> dict[str, Any]:
    """Sum two usage objects field by field (nested details included)."""
    if total is None:
        return more
    summed = dict(total)
    for key, value in more.items():
        current = summed.get(key)
        if isinstance(value, bool) or value is None:
            summed.setdefault(key, value)
        elif isinstance(value, int) and isinstance(current, int):
            summed[key] = current + value
        elif isinstance(value, dict) and isinstance(current, dict):
            summed[key] = add_usage(current, value)
        elif current is None:
            summed[key] = value
    return summed


# ---------------------------------------------------------------- JSON bodies


class _Skipped(msgspec.Struct):
    """A `data` item: counted, never decoded (it holds base64 images or vectors)."""


class _Body(msgspec.Struct):
    usage: dict[str, Any] | None = None
    model: str | None = None
    data: list[_Skipped] | None = None


_decode_body = msgspec.json.Decoder(_Body).decode
# Only images answers are skimmed: base64 has no quotes or backslashes, while a chat answer full
# of escaped quotes would be slower to walk than to decode. A small body has little to skip.
_SKIM_FROM = 64 * 1024


class JsonSummary(msgspec.Struct):
    usage: dict[str, Any] | None
    model: str | None
    items: int  # len(data): the number of images of an images response


def summarize_json(body: bytes, skim: bool = False) -> JsonSummary | None:
    """`usage`, `model` and the item count of a JSON response; None when it is not one.

    With `skim` (images responses), a large body's ``b64_json`` images are cut out by
    `skim_images_body` first and msgspec reads the skeleton that is left.
    """
    if skim and len(body) >= _SKIM_FROM:
        skimmed = skim_images_body(body)
        if skimmed is not None:
            body = skimmed.skeleton
    try:
        decoded = _decode_body(body)
    except MALFORMED_JSON:
        return None
    return JsonSummary(decoded.usage, decoded.model, len(decoded.data) if decoded.data is not None else 0)


# ---------------------------------------------------------------- event streams


class _ResponseObject(msgspec.Struct):
    usage: dict[str, Any] | None = None
    model: str | None = None


class _Event(msgspec.Struct):
    type: str | None = None
    usage: dict[str, Any] | None = None
    model: str | None = None
    response: _ResponseObject | None = None


_decode_event = msgspec.json.Decoder(_Event).decode

_START, _PEEK, _KEEP, _SKIP = 0, 1, 2, 3
_PEEK_BYTES = 160  # enough to see `data: {"type":"image_generation.partial_image"` and decide
_MAX_UNTYPED_LINE = 1 << 20  # a chat chunk is small; a longer untyped line is not a usage chunk
_MAX_USAGE_LINE = 256 << 20  # one completed image event: its base64 image precedes its usage


def _usage_event_type(event_type: bytes) -> bool:
    name = event_type.decode("ascii", "replace")
    return name in _RESPONSE_TERMINAL or (
        name.endswith(".completed") and name.startswith(("image_generation.", "image_edit.")))


class SseUsageScanner:
    """Finds the usage in a server-sent event stream while keeping at most one line.

    Image streams carry usage in each ``*.completed`` event (summed, as an ``n>1`` stream
    sends one per image; the partial images' tokens are already inside it); the Responses API
    in the terminal ``response.*`` event's ``response.usage``; chat streams in the last chunk
    when the client asked for ``stream_options.include_usage``. Feed it every chunk, in order.
    """

    __slots__ = ("usage", "model", "completed_images", "_mode", "_event", "_parts", "_size", "_limit")

    def __init__(self) -> None:
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None
        self.completed_images = 0
        self._mode = _START
        self._event: bytes | None = None  # the `event:` name of the event being read
        self._parts: list[bytes] = []
        self._size = 0
        self._limit = _MAX_UNTYPED_LINE

    @property
    def buffered_bytes(self) -> int:
        """Bytes of the current line held right now (never a skipped line's)."""
        return self._size

    def feed(self, chunk: bytes) -> None:
        position, length = 0, len(chunk)
        while position < length:
            newline = chunk.find(b"\n", position)
            end = length if newline < 0 else newline
            if self._mode == _SKIP:
                if newline < 0:
                    return
                self._mode = _START
                position = end + 1
                continue
            if self._mode != _KEEP:
                # Copy only the first bytes of a line until it is known to be worth keeping.
                self._mode = _PEEK
                take = min(end, position + _PEEK_BYTES - self._size)
                self._append(chunk[position:take])
                if self._size >= _PEEK_BYTES:
                    self._decide(b"".join(self._parts))
                position = take
            if self._mode == _KEEP and position < end:
                self._append(chunk[position:end])
            if self._mode == _SKIP:
                continue
            if newline >= 0:
                self._end_line()
            position = end + 1

    def _append(self, piece: bytes) -> None:
        if piece:
            self._parts.append(piece)
            self._size += len(piece)
            if self._mode == _KEEP and self._size > self._limit:
                self._drop_line()

    def _decide(self, head: bytes) -> None:
        """Keep this line only if it can carry usage; decided from its first bytes."""
        if not head.startswith(b"data:"):
            self._mode = _KEEP if head.startswith(b"event:") else _SKIP
            self._limit = _PEEK_BYTES * 4
        elif self._event is not None:
            self._mode = _KEEP if _usage_event_type(self._event) else _SKIP
            self._limit = _MAX_USAGE_LINE
        else:
            type_at = head.find(b'"type":"')
            if type_at < 0:  # untyped data (chat chunks): small, kept to look for usage
                self._mode, self._limit = _KEEP, _MAX_UNTYPED_LINE
            else:
                start = type_at + 8
                stop = head.find(b'"', start)
                event_type = head[start:stop] if stop >= 0 else b""
                self._mode = _KEEP if stop >= 0 and _usage_event_type(event_type) else _SKIP
                self._limit = _MAX_USAGE_LINE
        if self._mode == _SKIP:
            self._parts.clear()
            self._size = 0

    def _drop_line(self) -> None:
        log.warning("metering skipped an event line above its size limit", limit=self._limit)
        self._mode = _SKIP
        self._parts.clear()
        self._size = 0

    def _end_line(self) -> None:
        line = b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        mode, self._mode = self._mode, _START
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:  # the blank line that ends an event
            self._event = None
            return
        if mode == _PEEK:
            self._decide(line)
            mode, self._mode = self._mode, _START
            if mode != _KEEP:
                return
        if line.startswith(b"event:"):
            self._event = line[6:].strip()
        elif line.startswith(b"data:"):
            self._read_data(line[5:])

    def _read_data(self, payload: bytes) -> None:
        if self._event is None and b'"usage":' not in payload:
            return  # a chat chunk without usage: not worth decoding
        try:
            event = _decode_event(payload)
        except MALFORMED_JSON:
            return  # `[DONE]` or a payload that is not a JSON object
        if event.response is not None:
            if event.response.usage is not None:
                self.usage = event.response.usage
            self.model = event.response.model or self.model
        elif event.usage is not None:
            if event.type is not None and event.type.endswith(".completed"):
                self.completed_images += 1
                self.usage = add_usage(self.usage, event.usage)
            else:
                self.usage = event.usage
        if event.model is not None:
            self.model = event.model


# ---------------------------------------------------------------- what the request asked for

_GPT_IMAGE_ONLY_FIELDS = ("output_format", "output_compression", "background", "moderation", "partial_images")
DEFAULT_GPT_IMAGE_MODEL = "gpt-image-1.5"  # the pinned spec's default for edits (contract 5.1)


class RequestFacts(msgspec.Struct, kw_only=True):
    """The request fields metering prices and estimates from (JSON or multipart alike)."""

    model: str | None
    n: int = 1
    size: str | None = None
    quality: str | None = None
    stream: bool = False
    partial_images: int = 0
    prompt_bytes: int = 0
    input_images: int = 0
    include_usage: bool = False  # chat: stream_options.include_usage


def _as_int(value: Any, default: int) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return default


def _as_flag(value: Any) -> bool:
    return value is True or value == "true"


def request_facts(flow: Flow) -> RequestFacts:
    """Read the priced fields of `flow`'s request; missing or malformed fields get defaults."""
    fields: dict[str, Any] = {}
    input_images = 0
    if flow.content_type == "multipart/form-data":
        try:
            parts = parse_form(flow.headers.get("content-type", ""), flow.body)
        except GatewayError:
            parts = []
        for part in parts:
            if part.is_file:
                input_images += part.name in ("image", "image[]")
            else:
                fields[part.name] = part.text()
    else:
        try:
            body = flow.json
        except GatewayError:
            body = None
        if isinstance(body, dict):
            fields = body
            images = body.get("images")
            input_images = len(images) if isinstance(images, list) else 0
    model = fields.get("model") if isinstance(fields.get("model"), str) else None
    if model is None and flow.route in IMAGE_ROUTES:
        model = default_image_model(flow.route, fields)
    prompt = fields.get("prompt")
    stream_options = fields.get("stream_options")
    return RequestFacts(
        model=model,
        n=max(_as_int(fields.get("n"), 1), 1),
        size=fields.get("size") if isinstance(fields.get("size"), str) else None,
        quality=fields.get("quality") if isinstance(fields.get("quality"), str) else None,
        stream=_as_flag(fields.get("stream")),
        partial_images=max(_as_int(fields.get("partial_images"), 0), 0),
        prompt_bytes=len(prompt.encode()) if isinstance(prompt, str) else 0,
        input_images=input_images,
        include_usage=isinstance(stream_options, dict) and stream_options.get("include_usage") is True,
    )


def requested_model(flow: Flow) -> str | None:
    """The model a request names, or the one an images request without `model` gets.

    Cheaper than `request_facts`: `flow.model` is read once per flow (the forwarder needs it
    too), and a multipart body is never parsed here.
    """
    model = flow.model
    if model is None and flow.route in IMAGE_ROUTES:
        fields: Any = {}
        if flow.content_type != "multipart/form-data":
            try:
                fields = flow.json
            except GatewayError:
                fields = None
        model = default_image_model(flow.route, fields if isinstance(fields, dict) else {})
    return model


def default_image_model(route: str, fields: dict[str, Any]) -> str:
    """The model an images request without `model` gets (contract sections 2, 5 and 6)."""
    if route == "images/variations":
        return "dall-e-2"
    if route == "images/edits":
        return DEFAULT_GPT_IMAGE_MODEL
    gpt_only = any(fields.get(name) is not None for name in _GPT_IMAGE_ONLY_FIELDS) or _as_flag(fields.get("stream"))
    return DEFAULT_GPT_IMAGE_MODEL if gpt_only else "dall-e-2"
