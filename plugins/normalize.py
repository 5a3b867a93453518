"""The canonical form of a request: what the cache key is built from.

Two requests that mean the same thing get the same `flow.canonical` bytes: JSON key order,
whitespace in the prompt, Unicode composition, omitted defaults and `null` fields don't count,
values are compared as typed values (`1.0` is `1`, a multipart `"2"` is `2`, `"true"` is `true`).
Multipart bodies are keyed by their parsed parts: each file by the sha256 of its bytes, the
images in order (`image` and `image[]` alike), the mask apart; boundary, filenames and the order
of text fields don't count. The canonical form is JSON with sorted keys::

    {"body": {...parameters with defaults...}}                          JSON requests
    {"body": {...}, "files": {"image": ["<sha256>", ...], "mask": [...]}} multipart requests

so a JSON body can never spell a multipart request's form. The parameters are also left for
other plugins in ``flow.scratch["normalize"]`` (see `summary`). The upstream gets the client's
bytes unless ``[normalize] rewrite = true`` (JSON routes only, see `Plugin.rewritten_body`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable
from typing import Any, NamedTuple

import msgspec

from gatekeeper import hookimpl
from gatekeeper.config import Config
from gatekeeper.flow import Flow
from gatekeeper.multipart import parse_form
from gatekeeper_plugins.normalize_rules import (
    ALWAYS_NORMALIZED,
    IMAGE_ROUTES,
    OPTIONAL_ROUTES,
    form_value,
    normalize_prompt,
    typed_top_level,
    with_defaults,
)

__all__ = ["Plugin", "NormalizeConfig", "canonical_json_request", "canonical_form_request", "summary"]

_encode_sorted = msgspec.json.Encoder(order="sorted").encode
_IMAGE_FIELDS = ("image", "image[]")
_HASH_IN_THREAD_BYTES = 1 << 20  # above this, file hashing leaves the event loop (hashlib drops the GIL)
# Apps repeat requests byte for byte (that is what the cache is for), so the canonical form of a
# JSON body is memoised by its exact bytes: a repeat skips the decode, the rules and the encode.
_MEMO_MAX_BODY_BYTES = 16 * 1024
_MEMO_MAX_BYTES = 8 * 1024 * 1024


class NormalizeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    rewrite: bool = False  # forward the normalized JSON body instead of the client's bytes


def _given_params(route: str, body: dict[str, Any]) -> dict[str, Any]:
    params = typed_top_level(body)
    prompt = params.get("prompt")
    if route in IMAGE_ROUTES and isinstance(prompt, str):
        params["prompt"] = normalize_prompt(prompt)
    return params


def canonical_json_request(route: str, body: dict[str, Any]) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """(canonical bytes, parameters with defaults, parameters as given but normalized)."""
    given = _given_params(route, body)
    params = with_defaults(route, given)
    return _encode_sorted({"body": params}), params, given


def _sha256_all(blobs: list[memoryview]) -> list[str]:
    return [hashlib.sha256(blob).hexdigest() for blob in blobs]


async def canonical_form_request(
    route: str, content_type: str, body: bytes
) -> tuple[bytes, dict[str, Any], dict[str, list[str]], dict[str, Any]]:
    """(canonical bytes, parameters with defaults, file sha256s by field, text fields as sent) of a form."""
    fields: dict[str, Any] = {}
    file_names: list[str] = []
    blobs: list[memoryview] = []
    for part in parse_form(content_type, body):
        if part.is_file or part.name in _IMAGE_FIELDS or part.name == "mask":
            file_names.append("image" if part.name in _IMAGE_FIELDS else part.name)
            blobs.append(part.data)
            continue
        value = form_value(part.name, part.text())
        if part.name in fields:  # a repeated text field is a list, in the order sent
            previous = fields[part.name]
            fields[part.name] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            fields[part.name] = value
    if sum(len(blob) for blob in blobs) > _HASH_IN_THREAD_BYTES:
        digests = await asyncio.to_thread(_sha256_all, blobs)
    else:
        digests = _sha256_all(blobs)
    files: dict[str, list[str]] = {}
    for name, digest in zip(file_names, digests):
        files.setdefault(name, []).append(digest)
    given = _given_params(route, fields)
    params = with_defaults(route, given)
    return _encode_sorted({"body": params, "files": files}), params, files, given


def summary(route: str, params: dict[str, Any], files: dict[str, list[str]] | None, multipart: bool) -> dict[str, Any]:
    """What ``flow.scratch["normalize"]`` holds: the request's parameters, defaults included."""
    stream = params.get("stream")
    masks = (files or {}).get("mask") or []
    return {
        "route": route,
        "multipart": multipart,
        "params": params,
        "model": params.get("model"),
        "n": params.get("n"),
        "size": params.get("size"),
        "quality": params.get("quality"),
        "prompt": params.get("prompt"),
        "stream": stream if isinstance(stream, bool) else False,
        "partial_images": params.get("partial_images", 0),
        "input_images": list((files or {}).get("image", ())),
        "mask": masks[0] if masks else None,
    }


class _Canonical(NamedTuple):
    """What normalizing a JSON body yields, kept per distinct body."""

    canonical: bytes
    summary: dict[str, Any]
    rewritten: bytes | None  # the body forwarded under ``rewrite = true``
    sent_model: str | None  # the model as sent (`flow.model`), so nobody decodes the body for it


class _Memo:
    """Canonical forms of recent JSON bodies, by route and exact bytes; oldest out first, bounded in bytes."""

    def __init__(self, max_bytes: int = _MEMO_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        # An OrderedDict: popping a plain dict's oldest key scans the holes earlier pops left.
        self.entries: OrderedDict[tuple[str, bytes], _Canonical] = OrderedDict()

    def get(self, route: str, body: bytes) -> _Canonical | None:
        return self.entries.get((route, body))

    def put(self, route: str, body: bytes, value: _Canonical) -> None:
        cost = _memo_cost(body, value)
        entries = self.entries
        while entries and self.size + cost > self.max_bytes:
            (_, old_body), old = entries.popitem(last=False)
            self.size -= _memo_cost(old_body, old)
        entries[(route, body)] = value
        self.size += cost


def _memo_cost(body: bytes, value: _Canonical) -> int:
    """What one memo entry holds, roughly: the body (key and memo), the canonical form, the summary."""
    return 2 * len(body) + len(value.canonical) + 512


class Plugin:
    """Builds `flow.canonical` and ``flow.scratch["normalize"]`` for the cacheable routes.

    ``flow.scratch["normalize"]`` is a fresh dict per flow, but the values in it (``params``,
    ``input_images``) are shared between flows with identical bodies: read them, don't change them.
    """

    name = "normalize"
    config_section = "normalize"
    Config = NormalizeConfig

    def __init__(self, config: Config, settings: NormalizeConfig) -> None:
        self.rewrite = settings.rewrite
        # Chat and responses are normalized only when the cache keeps them (its `endpoints`).
        cache_section = config.sections.get("cache")
        endpoints = cache_section.get("endpoints") if isinstance(cache_section, dict) else None
        extra = OPTIONAL_ROUTES & set(endpoints if isinstance(endpoints, list) else ())
        self.routes = ALWAYS_NORMALIZED | extra
        self.memo = _Memo()

    def describe(self) -> str:
        return f"routes={','.join(sorted(self.routes))} rewrite={str(self.rewrite).lower()}"

    @hookimpl
    def normalize_request(self, flow: Flow) -> Awaitable[None] | None:
        """Set `flow.canonical` and ``flow.scratch["normalize"]`` on the cacheable POST routes."""
        # Not `async def`: only multipart bodies (hashed, maybe in a thread) need an await; the
        # dispatcher awaits the coroutine returned for them, JSON requests pay for no coroutine.
        if flow.method != "POST" or flow.route not in self.routes or not flow.body:
            return None
        content_type = flow.content_type
        if content_type == "multipart/form-data":
            return self._normalize_form(flow)
        raw = flow.body
        memoisable = len(raw) <= _MEMO_MAX_BODY_BYTES and content_type in ("application/json", "")
        memoised = self.memo.get(flow.route, raw) if memoisable else None
        if memoised is None:
            body = flow.json
            if not isinstance(body, dict):
                return  # not an object: nothing to key; the upstream will answer it
            canonical, params, given = canonical_json_request(flow.route, body)
            sent_model = body.get("model")
            memoised = _Canonical(canonical, summary(flow.route, params, None, False),
                                  self.rewritten_body(given) if self.rewrite else None,
                                  sent_model if isinstance(sent_model, str) else None)
            if memoisable:
                self.memo.put(flow.route, raw, memoised)
        flow.canonical = memoised.canonical
        scratch = flow.scratch
        scratch["normalize"] = dict(memoised.summary)
        if "model" not in scratch:
            scratch["model"] = memoised.sent_model
        if memoised.rewritten is not None:
            flow.body = memoised.rewritten
        return None

    async def _normalize_form(self, flow: Flow) -> None:
        content_type = flow.headers.get("content-type", "")
        canonical, params, files, given = await canonical_form_request(flow.route, content_type, flow.body)
        # `flow.model` (the model as sent, not defaulted) would parse the form again.
        sent_model = given.get("model")
        flow.scratch.setdefault("model", sent_model if isinstance(sent_model, str) else None)
        flow.canonical = canonical
        flow.scratch["normalize"] = summary(flow.route, params, files, True)

    @staticmethod
    def rewritten_body(given: dict[str, Any]) -> bytes:
        """The body forwarded when rewriting: normalized values, sorted keys, no defaults added.

        Defaults stay implicit because an explicit default can still be refused by a model that
        doesn't take the field (e.g. `partial_images` without streaming).
        """
        return _encode_sorted(given)
