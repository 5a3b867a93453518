"""What the audit log says about images: hashes of the returned files and C2PA detection.

The Images API returns each image as base64 of the encoded file (``data[].b64_json``, or the
``b64_json`` of a ``*.completed`` SSE event). Its identity is the SHA-256 of the decoded bytes,
which is also the SHA-256 of the file a client saves, so ``gatekeeper audit find-image`` can go
from a file back to the request that produced it. Partial images of a stream are previews, not
outputs, and are skipped. URL responses (DALL-E ``response_format=url``) carry no bytes and yield
no hash: the gateway never fetches them. The Responses API's ``image_generation`` tool returns its
image as the ``result`` of an ``image_generation_call`` output item (contract 4.4): in the response
object, or in a stream's ``response.output_item.done`` event.

C2PA detection only reads container structure, never changes a byte: a PNG ``caBX`` chunk, a
JPEG APP11 segment carrying JUMBF (``JP`` common identifier), a WebP ``C2PA`` RIFF chunk.
"""

from __future__ import annotations

import binascii
import hashlib
import struct

import msgspec
import pybase64

from gatekeeper.errors import MALFORMED_JSON
from gatekeeper.images_body import skim_images_body

__all__ = ["ImageFacts", "analyze_json_body", "analyze_sse_body", "analyze_images_body", "analyze_responses_body",
           "b64decode", "has_c2pa", "sha256_hex"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageFacts(msgspec.Struct):
    """One entry per returned image, in order."""

    sha256: list[str]
    c2pa: list[bool]


class _Item(msgspec.Struct):
    b64_json: msgspec.Raw = msgspec.Raw()  # the value's JSON text: a 2 MB image is not copied into a str


class _ImagesResponse(msgspec.Struct):
    data: list[_Item] | None = None


class _StreamEvent(msgspec.Struct):
    type: str = ""
    b64_json: str | None = None


class _OutputItem(msgspec.Struct):
    type: str = ""
    result: str | None = None


class _ResponseObject(msgspec.Struct):
    output: list[_OutputItem] | None = None


class _ResponseEvent(msgspec.Struct):
    type: str = ""
    item: _OutputItem | None = None


_decode_response = msgspec.json.Decoder(_ImagesResponse).decode
_decode_value = msgspec.json.Decoder(str | None).decode
_decode_event = msgspec.json.Decoder(_StreamEvent).decode
_decode_response_object = msgspec.json.Decoder(_ResponseObject).decode
_decode_response_event = msgspec.json.Decoder(_ResponseEvent).decode
_IMAGE_CALL = b'"image_generation_call"'


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _facts(images: list[bytes]) -> ImageFacts:
    return ImageFacts([sha256_hex(image) for image in images], [has_c2pa(image) for image in images])


def b64decode(text: str | bytes) -> bytes | None:
    """The bytes of base64 `text`, or None when it isn't base64. pybase64 decodes a 1.5 MB image in
    0.1 ms with the GIL released (binascii: 3 ms holding it); text it refuses (stray characters,
    missing padding) gets binascii's lenient reading, as before."""
    try:
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return binascii.a2b_base64(text)
    except (binascii.Error, ValueError):
        return None


def analyze_json_body(body: bytes) -> ImageFacts:
    """Facts about the ``data[].b64_json`` images of an ImagesResponse body."""
    if body.find(b'"b64_json"') < 0 and body.find(b"\\u") < 0:  # no image bytes (URL answers): nothing to decode
        return ImageFacts([], [])
    try:
        images = []
        for text in _b64_json_texts(body):
            decoded = _b64_json_image(text)
            if decoded is not None:
                images.append(decoded)
    except MALFORMED_JSON:  # not JSON (or not UTF-8), or a b64_json that isn't a string
        return ImageFacts([], [])
    return _facts(images)


def _b64_json_texts(body: bytes) -> list[memoryview | None]:
    """The JSON text of each ``data[].b64_json`` value, in order (None for an item without one).

    `skim_images_body` finds the base64 strings without the JSON decoder scanning megabytes with
    the GIL held (0.4 ms per 1.5 MB); a body it can't read for sure is decoded whole, as before."""
    skimmed = skim_images_body(body)
    if skimmed is not None:
        return skimmed.b64_json
    return [memoryview(item.b64_json) for item in _decode_response(body).data or ()]


def _b64_json_image(text: memoryview | None) -> bytes | None:
    """The image of one ``b64_json`` value (its JSON text), None for none, null, empty or not base64.
    Strict base64 between the quotes is decoded straight from the body's bytes (such a string has
    no escapes, so it reads the same); anything else is decoded as JSON first, then as before."""
    if text is None:
        return None
    if len(text) > 2 and text[0] == 0x22 and text[-1] == 0x22:
        try:
            return pybase64.b64decode(text[1:-1], validate=True)
        except (binascii.Error, ValueError):
            pass
    if not text:
        return None
    value = _decode_value(text)
    return b64decode(value) if value else None


def analyze_sse_body(body: bytes) -> ImageFacts:
    """Facts about the final images of an image stream (``*.completed`` events only)."""
    images = []
    for data in _sse_data(body):
        if b"completed" not in data:
            continue
        try:
            event = _decode_event(data)
        except MALFORMED_JSON:
            continue
        if event.type.endswith(".completed") and event.b64_json:
            decoded = b64decode(event.b64_json)
            if decoded is not None:
                images.append(decoded)
    return _facts(images)


def analyze_images_body(body: bytes, event_stream: bool) -> ImageFacts:
    return analyze_sse_body(body) if event_stream else analyze_json_body(body)


def analyze_responses_body(body: bytes, event_stream: bool) -> ImageFacts:
    """Facts about the images a Responses API answer's ``image_generation`` calls returned."""
    if body.find(_IMAGE_CALL) < 0:
        return ImageFacts([], [])
    results: list[str | None] = []
    try:
        if not event_stream:
            results = [item.result for item in _decode_response_object(body).output or ()
                       if item.type == "image_generation_call"]
        else:
            for data in _sse_data(body):
                if _IMAGE_CALL not in data or b"response.output_item.done" not in data:
                    continue
                event = _decode_response_event(data)
                item = event.item
                if event.type == "response.output_item.done" and item and item.type == "image_generation_call":
                    results.append(item.result)
    except MALFORMED_JSON:
        return ImageFacts([], [])
    images = [image for result in results if result and (image := b64decode(result)) is not None]
    return _facts(images)


def _sse_data(body: bytes) -> list[bytes]:
    """The data of each event of an SSE body (its ``data:`` lines joined)."""
    return [b"".join(line[5:].lstrip(b" ") for line in frame.split(b"\n") if line.startswith(b"data:"))
            for frame in body.replace(b"\r\n", b"\n").split(b"\n\n")]


# ------------------------------------------------------------------ C2PA


def has_c2pa(image: bytes) -> bool:
    """True when the file carries a C2PA manifest store where its format keeps one."""
    if image.startswith(PNG_SIGNATURE):
        return _png_has_c2pa(image)
    if image.startswith(b"\xff\xd8"):
        return _jpeg_has_c2pa(image)
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return _webp_has_c2pa(image)
    return False


def _png_has_c2pa(image: bytes) -> bool:
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(image):
        length, kind = struct.unpack_from(">I4s", image, position)
        if kind == b"caBX":
            return True
        if kind == b"IEND":
            return False
        position += 12 + length
    return False


def _jpeg_has_c2pa(image: bytes) -> bool:
    position = 2
    while position + 4 <= len(image):
        if image[position] != 0xFF:
            return False
        marker = image[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no metadata segments follow
            return False
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            position += 2
            continue
        (length,) = struct.unpack_from(">H", image, position + 2)
        if marker == 0xEB:  # APP11: JUMBF boxes behind the "JP" common identifier carry C2PA
            payload = image[position + 4 : position + 2 + length]
            if payload[:2] == b"JP" and b"c2pa" in payload:
                return True
        position += 2 + length
    return False


def _webp_has_c2pa(image: bytes) -> bool:
    position = 12
    while position + 8 <= len(image):
        kind = image[position : position + 4]
        (length,) = struct.unpack_from("<I", image, position + 4)
        if kind == b"C2PA":
            return True
        position += 8 + length + (length & 1)
    return False
