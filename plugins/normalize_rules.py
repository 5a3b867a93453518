"""What "the same request" means: cacheable routes, per-model defaults and typed values.

The tables follow the wire contract (shared/openai-images-contract.md sections 2, 5, 6 and 10).
A default is filled in only where the contract is unambiguous: filling a wrong default would
make two different requests share a cache entry, while leaving one out only costs a hit.
"""

from __future__ import annotations

import unicodedata
from typing import Any

__all__ = [
    "IMAGE_ROUTES",
    "ALWAYS_NORMALIZED",
    "OPTIONAL_ROUTES",
    "CACHEABLE_ROUTES",
    "DEFAULT_CACHE_ENDPOINTS",
    "DEFAULT_GPT_IMAGE_MODEL",
    "is_gpt_image",
    "normalize_prompt",
    "typed_top_level",
    "form_value",
    "resolve_model",
    "with_defaults",
]

IMAGE_ROUTES = frozenset({"images/generations", "images/edits", "images/variations"})
# Image and embedding requests are small JSON or multipart with hashed files: always normalized,
# so metering and audit can read their parameters whether or not the cache keeps them.
ALWAYS_NORMALIZED = IMAGE_ROUTES | {"embeddings"}
# Chat and responses bodies can be large; they are normalized only when `[cache] endpoints` lists them.
OPTIONAL_ROUTES = frozenset({"chat/completions", "responses"})
CACHEABLE_ROUTES = ALWAYS_NORMALIZED | OPTIONAL_ROUTES
DEFAULT_CACHE_ENDPOINTS = ("images/generations", "images/edits", "images/variations", "embeddings")

DEFAULT_GPT_IMAGE_MODEL = "gpt-image-1.5"  # the edits default in the pinned spec (contract 5.1)
# Without `model`, a generation is dall-e-2 unless one of these is present (contract 2).
_GPT_IMAGE_ONLY_FIELDS = ("output_format", "output_compression", "background", "moderation", "partial_images")

# Multipart text parts are strings; these become the JSON types the same field has in a JSON body.
_INT_FIELDS = frozenset({"n", "output_compression", "partial_images", "dimensions"})
_BOOL_FIELDS = frozenset({"stream"})

_GPT_IMAGE_DEFAULTS: dict[str, Any] = {
    "n": 1,
    "quality": "auto",
    "output_format": "png",
    "output_compression": 100,
    "background": "auto",
    "moderation": "auto",
    "stream": False,
}
_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("images/generations", "gpt-image"): {**_GPT_IMAGE_DEFAULTS, "size": "auto"},
    # Edits: the contract gives two different size defaults (5.1 vs 5.2), so size is left as sent.
    ("images/edits", "gpt-image"): _GPT_IMAGE_DEFAULTS,
    ("images/generations", "dall-e-2"): {
        "n": 1, "size": "1024x1024", "quality": "standard", "response_format": "url", "stream": False,
    },
    ("images/generations", "dall-e-3"): {
        "n": 1, "size": "1024x1024", "quality": "standard", "style": "vivid", "response_format": "url",
        "stream": False,
    },
    ("images/edits", "dall-e-2"): {"n": 1, "size": "1024x1024", "response_format": "url", "stream": False},
    ("images/variations", "dall-e-2"): {"n": 1, "size": "1024x1024", "response_format": "url"},
    ("images/generations", "other"): {"n": 1, "stream": False},
    ("images/edits", "other"): {"n": 1, "stream": False},
    ("images/variations", "other"): {"n": 1},
    # The SDK sends "base64" when the caller gives nothing; omitted on the wire means float (contract 10).
    ("embeddings", "other"): {"encoding_format": "float"},
    ("chat/completions", "other"): {"n": 1, "stream": False},
    ("responses", "other"): {"stream": False},
}


def is_gpt_image(model: object) -> bool:
    return isinstance(model, str) and model.startswith(("gpt-image-", "chatgpt-image"))


def _family(model: object) -> str:
    if is_gpt_image(model):
        return "gpt-image"
    if model in ("dall-e-2", "dall-e-3"):
        return str(model)
    return "other"


def normalize_prompt(prompt: str) -> str:
    """Unicode NFC, trimmed, every run of whitespace one space."""
    return " ".join(unicodedata.normalize("NFC", prompt).split())


def typed_top_level(body: dict[str, Any]) -> dict[str, Any]:
    """The body's fields compared as values: `null` is omitted and `1.0` is `1`.

    Only the top level is walked: that is where the numeric parameters live, and walking a
    large `messages` or token array would cost more than it could ever save.
    """
    typed: dict[str, Any] = {}
    for name, value in body.items():
        if value is None:
            continue
        if type(value) is float and value.is_integer():
            value = int(value)
        typed[name] = value
    return typed


def form_value(name: str, text: str) -> Any:
    """A multipart text field as the JSON value it stands for ("2" -> 2, "true" -> True)."""
    if name in _INT_FIELDS:
        stripped = text.strip()
        if stripped.lstrip("-").isdigit():
            return int(stripped)
    elif name in _BOOL_FIELDS and text in ("true", "false"):
        return text == "true"
    return text


def resolve_model(route: str, params: dict[str, Any]) -> Any:
    """The model a request really uses, with the route's default when `model` is absent."""
    model = params.get("model")
    if model is not None:
        return model
    if route == "images/generations":
        gpt_only = any(name in params for name in _GPT_IMAGE_ONLY_FIELDS) or params.get("stream") is True
        return DEFAULT_GPT_IMAGE_MODEL if gpt_only else "dall-e-2"
    if route == "images/edits":
        return DEFAULT_GPT_IMAGE_MODEL
    if route == "images/variations":
        return "dall-e-2"
    return None


def with_defaults(route: str, params: dict[str, Any]) -> dict[str, Any]:
    """`params` (typed, prompt normalized) with the model and the route's defaults made explicit."""
    model = resolve_model(route, params)
    defaults = _DEFAULTS.get((route, _family(model))) or _DEFAULTS.get((route, "other"), {})
    full = {**defaults, **params}
    if model is not None:
        full["model"] = model
    if is_gpt_image(model) and full.get("stream") is True:
        full.setdefault("partial_images", 0)  # only meaningful with stream=true (contract 2)
    return full
