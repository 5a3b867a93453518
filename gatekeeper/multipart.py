"""A small reader for `multipart/form-data` bodies that are already in memory.

The gateway reads each request body once (bounded by `max_body_bytes`) and forwards those
exact bytes. Plugins that need the form fields (the cache key of an edit, the audit's input
image hashes) read them from here; part contents are memoryviews into the body, not copies.
"""

from __future__ import annotations

from dataclasses import dataclass

from gatekeeper.errors import GatewayError

__all__ = ["FormPart", "parse_form", "form_field", "boundary_of", "part_head"]


@dataclass(slots=True)
class FormPart:
    name: str
    filename: str | None
    content_type: str | None
    data: memoryview

    @property
    def is_file(self) -> bool:
        return self.filename is not None

    def text(self) -> str:
        return bytes(self.data).decode("utf-8", "replace")


def boundary_of(content_type: str) -> bytes | None:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            return value.strip().strip('"').encode("latin-1")
    return None


def _header_params(value: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in value.split(";")[1:]:
        key, sep, val = item.strip().partition("=")
        if sep:
            val = val.strip()
            if len(val) >= 2 and val[0] == val[-1] == '"':
                val = val[1:-1].replace('\\"', '"')
            params[key.strip().lower()] = val
    return params


def part_head(head: bytes) -> tuple[str | None, str | None, str | None]:
    """The name, filename and Content-Type of a part, from its header lines."""
    name = filename = part_type = None
    for line in head.decode("utf-8", "replace").split("\r\n"):
        header, _, value = line.partition(":")
        header = header.strip().lower()
        if header == "content-disposition":
            params = _header_params(value)
            name, filename = params.get("name"), params.get("filename")
        elif header == "content-type":
            part_type = value.strip()
    return name, filename, part_type


def parse_form(content_type: str, body: bytes) -> list[FormPart]:
    """Every part of a multipart body, in order. Raises a 400 GatewayError when it is malformed."""
    boundary = boundary_of(content_type)
    if not boundary:
        raise GatewayError(400, "Invalid multipart/form-data request: no boundary in Content-Type.")
    delimiter = b"--" + boundary
    view = memoryview(body)
    parts: list[FormPart] = []
    position = body.find(delimiter)
    if position < 0:
        raise GatewayError(400, "Invalid multipart/form-data request: boundary not found in body.")
    while True:
        position += len(delimiter)
        if body.startswith(b"--", position):
            return parts  # the closing delimiter
        header_end = body.find(b"\r\n\r\n", position)
        next_delimiter = body.find(b"\r\n" + delimiter, position)
        if header_end < 0 or next_delimiter < 0 or header_end > next_delimiter:
            raise GatewayError(400, "Invalid multipart/form-data request: a part is truncated.")
        name, filename, part_type = part_head(body[position:header_end])
        if name is None:
            raise GatewayError(400, "Invalid multipart/form-data request: a part has no name.")
        parts.append(FormPart(name, filename, part_type, view[header_end + 4 : next_delimiter]))
        position = next_delimiter + 2


def form_field(content_type: str, body: bytes, name: str) -> str | None:
    """The text value of one non-file field, or None (also when the body is malformed)."""
    try:
        for part in parse_form(content_type, body):
            if part.name == name and not part.is_file:
                return part.text()
    except GatewayError:
        return None
    return None
