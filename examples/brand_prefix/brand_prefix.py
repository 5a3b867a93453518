"""A per-tenant house style, put in front of every image prompt the tenant sends.

    [plugins]
    modules = ["examples.brand_prefix.brand_prefix"]

    [brand.prefixes]
    acme = "ACME house style: flat pastel colours, rounded shapes, no text in the image."

The prefix is applied in `normalize_request` with ``tryfirst=True``, ahead of the built-in
normalizer, so the cache key is built from the prompt the upstream really gets: a tenant never
receives an image cached under another house style, or under its own old one.
JSON bodies (generations, JSON edits) and multipart edits are both rewritten.
"""

from __future__ import annotations

import msgspec

from gatekeeper import hookimpl
from gatekeeper.config import Config as GatewayConfig
from gatekeeper.config import ConfigError
from gatekeeper.errors import GatewayError
from gatekeeper.flow import Flow
from gatekeeper.multipart import FormPart, boundary_of, parse_form

__all__ = ["BrandConfig", "Plugin", "prefix_form_prompt"]

IMAGE_PROMPT_ROUTES = frozenset({"images/generations", "images/edits"})


class BrandConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The ``[brand]`` section."""

    prefixes: dict[str, str] = {}  # tenant -> house-style text
    default: str | None = None  # for tenants not in `prefixes`; None leaves their prompts alone
    separator: str = "\n\n"  # between the house style and the client's prompt


class Plugin:
    name = "brand"
    config_section = "brand"
    Config = BrandConfig

    def __init__(self, config: GatewayConfig, settings: BrandConfig) -> None:
        for tenant, prefix in settings.prefixes.items():
            if not prefix.strip():
                raise ConfigError(f"{config.path}: [brand] prefixes.{tenant} is empty; "
                                  "remove the tenant to leave its prompts alone")
        if settings.default is not None and not settings.default.strip():
            raise ConfigError(f"{config.path}: [brand] default is empty; leave it out instead")
        self.settings = settings

    def describe(self) -> str:
        default = ", a default for the rest" if self.settings.default else ""
        return f"house-style prefixes for {len(self.settings.prefixes)} tenant(s){default}"

    def prefix_for(self, tenant: str) -> str | None:
        prefix = self.settings.prefixes.get(tenant, self.settings.default)
        return prefix + self.settings.separator if prefix is not None else None

    @hookimpl(tryfirst=True)
    def normalize_request(self, flow: Flow) -> None:
        if flow.principal is None or flow.method != "POST" or flow.route not in IMAGE_PROMPT_ROUTES:
            return
        prefix = self.prefix_for(flow.principal.tenant)
        if prefix is None:
            return
        if flow.content_type == "multipart/form-data":
            rewritten = prefix_form_prompt(flow.headers.get("content-type", ""), flow.body, prefix)
            if rewritten is not None:
                flow.body = rewritten
            return
        request = flow.json
        if isinstance(request, dict) and isinstance(request.get("prompt"), str):
            flow.replace_json({**request, "prompt": prefix + request["prompt"]})


def prefix_form_prompt(content_type: str, body: bytes, prefix: str) -> bytes | None:
    """The multipart body again, with `prefix` in front of its ``prompt`` field.

    None when there is no prompt or the body is malformed: the upstream then answers it as it is.
    Parts are re-encoded with the client's boundary; file contents are copied once, untouched.
    """
    boundary = boundary_of(content_type)
    try:
        parts = parse_form(content_type, body)
    except GatewayError:
        return None
    if boundary is None or not any(part.name == "prompt" and not part.is_file for part in parts):
        return None
    delimiter = b"--" + boundary + b"\r\n"
    pieces: list[bytes | memoryview] = []
    for part in parts:
        pieces += [delimiter, _part_head(part), b"\r\n"]
        if part.name == "prompt" and not part.is_file:
            pieces.append(prefix.encode() + bytes(part.data))
        else:
            pieces.append(part.data)
        pieces.append(b"\r\n")
    pieces.append(b"--" + boundary + b"--\r\n")
    return b"".join(pieces)


def _quote(value: str) -> str:
    # The WHATWG form encoding: quotes and line breaks in names are percent-escaped.
    return value.replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22")


def _part_head(part: FormPart) -> bytes:
    head = f'Content-Disposition: form-data; name="{_quote(part.name)}"'
    if part.filename is not None:
        head += f'; filename="{_quote(part.filename)}"'
    if part.content_type:
        head += f"\r\nContent-Type: {part.content_type}"
    return head.encode() + b"\r\n"
