"""A fake OpenAI upstream for gatekeeper's tests, demos and plugin authors.

`FakeUpstream` is an aiohttp application that answers the endpoints a gateway forwards
to, following ``shared/openai-images-contract.md``: images generations, edits and
variations (JSON, multipart and SSE), chat completions, responses, embeddings, models,
and files and uploads (kept in memory, per the pinned ``shared/openai-openapi.yaml``).
Bodies, SSE framing, error bodies and response headers have OpenAI's shapes; content and
usage are deterministic, so tests can assert exact token counts.

The bodies of ``POST /v1/files`` and ``POST /v1/uploads/{upload_id}/parts`` are read as
they arrive, and `FakeUpstream.upload_bytes_received` counts them chunk by chunk, so a
test can see an upload reach the fake before its sender has finished.

Every request is recorded in `FakeUpstream.calls`. `FakeUpstream.inject` makes the next
matching request misbehave: an error status, a stall, a stream cut mid-way or a reset
connection. Tests in another process do the same through ``POST /__fake/faults``.

    fake = FakeUpstream(api_key="sk-upstream")
    base_url = await fake.start()            # "http://127.0.0.1:PORT/v1"
    fake.inject(path="/v1/images/generations", status=429, headers={"retry-after": "1"})
    ...
    await fake.stop()
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import re
import secrets
import socket
import struct
import time
import warnings
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import msgspec
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BadContentDispositionHeader, BodyPartReader, MultipartReader
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

from gatekeeper.errors import MALFORMED_JSON

__all__ = [
    "INPUT_IMAGE_TOKENS_PER_IMAGE",
    "OUTPUT_IMAGE_TOKENS",
    "PARTIAL_IMAGE_TOKENS",
    "FakeUpstream",
    "RecordedCall",
    "jpeg_bytes",
    "output_image_tokens",
    "png_bytes",
    "serve",
    "webp_bytes",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Contract 13.2: output image tokens per image, by quality and size.
OUTPUT_IMAGE_TOKENS: dict[str, dict[str, int]] = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}
PARTIAL_IMAGE_TOKENS = 100  # contract 4.3: each streamed partial image costs 100 output tokens
INPUT_IMAGE_TOKENS_PER_IMAGE = 65  # the fake's own rule for edit inputs (OpenAI's varies)

_MAX_BODY_BYTES = 1 << 30  # edits may carry 16 images of up to 50 MB each
_EMBEDDING_DIMENSIONS = 8
_STARTED_AT = web.RequestKey("fake_upstream_started_at", float)

_Json = dict[str, Any]


# ----------------------------------------------------------------------------- image bytes


def _seed_digest(seed: str) -> bytes:
    return hashlib.sha256(seed.encode("utf-8")).digest()


def _c2pa_manifest_store(seed: str) -> bytes:
    """A JUMBF superbox labelled ``c2pa``: the shape of a C2PA manifest store, unsigned."""

    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", 8 + len(payload)) + kind + payload

    c2pa_uuid = bytes.fromhex("6332706100110010800000aa00389b71")
    description = box(b"jumd", c2pa_uuid + b"\x03" + b"c2pa\x00")
    claim = box(
        b"json",
        msgspec.json.encode({"claim_generator": "gatekeeper-fake-upstream", "seed_sha256": _seed_digest(seed).hex()}),
    )
    return box(b"jumb", description + claim)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_bytes(seed: str, px: int = 32, c2pa: bool = False) -> bytes:
    """A valid px-by-px RGB PNG of one colour taken from sha256(seed).

    With ``c2pa=True`` it carries a ``caBX`` chunk (a C2PA-shaped manifest store) before
    IDAT, so provenance-preservation tests can check that bytes pass through untouched.
    """
    if px < 1:
        raise ValueError("px must be at least 1")
    row = b"\x00" + _seed_digest(seed)[:3] * px  # filter byte "none", then RGB pixels
    chunks = [_png_chunk(b"IHDR", struct.pack(">IIBBBBB", px, px, 8, 2, 0, 0, 0))]
    if c2pa:
        chunks.append(_png_chunk(b"caBX", _c2pa_manifest_store(seed)))
    chunks.append(_png_chunk(b"IDAT", zlib.compress(row * px)))
    chunks.append(_png_chunk(b"IEND", b""))
    return PNG_SIGNATURE + b"".join(chunks)


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def jpeg_bytes(seed: str, c2pa: bool = False) -> bytes:
    """A minimal JPEG-shaped file (SOI, JFIF APP0, [APP11 C2PA], COM, EOI); not decodable."""
    segments = [_jpeg_segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")]
    if c2pa:
        # APP11 carries JUMBF as "JP", box instance 1, packet sequence 1 (as C2PA does).
        segments.append(_jpeg_segment(0xEB, b"JP" + struct.pack(">HI", 1, 1) + _c2pa_manifest_store(seed)))
    segments.append(_jpeg_segment(0xFE, b"gatekeeper fake upstream " + _seed_digest(seed).hex().encode()))
    return b"\xff\xd8" + b"".join(segments) + b"\xff\xd9"


def _riff_chunk(kind: bytes, payload: bytes) -> bytes:
    padding = b"\x00" if len(payload) % 2 else b""
    return kind + struct.pack("<I", len(payload)) + payload + padding


def webp_bytes(seed: str, px: int = 32, c2pa: bool = False) -> bytes:
    """A minimal RIFF/WEBP container (VP8X, [C2PA], VP8L header); not decodable."""
    edge = (px - 1).to_bytes(3, "little")
    chunks = [_riff_chunk(b"VP8X", b"\x00\x00\x00\x00" + edge + edge)]
    if c2pa:
        chunks.append(_riff_chunk(b"C2PA", _c2pa_manifest_store(seed)))
    vp8l_header = b"\x2f" + struct.pack("<I", (px - 1) | ((px - 1) << 14))
    chunks.append(_riff_chunk(b"VP8L", vp8l_header + _seed_digest(seed)))
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


# ----------------------------------------------------------------------------- token accounting


def _size_pixels(size: str) -> tuple[int, int]:
    width, _, height = size.partition("x")
    return int(width), int(height)


def output_image_tokens(quality: str, size: str) -> int:
    """Output tokens for one image: the contract 13.2 table, scaled by area off-table."""
    table = OUTPUT_IMAGE_TOKENS[quality]
    if size in table:
        return table[size]
    width, height = _size_pixels(size)
    return round(table["1024x1024"] * width * height / (1024 * 1024))


def _text_tokens(text: str) -> int:
    return max(1, len(text.split()))


# ----------------------------------------------------------------------------- errors


class _ApiError(Exception):
    """A request the fake refuses with an OpenAI-shaped error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}


# Contract 7.2: what OpenAI answers for each status when nothing more specific applies.
_STATUS_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Bad request.", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: ("Country, region, or territory not supported", "request_forbidden", "unsupported_country_region_territory"),
    404: ("The requested resource was not found.", "invalid_request_error", None),
    408: ("Request timed out.", "timeout", None),
    409: ("The request conflicted with another request. Please retry.", "invalid_request_error", None),
    422: ("The request could not be processed.", "invalid_request_error", None),
    429: ("Rate limit reached for requests", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request. Sorry about that!", "server_error", None),
    502: ("Bad gateway.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later", "server_error", None),
    504: ("Gateway timeout.", "server_error", None),
}


def _status_error(status: int) -> _ApiError:
    default_type = "server_error" if status >= 500 else "invalid_request_error"
    message, error_type, code = _STATUS_ERRORS.get(status, (f"HTTP {status}", default_type, None))
    return _ApiError(status, message, code=code, error_type=error_type)


def _invalid_value(name: str, value: object, choices: Sequence[str]) -> _ApiError:
    supported = ", ".join(f"'{choice}'" for choice in choices)
    return _ApiError(
        400, f"Invalid value: '{value}'. Supported values are: {supported}.", param=name, code="invalid_value"
    )


def _unknown_parameter(name: str) -> _ApiError:
    return _ApiError(400, f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")


def _missing_parameter(name: str) -> _ApiError:
    return _ApiError(400, f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter")


# ----------------------------------------------------------------------------- records and faults


@dataclass
class RecordedCall:
    """One request the fake received, as it arrived."""

    method: str
    path: str
    headers: CIMultiDict[str]  # a copy, duplicates kept
    body: bytes
    time: float  # time.monotonic() on arrival, for measuring gaps between retries

    def json(self) -> Any:
        """The body decoded as JSON."""
        return msgspec.json.decode(self.body)

    def part_names(self) -> list[str]:
        """The ``name`` of every multipart part, in order (``image`` vs ``image[]``, ...)."""
        return [
            name.decode() for name in re.findall(rb'(?im)^content-disposition:[^\r\n]*?\bname="([^"]*)"', self.body)
        ]


@dataclass
class _Fault:
    path: str | None
    status: int
    body: bytes | None
    headers: dict[str, str]
    delay_s: float
    cut_after_events: int | None
    cut_after_bytes: int | None
    reset: bool
    times: int

    @property
    def replaces_response(self) -> bool:
        # A 2xx fault without a body means "the normal answer, but delayed or cut".
        return self.body is not None or not 200 <= self.status < 300


class _FaultSpec(msgspec.Struct, forbid_unknown_fields=True):
    """The JSON body of ``POST /__fake/faults``: `FakeUpstream.inject`'s keyword arguments."""

    path: str | None = None
    status: int = 500
    body: str | dict[str, Any] | None = None
    headers: dict[str, str] | None = None
    delay_s: float = 0.0
    cut_after_events: int | None = None
    cut_after_bytes: int | None = None
    reset: bool = False
    times: int = 1


# ----------------------------------------------------------------------------- replies


@dataclass
class _Reply:
    """What an endpoint answers, before faults shape how it is sent."""

    status: int = 200
    body: bytes = b""
    events: list[bytes] | None = None  # SSE frames; when set, `body` is unused
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def _json_reply(payload: object, status: int = 200) -> _Reply:
    return _Reply(status=status, body=msgspec.json.encode(payload))


def _sse_reply(events: list[bytes]) -> _Reply:
    return _Reply(events=events, content_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse_event(event: str | None, payload: object) -> bytes:
    data = b"data: " + msgspec.json.encode(payload) + b"\n\n"
    return data if event is None else b"event: " + event.encode() + b"\n" + data


def _fault_reply(fault: _Fault) -> _Reply:
    if fault.body is None:
        return _json_reply(_status_error(fault.status).body, fault.status)
    return _Reply(status=fault.status, body=fault.body)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


# ----------------------------------------------------------------------------- request parsing


def _json_object(body: bytes) -> _Json:
    try:
        value = msgspec.json.decode(body)
    except MALFORMED_JSON:  # not JSON, not UTF-8, or nested past the recursion limit
        raise _ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
            "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
            "sent was not valid JSON.)",
        ) from None
    if not isinstance(value, dict):
        raise _ApiError(400, "The request body must be a JSON object.")
    return value


@dataclass
class _Upload:
    name: str
    filename: str | None
    data: bytes


_FILE_PARTS = frozenset({"image", "image[]", "mask"})


def _byte_stream(body: bytes) -> StreamReader:
    """A finished in-memory StreamReader, so aiohttp's multipart reader can parse a body we
    already read (the raw bytes are needed for `RecordedCall`, and a request body reads once)."""
    loop = asyncio.get_running_loop()
    # high water is twice the limit: above the body size, so the reader never asks to pause.
    stream = StreamReader(BaseProtocol(loop), limit=max(len(body), 1 << 16), loop=loop)
    stream.feed_data(body)
    stream.feed_eof()
    return stream


async def _read_form(
    headers: Mapping[str, str], body: bytes, file_parts: frozenset[str] = _FILE_PARTS
) -> tuple[dict[str, str], list[_Upload]]:
    """Text fields (last value wins) and file parts (those named in `file_parts`) of a
    multipart/form-data body."""
    fields: dict[str, str] = {}
    uploads: list[_Upload] = []
    try:
        reader = MultipartReader(headers, _byte_stream(body))
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise _ApiError(400, "Nested multipart bodies are not supported.")
            # aiohttp only warns about a Content-Disposition it cannot parse; OpenAI refuses the body.
            with warnings.catch_warnings(record=True) as unparsed:  # no await inside: no other request's warnings
                warnings.simplefilter("always", BadContentDispositionHeader)
                name = part.name or ""
            if unparsed:
                raise ValueError("a part's Content-Disposition does not parse")
            data = bytes(await part.read())
            if name in file_parts:
                uploads.append(_Upload(name, part.filename, data))
            else:
                fields[name] = data.decode("utf-8")
    except (ValueError, HttpProcessingError):  # a bad boundary, a cut-off part, a part's header that won't parse
        raise _ApiError(400, "Could not parse the multipart/form-data body.") from None
    return fields, uploads


def _is_multipart(request: web.Request) -> bool:
    return request.content_type.startswith("multipart/")


class _Params:
    """Validating, typed access to request fields: a JSON object, or multipart text fields
    (where ints arrive as decimal strings and booleans as "true"/"false", contract 5.3)."""

    def __init__(self, values: Mapping[str, Any], *, from_form: bool = False) -> None:
        self.values = values
        self.from_form = from_form

    def present(self, name: str) -> bool:
        return self.values.get(name) is not None

    def optional_text(self, name: str, choices: Sequence[str] | None = None) -> str | None:
        value = self.values.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise _ApiError(400, f"Invalid type for '{name}': expected a string.", param=name, code="invalid_type")
        if choices is not None and value not in choices:
            raise _invalid_value(name, value, choices)
        return value

    def text(self, name: str, default: str, choices: Sequence[str] | None = None) -> str:
        value = self.optional_text(name, choices)
        return default if value is None else value

    def required_text(self, name: str, max_length: int | None = None) -> str:
        value = self.optional_text(name)
        if value is None:
            raise _ApiError(
                400, f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
            )
        if not value:
            raise _ApiError(400, f"Invalid '{name}': empty string.", param=name, code="empty_string")
        if max_length is not None and len(value) > max_length:
            raise _ApiError(
                400,
                f"Invalid '{name}': string too long. Expected a string with maximum length "
                f"{max_length}, but got a string with length {len(value)} instead.",
                param=name,
                code="string_above_max_length",
            )
        return value

    def integer(self, name: str, default: int, minimum: int, maximum: int) -> int:
        value = self.values.get(name)
        if value is None:
            return default
        if self.from_form and isinstance(value, str) and re.fullmatch(r"-?\d+", value):
            value = int(value)
        if type(value) is float and value.is_integer():  # JSON Schema's `integer`: any number without a fraction
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _ApiError(400, f"Invalid type for '{name}': expected an integer.", param=name, code="invalid_type")
        if value < minimum:
            raise _ApiError(
                400,
                f"Invalid '{name}': integer below minimum value. Expected a value >= {minimum}, "
                f"but got {value} instead.",
                param=name,
                code="integer_below_min_value",
            )
        if value > maximum:
            raise _ApiError(
                400,
                f"Invalid '{name}': integer above maximum value. Expected a value <= {maximum}, "
                f"but got {value} instead.",
                param=name,
                code="integer_above_max_value",
            )
        return value

    def flag(self, name: str) -> bool:
        value = self.values.get(name)
        if value is None:
            return False
        if self.from_form and isinstance(value, str) and value in ("true", "false"):
            return value == "true"
        if not isinstance(value, bool):
            raise _ApiError(400, f"Invalid type for '{name}': expected a boolean.", param=name, code="invalid_type")
        return value


# ----------------------------------------------------------------------------- image rules

_DALLE_SIZES = {
    "dall-e-2": ("256x256", "512x512", "1024x1024"),
    "dall-e-3": ("1024x1024", "1792x1024", "1024x1792"),
}
_DALLE_QUALITIES = {"dall-e-2": ("standard", "auto"), "dall-e-3": ("standard", "hd", "auto")}
_DALLE_PROMPT_LIMITS = {"dall-e-2": 1000, "dall-e-3": 4000}
_GPT_IMAGE_PROMPT_LIMIT = 32000
_GPT_IMAGE_SIZES = ("1024x1024", "1536x1024", "1024x1536", "auto")
_GPT_IMAGE_QUALITIES = ("low", "medium", "high", "auto")
_IMAGE_MODELS_FOR_ERRORS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "gpt-image-2")
# Any of these (with a value) means a GPT image model was meant when `model` is absent (contract 2).
_GPT_IMAGE_ONLY_FIELDS = ("output_format", "output_compression", "background", "moderation", "partial_images")
_DEFAULT_GPT_IMAGE_MODEL = "gpt-image-1.5"


def _is_gpt_image(model: str) -> bool:
    return model.startswith(("gpt-image-", "chatgpt-image"))


def _has_fixed_sizes(model: str) -> bool:
    # gpt-image-1, -1-mini, -1.5 and chatgpt-image-latest take three sizes; later models any WxH.
    return model.startswith(("gpt-image-1", "chatgpt-image"))


def _check_image_model(model: str, allowed_dalle: Sequence[str]) -> None:
    if model not in allowed_dalle and not _is_gpt_image(model):
        choices = [m for m in _IMAGE_MODELS_FOR_ERRORS if m in allowed_dalle or _is_gpt_image(m)]
        raise _invalid_value("model", model, choices)


def _gpt_image_size(params: _Params, model: str) -> str:
    if _has_fixed_sizes(model):
        return params.text("size", "auto", _GPT_IMAGE_SIZES)
    size = params.text("size", "auto")
    if size == "auto":
        return size
    match = re.fullmatch(r"(\d+)x(\d+)", size)
    if match is None:
        raise _invalid_value("size", size, _GPT_IMAGE_SIZES)
    width, height = int(match[1]), int(match[2])
    if width % 16 or height % 16 or max(width, height) > 3840 or max(width, height) > 3 * min(width, height):
        raise _ApiError(
            400,
            f"Invalid size '{size}': both edges must be multiples of 16, at most 3840, "
            "with an aspect ratio between 1:3 and 3:1.",
            param="size",
            code="invalid_value",
        )
    return size


@dataclass(frozen=True)
class _ImageJob:
    """A validated GPT image request, with every `auto` resolved."""

    event_prefix: str  # "image_generation" or "image_edit"
    prompt: str
    n: int
    size: str
    quality: str
    background: str
    output_format: str
    stream: bool
    partial_images: int
    input_images: int


def _gpt_image_job(params: _Params, model: str, prompt: str, event_prefix: str, input_images: int) -> _ImageJob:
    if params.present("response_format"):
        raise _unknown_parameter("response_format")
    n = params.integer("n", 1, 1, 10)
    size = _gpt_image_size(params, model)
    quality = params.text("quality", "auto", _GPT_IMAGE_QUALITIES)
    output_format = params.text("output_format", "png", ("png", "jpeg", "webp"))
    background = params.text("background", "auto", ("transparent", "opaque", "auto"))
    if background == "transparent" and output_format == "jpeg":
        raise _ApiError(
            400,
            "Transparent background is not supported for output_format 'jpeg'; use 'png' or 'webp'.",
            param="background",
            code="invalid_value",
        )
    params.integer("output_compression", 100, 0, 100)
    params.optional_text("moderation", ("low", "auto"))
    params.optional_text("input_fidelity", ("high", "low"))
    return _ImageJob(
        event_prefix=event_prefix,
        prompt=prompt,
        n=n,
        size="1024x1024" if size == "auto" else size,
        quality="medium" if quality == "auto" else quality,
        background="opaque" if background == "auto" else background,
        output_format=output_format,
        stream=params.flag("stream"),
        partial_images=params.integer("partial_images", 0, 0, 3),
        input_images=input_images,
    )


def _dalle_options(params: _Params, model: str) -> tuple[int, str]:
    """Validate a DALL·E request; returns (n, response_format)."""
    if params.flag("stream"):
        raise _ApiError(400, f"Streaming is not supported for model '{model}'.", param="stream", code="invalid_value")
    n = params.integer("n", 1, 1, 10)
    if model == "dall-e-3" and n != 1:
        raise _ApiError(400, "You must provide n=1 for this model.", param="n")
    params.text("size", "1024x1024", _DALLE_SIZES[model])
    params.text("quality", "standard", _DALLE_QUALITIES[model])
    if model == "dall-e-3":
        params.optional_text("style", ("vivid", "natural"))
    return n, params.text("response_format", "url", ("url", "b64_json"))


def _json_edit_image_count(params: _Params) -> int:
    """Validate the JSON edit variant's `images` (and `mask`) references; returns the count."""
    images = params.values.get("images")
    if images is None:
        raise _ApiError(400, "Missing required parameter: 'images'.", param="images", code="missing_required_parameter")
    if not isinstance(images, list) or not 1 <= len(images) <= 16:
        raise _ApiError(400, "Invalid 'images': expected an array of 1 to 16 image references.", param="images")
    references = [("images", image) for image in images]
    if params.present("mask"):
        references.append(("mask", params.values["mask"]))
    for name, reference in references:
        given = [key for key in ("image_url", "file_id") if isinstance(reference, dict) and reference.get(key)]
        if len(given) != 1:
            raise _ApiError(
                400, f"Invalid '{name}': each reference needs exactly one of 'image_url' or 'file_id'.", param=name
            )
    return len(images)


# ----------------------------------------------------------------------------- other endpoints' helpers


def _content_text(content: object) -> str:
    """The text of a chat/responses message content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _last_user_text(messages: Sequence[object]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _responses_input_text(given: object) -> str:
    """The Responses API `input`: a string, or a list of items whose last user message counts."""
    if isinstance(given, str):
        return given
    return _last_user_text(given) if isinstance(given, list) else ""


def _text_pieces(text: str) -> list[str]:
    """Word-sized pieces that concatenate back to `text`, for streamed deltas."""
    return re.findall(r"\S+\s*|\s+", text) or [text]


def _chat_usage(prompt_tokens: int, completion_tokens: int) -> _Json:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _chat_completion(head: _Json, text: str, usage: _Json) -> _Json:
    message: _Json = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
    return {
        "id": head["id"],
        "object": "chat.completion",
        "created": head["created"],
        "model": head["model"],
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        "usage": usage,
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }


def _chat_chunks(head: _Json, text: str, usage: _Json | None) -> list[bytes]:
    """Data-only SSE frames: role, content pieces, finish, [usage], [DONE] (contract 10)."""

    def chunk(choices: list[_Json], **extra: Any) -> bytes:
        payload = {"id": head["id"], "object": "chat.completion.chunk", "created": head["created"]}
        payload |= {"model": head["model"], "system_fingerprint": "fp_fake", "choices": choices, **extra}
        return _sse_event(None, payload)

    def choice(delta: _Json, finish_reason: str | None = None) -> list[_Json]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]

    # With include_usage every chunk has "usage": null and one extra chunk carries it.
    extra = {} if usage is None else {"usage": None}
    frames = [chunk(choice({"role": "assistant", "content": "", "refusal": None}), **extra)]
    frames += [chunk(choice({"content": piece}), **extra) for piece in _text_pieces(text)]
    frames.append(chunk(choice({}, "stop"), **extra))
    if usage is not None:
        frames.append(chunk([], usage=usage))
    frames.append(b"data: [DONE]\n\n")
    return frames


def _response_object(model: str, prompt: str, text: str, instructions: object) -> _Json:
    """A completed Responses API object with one assistant message."""
    input_tokens, output_tokens = _text_tokens(prompt), _text_tokens(text)
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    message = {"id": _new_id("msg_"), "type": "message", "status": "completed", "role": "assistant"}
    return {
        "id": _new_id("resp_"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": instructions,
        "model": model,
        "output": [{**message, "content": [part]}],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "temperature": 1.0,
        "top_p": 1.0,
        "text": {"format": {"type": "text"}},
        "metadata": {},
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }


def _response_events(completed: _Json, image_steps: Sequence[_Json] = ()) -> list[bytes]:
    """The Responses stream for `completed`, numbered by sequence_number; usage comes last.
    `image_steps` are an image generation call's events, ahead of the message (its last item)."""
    message = completed["output"][-1]
    message_index = len(completed["output"]) - 1
    part = message["content"][0]
    text = part["text"]
    in_progress = {**completed, "status": "in_progress", "output": [], "usage": None}
    where = {"item_id": message["id"], "output_index": message_index, "content_index": 0}
    steps: list[_Json] = [
        {"type": "response.created", "response": in_progress},
        {"type": "response.in_progress", "response": in_progress},
        *image_steps,
        {
            "type": "response.output_item.added",
            "output_index": message_index,
            "item": {**message, "status": "in_progress", "content": []},
        },
        {"type": "response.content_part.added", **where, "part": {**part, "text": ""}},
        *(
            {"type": "response.output_text.delta", **where, "delta": piece, "logprobs": []}
            for piece in _text_pieces(text)
        ),
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": part},
        {"type": "response.output_item.done", "output_index": message_index, "item": message},
        {"type": "response.completed", "response": completed},
    ]
    return [_sse_event(step["type"], {**step, "sequence_number": number}) for number, step in enumerate(steps)]


def _image_tool(tools: object) -> _Json | None:
    """The `image_generation` tool of a Responses request, if it has one (contract 4.4)."""
    if isinstance(tools, list):
        for tool in tools:
            if isinstance(tool, dict) and tool.get("type") == "image_generation":
                return tool
    return None


def _image_call(image: bytes) -> _Json:
    """A finished `image_generation_call` output item (Spec:ImageGenToolCall)."""
    return {"id": _new_id("ig_"), "type": "image_generation_call", "status": "completed", "result": _b64(image)}


def _image_call_events(call: _Json, output_index: int, partials: list[bytes], tool: _Json) -> list[_Json]:
    """The events of one image generation call inside a Responses stream; the image itself only
    in ``response.output_item.done`` (``...image_generation_call.completed`` carries none)."""
    where = {"output_index": output_index, "item_id": call["id"]}
    shape = {name: tool.get(name, "auto") for name in ("size", "quality", "background")}
    shape["output_format"] = tool.get("output_format", "png")
    return [
        {"type": "response.output_item.added", "output_index": output_index,
         "item": {**call, "status": "in_progress", "result": None}},
        {"type": "response.image_generation_call.in_progress", **where},
        {"type": "response.image_generation_call.generating", **where},
        *({"type": "response.image_generation_call.partial_image", **where, "partial_image_index": index,
           "partial_image_b64": _b64(partial), **shape} for index, partial in enumerate(partials)),
        {"type": "response.image_generation_call.completed", **where},
        {"type": "response.output_item.done", "output_index": output_index, "item": call},
    ]


def _embedding_inputs(value: object) -> list[tuple[str, int]]:
    """Each input of an embeddings request as (text, token count)."""
    if isinstance(value, str):
        return [(value, _text_tokens(value))]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return [(item, _text_tokens(item)) for item in value]
        if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return [(" ".join(map(str, value)), len(value))]
        if all(isinstance(item, list) and item and all(isinstance(t, int) for t in item) for item in value):
            return [(" ".join(map(str, item)), len(item)) for item in value]
    raise _ApiError(400, "'$.input' is invalid. Please check the API reference.", param="input")


def _embedding(model: str, text: str, dimensions: int) -> tuple[float, ...]:
    """A deterministic unit vector, rounded to float32 so float and base64 answers agree."""
    digest = hashlib.shake_256(f"{model}\0{text}".encode()).digest(4 * dimensions)
    raw = [int.from_bytes(digest[4 * i : 4 * i + 4], "little") / 2**31 - 1.0 for i in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(x / norm for x in raw))
    return struct.unpack(f"<{dimensions}f", packed)


# (id, created, owned_by)
_MODELS: tuple[tuple[str, int, str], ...] = (
    ("gpt-image-1.5", 1765843200, "system"),
    ("gpt-image-1", 1745366400, "system"),
    ("gpt-image-1-mini", 1759708800, "system"),
    ("gpt-image-2", 1776729600, "system"),
    ("chatgpt-image-latest", 1765843200, "system"),
    ("dall-e-2", 1698798177, "system"),
    ("dall-e-3", 1698785189, "system"),
    ("gpt-4o-mini", 1721172741, "system"),
    ("text-embedding-3-small", 1705948997, "system"),
)


def _model_object(model_id: str, created: int, owned_by: str) -> _Json:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


# ----------------------------------------------------------------------------- files and uploads

_FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")  # Spec:CreateFileRequest
_UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision")  # Spec:CreateUploadRequest
_MAX_FILE_BYTES = 512 << 20  # "Individual files can be up to 512 MB" (createFile)
_MAX_PART_BYTES = 64 << 20  # "Each Part can be at most 64 MB" (addUploadPart)
_MAX_UPLOAD_BYTES = 8 << 30  # "an Upload can accept at most 8 GB in total" (createUpload)
_UPLOAD_LIFETIME_S = 3600  # an Upload "expires after an hour after you create it"
_BATCH_FILE_LIFETIME_S = 30 * 24 * 3600  # Spec:FileExpirationAfter: batch files expire after 30 days
# The two routes whose bodies are read as they arrive and counted in `upload_bytes_received`.
_COUNTED_UPLOAD_ROUTES = frozenset({("POST", "/v1/files"), ("POST", "/v1/uploads/{upload_id}/parts")})


@dataclass
class _StoredFile:
    meta: _Json  # the OpenAIFile object, as answered
    content: bytes


@dataclass
class _UploadState:
    meta: _Json  # the Upload object, as answered; its status and file change in place
    parts: dict[str, bytes] = field(default_factory=dict)  # part id -> the Part's bytes


def _file_object(filename: str, purpose: str, size: int) -> _Json:
    """A new Spec:OpenAIFile; `expires_at` only where a file expires (batch files, after 30 days)."""
    created_at = int(time.time())
    meta: _Json = {
        "id": _new_id("file-"),
        "object": "file",
        "bytes": size,
        "created_at": created_at,
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
    }
    if purpose == "batch":
        meta["expires_at"] = created_at + _BATCH_FILE_LIFETIME_S
    return meta


def _too_large(name: str, size: int, limit: int, what: str) -> _ApiError:
    return _ApiError(
        400, f"{what} is too large: {size} bytes, at most {limit} bytes are allowed.", param=name, code="invalid_value"
    )


def _require_pending(upload: _UploadState, action: str) -> None:
    status = upload.meta["status"]
    if status != "pending":
        raise _ApiError(400, f"Cannot {action} an Upload with status '{status}'.")


async def _drop_connection(request: web.Request) -> None:
    """Close the connection abruptly, after what was already written has left."""
    transport = request.transport
    if transport is None:
        return
    # abort() discards buffered bytes: let the cut-off prefix reach the client first.
    while transport.get_write_buffer_size() and not transport.is_closing():
        await asyncio.sleep(0.001)
    transport.abort()


def _reset_connection(request: web.Request) -> None:
    """Close the connection with a TCP RST and no response at all."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Linger 0 turns the close into a reset, like a crashed upstream or a load balancer.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


_Endpoint = Callable[[web.Request, bytes], Awaitable[_Reply]]
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# ----------------------------------------------------------------------------- the fake


class FakeUpstream:
    """An in-process fake of api.openai.com/v1, with recorded calls and injectable faults.

    Public state a test may read: `calls` (every request, as it arrived), `base_url` (once
    started), and `upload_bytes_received`, the body bytes of ``POST /v1/files`` and
    ``POST /v1/uploads/{upload_id}/parts`` counted chunk by chunk as they arrive (it grows
    before the sender has finished, and only ever grows). Files and Uploads live in memory.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        organization: str = "org-fake",
        project: str | None = None,
        c2pa: bool = False,
        image_px: int = 32,
    ) -> None:
        self.api_key = api_key
        self.organization = organization
        self.project = project
        self.c2pa = c2pa
        self.image_px = image_px
        self.stream_interval_s = 0.0  # pause between SSE events, to make streams observably slow
        self.calls: list[RecordedCall] = []
        self.base_url: str | None = None  # set by start()
        self.upload_bytes_received = 0  # grows with each chunk of an upload-carrying body, as it arrives
        self._faults: list[_Fault] = []
        self._files: dict[str, _StoredFile] = {}  # insertion order is creation order
        self._uploads: dict[str, _UploadState] = {}
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ control

    def inject(
        self,
        *,
        path: str | None = None,
        status: int = 500,
        body: bytes | dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        delay_s: float = 0.0,
        cut_after_events: int | None = None,
        cut_after_bytes: int | None = None,
        reset: bool = False,
        times: int = 1,
    ) -> None:
        """Make the next `times` requests to `path` (any path if None) misbehave.

        A fault with a non-2xx `status` or a `body` replaces the answer (an OpenAI-shaped
        error for that status when `body` is None). A 2xx fault without `body` keeps the
        normal answer and only shapes its delivery: `delay_s` stalls before the headers,
        `cut_after_events` (SSE) / `cut_after_bytes` (any body) send that much and then
        drop the connection, `reset` closes it with no response. `headers` are added to
        whatever is sent. Faults are consumed first-in first-out among those that match.
        """
        if not 100 <= status <= 599:
            raise ValueError(f"status must be an HTTP status, got {status}")
        if times < 1:
            raise ValueError("times must be at least 1")
        if delay_s < 0 or (cut_after_events or 0) < 0 or (cut_after_bytes or 0) < 0:
            raise ValueError("delay_s, cut_after_events and cut_after_bytes must not be negative")
        encoded = msgspec.json.encode(body) if isinstance(body, dict) else body
        self._faults.append(
            _Fault(path, status, encoded, dict(headers or {}), delay_s, cut_after_events, cut_after_bytes, reset, times)
        )

    def clear(self) -> None:
        """Drop pending faults and recorded calls."""
        self._faults.clear()
        self.calls.clear()

    def count(self, path: str | None = None) -> int:
        """How many requests arrived, optionally only those to `path` (e.g. "/v1/models")."""
        return sum(1 for call in self.calls if path is None or call.path == path)

    def _take_fault(self, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.path is None or fault.path == path:
                fault.times -= 1
                if fault.times == 0:
                    self._faults.remove(fault)
                return fault
        return None

    # ------------------------------------------------------------------ app and lifecycle

    def make_app(self) -> web.Application:
        """The aiohttp application; state (calls, faults) lives on this FakeUpstream."""
        app = web.Application(client_max_size=_MAX_BODY_BYTES)
        app.on_response_prepare.append(self._add_openai_headers)
        routes: list[tuple[str, str, _Endpoint]] = [
            ("POST", "/v1/images/generations", self._images_generations),
            ("POST", "/v1/images/edits", self._images_edits),
            ("POST", "/v1/images/variations", self._images_variations),
            ("POST", "/v1/chat/completions", self._chat_completions),
            ("POST", "/v1/responses", self._responses),
            ("POST", "/v1/embeddings", self._embeddings),
            ("GET", "/v1/models", self._list_models),
            ("GET", "/v1/models/{model}", self._retrieve_model),
            ("POST", "/v1/files", self._create_file),
            ("GET", "/v1/files", self._list_files),
            ("GET", "/v1/files/{file_id}", self._retrieve_file),
            ("DELETE", "/v1/files/{file_id}", self._delete_file),
            ("GET", "/v1/files/{file_id}/content", self._file_content),
            ("POST", "/v1/uploads", self._create_upload),
            ("POST", "/v1/uploads/{upload_id}/parts", self._add_upload_part),
            ("POST", "/v1/uploads/{upload_id}/complete", self._complete_upload),
            ("POST", "/v1/uploads/{upload_id}/cancel", self._cancel_upload),
            # Last: any other path or method under /v1 gets OpenAI's 404, recorded like the rest.
            ("*", "/v1{tail:.*}", self._unknown_route),
        ]
        for method, path, endpoint in routes:
            counted = (method, path) in _COUNTED_UPLOAD_ROUTES
            app.router.add_route(method, path, self._endpoint(endpoint, counted=counted))
        app.router.add_post("/__fake/faults", self._control_inject)
        app.router.add_delete("/__fake/faults", self._control_clear_faults)
        app.router.add_get("/__fake/calls", self._control_calls)
        app.router.add_delete("/__fake/calls", self._control_clear_calls)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 picks a free port); returns the base URL ending in /v1."""
        if self._runner is not None:
            raise RuntimeError("FakeUpstream is already started")
        # Header lines up to the gateway's own limit: what the gateway accepts it may pass on.
        runner = web.AppRunner(self.make_app(), shutdown_timeout=1.0, access_log=None, max_field_size=16384)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        self.base_url = f"http://{_url_host(host)}:{bound_port}/v1"
        return self.base_url

    async def stop(self) -> None:
        """Stop serving; open streams are given a second to finish."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ request pipeline

    def _endpoint(self, endpoint: _Endpoint, *, counted: bool = False) -> _Handler:
        """`endpoint` behind recording and faults; a `counted` body is read as it arrives."""

        async def handler(request: web.Request) -> web.StreamResponse:
            request[_STARTED_AT] = time.monotonic()
            try:
                body = await (self._read_counted(request) if counted else request.read())
            except ConnectionResetError:
                # The sender left mid-body (a gateway cutting an upload short): nobody to answer,
                # nothing to record, and no traceback in the fake's log.
                return web.Response(status=400)
            self.calls.append(
                RecordedCall(request.method, request.path, CIMultiDict(request.headers), body, time.monotonic())
            )
            fault = self._take_fault(request.path)
            if fault is None:
                return await self._send(request, await self._answer(request, body, endpoint), None)
            if fault.delay_s:
                await asyncio.sleep(fault.delay_s)
            if fault.reset:
                _reset_connection(request)
                return web.Response()  # aiohttp wants a response; writing it fails quietly
            if fault.replaces_response:
                reply = _fault_reply(fault)
            else:
                reply = await self._answer(request, body, endpoint)
            reply.headers.update(fault.headers)
            return await self._send(request, reply, fault)

        return handler

    async def _read_counted(self, request: web.Request) -> bytes:
        """The whole body, read chunk by chunk; `upload_bytes_received` grows with each chunk."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            self.upload_bytes_received += len(chunk)
            size += len(chunk)
            if size > _MAX_BODY_BYTES:  # what request.read() enforces through client_max_size
                raise web.HTTPRequestEntityTooLarge(max_size=_MAX_BODY_BYTES, actual_size=size)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _answer(self, request: web.Request, body: bytes, endpoint: _Endpoint) -> _Reply:
        try:
            self._authenticate(request)
            return await endpoint(request, body)
        except _ApiError as error:
            return _json_reply(error.body, error.status)

    def _authenticate(self, request: web.Request) -> None:
        if self.api_key is None:
            return
        presented = request.headers.getall("Authorization", [])
        expected = f"Bearer {self.api_key}".encode()
        if len(presented) != 1 or not hmac.compare_digest(presented[0].encode(), expected):
            raise _ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _send(self, request: web.Request, reply: _Reply, fault: _Fault | None) -> web.StreamResponse:
        headers = CIMultiDict({"Content-Type": reply.content_type})
        headers.update(reply.headers)
        cut_events = fault.cut_after_events if fault else None
        cut_bytes = fault.cut_after_bytes if fault else None
        if reply.events is None:
            if cut_bytes is None:
                return web.Response(status=reply.status, body=reply.body, headers=headers)
            return await self._send_cut_body(request, reply, headers, cut_bytes)
        return await self._send_events(request, reply, headers, cut_events, cut_bytes)

    async def _send_cut_body(
        self, request: web.Request, reply: _Reply, headers: CIMultiDict[str], cut_bytes: int
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=reply.status, headers=headers)
        response.content_length = len(reply.body)  # promise the whole body, then break it
        await response.prepare(request)
        await response.write(reply.body[:cut_bytes])
        await _drop_connection(request)
        return response

    async def _send_events(
        self,
        request: web.Request,
        reply: _Reply,
        headers: CIMultiDict[str],
        cut_events: int | None,
        cut_bytes: int | None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=reply.status, headers=headers)
        sent = 0
        try:
            await response.prepare(request)  # the client may have gone while the answer was made
            for index, event in enumerate(reply.events or []):
                if cut_events is not None and index >= cut_events:
                    break
                if cut_bytes is not None and sent + len(event) > cut_bytes:
                    await response.write(event[: cut_bytes - sent])
                    break
                if index:
                    # Yield between writes (one per event), so readers see the stream arrive piecewise.
                    await asyncio.sleep(self.stream_interval_s)
                await response.write(event)
                sent += len(event)
            if cut_events is None and cut_bytes is None:
                await response.write_eof()
                return response
        except ConnectionError:
            return response  # the client went away mid-stream; nothing more to send
        # A cut never sends the terminating chunk, even when every event went out.
        await _drop_connection(request)
        return response

    async def _add_openai_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        started = request.get(_STARTED_AT)
        elapsed_ms = 0 if started is None else round((time.monotonic() - started) * 1000)
        # setdefault: headers a fault asked for win over these defaults.
        headers.setdefault("x-request-id", f"req_{secrets.token_hex(16)}")
        headers.setdefault("openai-organization", self.organization)
        if self.project is not None:
            headers.setdefault("openai-project", self.project)
        headers.setdefault("openai-processing-ms", str(elapsed_ms))
        headers.setdefault("openai-version", "2020-10-01")
        headers.setdefault("x-ratelimit-limit-requests", "10000")
        headers.setdefault("x-ratelimit-remaining-requests", "9999")
        headers.setdefault("x-ratelimit-reset-requests", "6ms")

    # ------------------------------------------------------------------ images

    def _image_bytes(self, output_format: str, seed: str) -> bytes:
        if output_format == "jpeg":
            return jpeg_bytes(seed, c2pa=self.c2pa)
        if output_format == "webp":
            return webp_bytes(seed, px=self.image_px, c2pa=self.c2pa)
        return png_bytes(seed, px=self.image_px, c2pa=self.c2pa)

    async def _images_generations(self, request: web.Request, body: bytes) -> _Reply:
        params = _Params(_json_object(body))
        model = params.optional_text("model")
        if model is None:
            gpt_only = any(params.present(name) for name in _GPT_IMAGE_ONLY_FIELDS) or params.values.get("stream")
            model = _DEFAULT_GPT_IMAGE_MODEL if gpt_only else "dall-e-2"
        _check_image_model(model, ("dall-e-2", "dall-e-3"))
        if _is_gpt_image(model):
            prompt = params.required_text("prompt", _GPT_IMAGE_PROMPT_LIMIT)
            return self._gpt_image_reply(_gpt_image_job(params, model, prompt, "image_generation", 0))
        prompt = params.required_text("prompt", _DALLE_PROMPT_LIMITS[model])
        n, response_format = _dalle_options(params, model)
        revised = f"A detailed rendering of: {prompt}" if model == "dall-e-3" else None
        return self._dalle_reply(prompt, n, response_format, revised)

    async def _images_edits(self, request: web.Request, body: bytes) -> _Reply:
        if _is_multipart(request):
            fields, uploads = await _read_form(request.headers, body)
            params = _Params(fields, from_form=True)
            image_count = sum(1 for upload in uploads if upload.name in ("image", "image[]"))
            if image_count == 0:
                raise _ApiError(
                    400, "Missing required parameter: 'image'.", param="image", code="missing_required_parameter"
                )
        else:
            params = _Params(_json_object(body))
            image_count = _json_edit_image_count(params)
        model = params.text("model", _DEFAULT_GPT_IMAGE_MODEL)
        _check_image_model(model, ("dall-e-2",))
        if model == "dall-e-2":
            if not _is_multipart(request):
                raise _ApiError(400, "dall-e-2 edits require a multipart/form-data body.", param="model")
            if image_count != 1:
                raise _ApiError(400, "dall-e-2 edits take exactly one image.", param="image")
            prompt = params.required_text("prompt", _DALLE_PROMPT_LIMITS[model])
            n, response_format = _dalle_options(params, model)
            return self._dalle_reply(prompt, n, response_format, None)
        if image_count > 16:
            raise _ApiError(400, "Too many images: at most 16 are allowed.", param="image")
        prompt = params.required_text("prompt", _GPT_IMAGE_PROMPT_LIMIT)
        return self._gpt_image_reply(_gpt_image_job(params, model, prompt, "image_edit", image_count))

    async def _images_variations(self, request: web.Request, body: bytes) -> _Reply:
        if not _is_multipart(request):
            raise _ApiError(400, "Image variations require a multipart/form-data body.")
        fields, uploads = await _read_form(request.headers, body)
        images = [upload for upload in uploads if upload.name == "image"]
        if not images:
            raise _ApiError(
                400, "Missing required parameter: 'image'.", param="image", code="missing_required_parameter"
            )
        params = _Params(fields, from_form=True)
        params.text("model", "dall-e-2", ("dall-e-2",))
        n = params.integer("n", 1, 1, 10)
        params.text("size", "1024x1024", _DALLE_SIZES["dall-e-2"])
        response_format = params.text("response_format", "url", ("url", "b64_json"))
        return self._dalle_reply(hashlib.sha256(images[0].data).hexdigest(), n, response_format, None)

    def _dalle_reply(self, seed: str, n: int, response_format: str, revised_prompt: str | None) -> _Reply:
        items: list[_Json] = []
        for index in range(n):
            if response_format == "b64_json":
                item: _Json = {"b64_json": _b64(self._image_bytes("png", f"{seed}{index}"))}
            else:
                # Like OpenAI's, every URL is new; the host is unresolvable on purpose.
                item = {"url": f"https://fake-upstream.invalid/img/{secrets.token_hex(16)}.png"}
            if revised_prompt is not None:
                item["revised_prompt"] = revised_prompt
            items.append(item)
        return _json_reply({"created": int(time.time()), "data": items})

    def _gpt_image_reply(self, job: _ImageJob) -> _Reply:
        created = int(time.time())
        per_image = output_image_tokens(job.quality, job.size)
        text_in = _text_tokens(job.prompt)
        image_in = INPUT_IMAGE_TOKENS_PER_IMAGE * job.input_images
        resolved = {
            "size": job.size,
            "quality": job.quality,
            "background": job.background,
            "output_format": job.output_format,
        }
        images = [self._image_bytes(job.output_format, f"{job.prompt}{index}") for index in range(job.n)]
        if not job.stream:
            output = per_image * job.n
            usage = {
                "input_tokens": text_in + image_in,
                "input_tokens_details": {"text_tokens": text_in, "image_tokens": image_in},
                "output_tokens": output,
                "output_tokens_details": {"image_tokens": output, "text_tokens": 0},
                "total_tokens": text_in + image_in + output,
            }
            return _json_reply(
                {
                    "created": created,
                    "data": [{"b64_json": _b64(image)} for image in images],
                    "background": job.background,
                    "output_format": job.output_format,
                    "size": job.size,
                    "quality": job.quality,
                    "usage": usage,
                }
            )
        # n>1 streams are undocumented (contract 4.2): each image gets its partials and its own
        # completed event; input tokens are billed on the first, so the usages sum to the total.
        partial_type = f"{job.event_prefix}.partial_image"
        completed_type = f"{job.event_prefix}.completed"
        events: list[bytes] = []
        for index, image in enumerate(images):
            for partial_index in range(job.partial_images):
                partial = self._image_bytes(job.output_format, f"{job.prompt}{index}:partial{partial_index}")
                payload = {"type": partial_type, "b64_json": _b64(partial), "created_at": created, **resolved}
                events.append(_sse_event(partial_type, {**payload, "partial_image_index": partial_index}))
            input_tokens = text_in + image_in if index == 0 else 0
            output = per_image + PARTIAL_IMAGE_TOKENS * job.partial_images
            usage = {
                "total_tokens": input_tokens + output,
                "input_tokens": input_tokens,
                "output_tokens": output,
                "input_tokens_details": {
                    "text_tokens": text_in if index == 0 else 0,
                    "image_tokens": image_in if index == 0 else 0,
                },
            }
            payload = {"type": completed_type, "b64_json": _b64(image), "created_at": created, **resolved}
            events.append(_sse_event(completed_type, {**payload, "usage": usage}))
        return _sse_reply(events)

    # ------------------------------------------------------------------ text endpoints

    async def _chat_completions(self, request: web.Request, body: bytes) -> _Reply:
        params = _Params(_json_object(body))
        model = params.required_text("model")
        messages = params.values.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _ApiError(
                400, "Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter"
            )
        text = f"echo: {_last_user_text(messages)}"
        prompt_tokens = sum(_text_tokens(_content_text(m.get("content"))) for m in messages if isinstance(m, dict))
        usage = _chat_usage(prompt_tokens, _text_tokens(text))
        head = {"id": _new_id("chatcmpl-"), "created": int(time.time()), "model": model}
        if not params.flag("stream"):
            return _json_reply(_chat_completion(head, text, usage))
        stream_options = params.values.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        return _sse_reply(_chat_chunks(head, text, usage if include_usage else None))

    async def _responses(self, request: web.Request, body: bytes) -> _Reply:
        params = _Params(_json_object(body))
        model = params.required_text("model")
        given = params.values.get("input")
        if given is None:
            raise _ApiError(
                400, "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
            )
        prompt = _responses_input_text(given)
        response = _response_object(model, prompt, f"echo: {prompt}", params.values.get("instructions"))
        tool = _image_tool(params.values.get("tools"))
        if tool is None:
            return _json_reply(response) if not params.flag("stream") else _sse_reply(_response_events(response))
        # The image generation tool: one image, drawn from the prompt, before the message.
        output_format = tool.get("output_format", "png")
        call = _image_call(self._image_bytes(output_format, f"responses:{prompt}"))
        response["output"].insert(0, call)
        response["tools"] = [tool]
        if not params.flag("stream"):
            return _json_reply(response)
        count = tool.get("partial_images", 0)
        partials = [self._image_bytes(output_format, f"responses:{prompt}:partial{index}")
                    for index in range(count if isinstance(count, int) and 0 < count <= 3 else 0)]
        return _sse_reply(_response_events(response, _image_call_events(call, 0, partials, tool)))

    async def _embeddings(self, request: web.Request, body: bytes) -> _Reply:
        params = _Params(_json_object(body))
        model = params.required_text("model")
        if not params.present("input"):
            raise _ApiError(
                400, "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
            )
        inputs = _embedding_inputs(params.values["input"])
        dimensions = params.integer("dimensions", _EMBEDDING_DIMENSIONS, 1, 3072)
        encoding_format = params.text("encoding_format", "float", ("float", "base64"))
        data: list[_Json] = []
        for index, (text, _) in enumerate(inputs):
            vector = _embedding(model, text, dimensions)
            encoded: object = (
                _b64(struct.pack(f"<{dimensions}f", *vector)) if encoding_format == "base64" else list(vector)
            )
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(count for _, count in inputs)
        return _json_reply(
            {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        )

    async def _list_models(self, request: web.Request, body: bytes) -> _Reply:
        return _json_reply({"object": "list", "data": [_model_object(*model) for model in _MODELS]})

    async def _retrieve_model(self, request: web.Request, body: bytes) -> _Reply:
        model_id = request.match_info["model"]
        for model in _MODELS:
            if model[0] == model_id:
                return _json_reply(_model_object(*model))
        raise _ApiError(
            404,
            f"The model '{model_id}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )

    # ------------------------------------------------------------------ files and uploads

    def _stored_file(self, request: web.Request) -> _StoredFile:
        file_id = request.match_info["file_id"]
        stored = self._files.get(file_id)
        if stored is None:
            raise _ApiError(404, f"No such File object: {file_id}", param="id")
        return stored

    def _upload_state(self, request: web.Request) -> _UploadState:
        upload_id = request.match_info["upload_id"]
        upload = self._uploads.get(upload_id)
        if upload is None:
            raise _ApiError(404, f"No such Upload object: {upload_id}", param="id")
        return upload

    async def _create_file(self, request: web.Request, body: bytes) -> _Reply:
        if not _is_multipart(request):
            raise _ApiError(400, "File uploads require a multipart/form-data body.")
        fields, file_parts = await _read_form(request.headers, body, frozenset({"file"}))
        if not file_parts:
            raise _missing_parameter("file")
        part = file_parts[0]
        if part.filename is None:
            raise _ApiError(
                400, "Invalid type for 'file': expected a file, but got a string.", param="file", code="invalid_type"
            )
        params = _Params(fields, from_form=True)
        purpose = params.required_text("purpose")
        if purpose not in _FILE_PURPOSES:
            raise _invalid_value("purpose", purpose, _FILE_PURPOSES)
        if len(part.data) > _MAX_FILE_BYTES:
            raise _too_large("file", len(part.data), _MAX_FILE_BYTES, "File")
        stored = _StoredFile(_file_object(part.filename, purpose, len(part.data)), part.data)
        self._files[stored.meta["id"]] = stored
        return _json_reply(stored.meta)

    async def _list_files(self, request: web.Request, body: bytes) -> _Reply:
        query = _Params(request.query, from_form=True)
        purpose = query.optional_text("purpose")
        order = query.text("order", "desc", ("asc", "desc"))
        files = [stored.meta for stored in self._files.values() if purpose is None or stored.meta["purpose"] == purpose]
        if order == "desc":
            files.reverse()  # newest first: creation order, backwards
        first_id, last_id = (files[0]["id"], files[-1]["id"]) if files else (None, None)
        # Spec:ListFilesResponse: the SDK's CursorPage pages on has_more; every file fits on one page.
        return _json_reply(
            {"object": "list", "data": files, "first_id": first_id, "last_id": last_id, "has_more": False}
        )

    async def _retrieve_file(self, request: web.Request, body: bytes) -> _Reply:
        return _json_reply(self._stored_file(request).meta)

    async def _delete_file(self, request: web.Request, body: bytes) -> _Reply:
        file_id = self._stored_file(request).meta["id"]
        del self._files[file_id]
        return _json_reply({"id": file_id, "object": "file", "deleted": True})

    async def _file_content(self, request: web.Request, body: bytes) -> _Reply:
        return _Reply(body=self._stored_file(request).content, content_type="application/octet-stream")

    async def _create_upload(self, request: web.Request, body: bytes) -> _Reply:
        params = _Params(_json_object(body))
        filename = params.required_text("filename")
        purpose = params.required_text("purpose")
        if purpose not in _UPLOAD_PURPOSES:
            raise _invalid_value("purpose", purpose, _UPLOAD_PURPOSES)
        if not params.present("bytes"):
            raise _missing_parameter("bytes")
        declared = params.integer("bytes", 0, 0, _MAX_UPLOAD_BYTES)
        params.required_text("mime_type")
        created_at = int(time.time())
        meta: _Json = {
            "id": _new_id("upload_"),
            "object": "upload",
            "bytes": declared,
            "created_at": created_at,
            "filename": filename,
            "purpose": purpose,
            "status": "pending",
            "expires_at": created_at + _UPLOAD_LIFETIME_S,
            "file": None,
        }
        self._uploads[meta["id"]] = _UploadState(meta)
        return _json_reply(meta)

    async def _add_upload_part(self, request: web.Request, body: bytes) -> _Reply:
        upload = self._upload_state(request)
        if not _is_multipart(request):
            raise _ApiError(400, "Upload parts require a multipart/form-data body.")
        _, file_parts = await _read_form(request.headers, body, frozenset({"data"}))
        if not file_parts:
            raise _missing_parameter("data")
        _require_pending(upload, "add parts to")
        data = file_parts[0].data
        if len(data) > _MAX_PART_BYTES:
            raise _too_large("data", len(data), _MAX_PART_BYTES, "Part")
        part_id = _new_id("part_")
        upload.parts[part_id] = data
        return _json_reply(
            {"id": part_id, "object": "upload.part", "created_at": int(time.time()), "upload_id": upload.meta["id"]}
        )

    async def _complete_upload(self, request: web.Request, body: bytes) -> _Reply:
        upload = self._upload_state(request)
        params = _Params(_json_object(body))
        part_ids = params.values.get("part_ids")
        if part_ids is None:
            raise _missing_parameter("part_ids")
        if not isinstance(part_ids, list) or not all(isinstance(part_id, str) for part_id in part_ids):
            raise _ApiError(
                400, "Invalid type for 'part_ids': expected an array of strings.", param="part_ids", code="invalid_type"
            )
        md5 = params.optional_text("md5")
        _require_pending(upload, "complete")
        unknown = [part_id for part_id in part_ids if part_id not in upload.parts]
        if unknown:
            raise _ApiError(400, f"Invalid 'part_ids': '{unknown[0]}' is not a Part of this Upload.", param="part_ids")
        content = b"".join(upload.parts[part_id] for part_id in part_ids)
        declared = upload.meta["bytes"]
        if len(content) != declared:
            raise _ApiError(
                400,
                f"The Parts add up to {len(content)} bytes, but the Upload was created with bytes={declared}.",
                param="part_ids",
            )
        if md5 is not None and md5.lower() != hashlib.md5(content, usedforsecurity=False).hexdigest():
            raise _ApiError(400, "The md5 checksum of the uploaded bytes does not match 'md5'.", param="md5")
        stored = _StoredFile(_file_object(upload.meta["filename"], upload.meta["purpose"], len(content)), content)
        self._files[stored.meta["id"]] = stored
        upload.meta.update(status="completed", file=stored.meta)
        upload.parts.clear()
        return _json_reply(upload.meta)

    async def _cancel_upload(self, request: web.Request, body: bytes) -> _Reply:
        upload = self._upload_state(request)
        _require_pending(upload, "cancel")
        upload.meta["status"] = "cancelled"
        upload.parts.clear()
        return _json_reply(upload.meta)

    async def _unknown_route(self, request: web.Request, body: bytes) -> _Reply:
        raise _ApiError(404, f"Invalid URL ({request.method} {request.path})")

    # ------------------------------------------------------------------ HTTP control endpoints

    async def _control_inject(self, request: web.Request) -> web.Response:
        try:
            spec = msgspec.json.decode(await request.read(), type=_FaultSpec)
            body = spec.body.encode() if isinstance(spec.body, str) else spec.body
            self.inject(
                path=spec.path,
                status=spec.status,
                body=body,
                headers=spec.headers,
                delay_s=spec.delay_s,
                cut_after_events=spec.cut_after_events,
                cut_after_bytes=spec.cut_after_bytes,
                reset=spec.reset,
                times=spec.times,
            )
        except (msgspec.DecodeError, ValueError) as exc:  # msgspec.ValidationError is a DecodeError
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"pending": len(self._faults)}, status=201)

    async def _control_clear_faults(self, request: web.Request) -> web.Response:
        self._faults.clear()
        return web.json_response({"pending": 0})

    async def _control_calls(self, request: web.Request) -> web.Response:
        calls = [{"method": call.method, "path": call.path} for call in self.calls]
        return web.json_response({"count": len(calls), "calls": calls})

    async def _control_clear_calls(self, request: web.Request) -> web.Response:
        self.calls.clear()
        return web.json_response({"count": 0})


def serve(host: str = "127.0.0.1", port: int = 8090, api_key: str | None = None) -> None:
    """Run a FakeUpstream until interrupted, printing the base URL on one line first."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    # Bind before printing, so `port=0` prints the port actually chosen.
    sock = socket.create_server((host, port), family=family)
    bound_port = sock.getsockname()[1]
    print(f"fake upstream on http://{_url_host(host)}:{bound_port}/v1", flush=True)
    web.run_app(FakeUpstream(api_key=api_key).make_app(), sock=sock, print=None, shutdown_timeout=1.0)
