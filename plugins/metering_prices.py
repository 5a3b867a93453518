"""Prices, and what a request costs in exact micro-dollars.

A price "per 1M tokens" in USD is, conveniently, a price per token in micro-dollars: $32 per
1M image output tokens is 32 µ$ per token. Costs are therefore summed exactly as `Decimal`
micro-dollars and rounded half-up to a whole micro-dollar ONCE per request (`round_micros`).
Image tokens are billed at image rates and text tokens at text rates; DALL·E models are
billed per image, by quality and size.

Model ids are matched exactly, or a dated snapshot (``gpt-image-1.5-2025-12-16``,
``gpt-4o-2024-08-06``) is matched to its base id by the longest prefix. Other suffixes
(``gpt-4o-audio-preview``) are NOT matched, so a different product is never silently billed
at a cousin's rates: it is recorded with a null cost instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache

import msgspec

__all__ = [
    "BUILTIN_PRICES",
    "ModelPrice",
    "PriceBook",
    "Tokens",
    "format_usd",
    "image_output_tokens",
    "micros_to_usd",
    "round_micros",
]

_ONE = Decimal(1)
_MICRO = Decimal("0.000001")
_SNAPSHOT_SUFFIX = re.compile(r"-\d{4}(-\d{2}-\d{2})?$")


class ModelPrice(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """USD per 1M tokens for each kind of token, and/or USD per image (DALL·E).

    In ``[metering.prices."MODEL"]`` every field is optional: fields you set replace the built-in
    table's, the others keep their built-in values. ``per_image`` maps quality to size to USD,
    e.g. ``per_image = { standard = { "1024x1024" = 0.04 } }``.
    """

    input: Decimal | None = None  # text input
    cached_input: Decimal | None = None  # text input served from OpenAI's prompt cache
    output: Decimal | None = None  # text output
    image_input: Decimal | None = None
    image_cached_input: Decimal | None = None
    image_output: Decimal | None = None
    per_image: dict[str, dict[str, Decimal]] | None = None

    def __post_init__(self) -> None:
        for name in ("input", "cached_input", "output", "image_input", "image_cached_input", "image_output"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative")
        for sizes in (self.per_image or {}).values():
            if any(price < 0 for price in sizes.values()):
                raise ValueError("per_image prices must not be negative")

    def merged_with(self, override: ModelPrice) -> ModelPrice:
        """This price with every field `override` sets replaced."""
        fields = msgspec.structs.asdict(self)
        fields.update({k: v for k, v in msgspec.structs.asdict(override).items() if v is not None})
        return ModelPrice(**fields)


def _tokens(input: str, cached: str, output: str | None, image_input: str | None = None,
            image_cached: str | None = None, image_output: str | None = None) -> ModelPrice:
    def d(value: str | None) -> Decimal | None:
        return None if value is None else Decimal(value)

    return ModelPrice(input=d(input), cached_input=d(cached), output=d(output), image_input=d(image_input),
                      image_cached_input=d(image_cached), image_output=d(image_output))


def _per_image(table: dict[str, dict[str, str]]) -> ModelPrice:
    return ModelPrice(per_image={quality: {size: Decimal(usd) for size, usd in sizes.items()}
                                 for quality, sizes in table.items()})


_GPT_IMAGE_1_5 = _tokens("5.00", "1.25", "10.00", "8.00", "2.00", "32.00")

BUILTIN_PRICES: dict[str, ModelPrice] = {
    # GPT image models, USD per 1M tokens: shared/openai-images-contract.md section 13.1
    # (official model pages, as transcribed there). gpt-image-1 and -1-mini publish no text
    # output price: their text output tokens, if any, are billed at the image output rate.
    "gpt-image-1.5": _GPT_IMAGE_1_5,
    "chatgpt-image-latest": _GPT_IMAGE_1_5,
    "gpt-image-1": _tokens("5.00", "1.25", None, "10.00", "2.50", "40.00"),
    "gpt-image-1-mini": _tokens("2.00", "0.20", None, "2.50", "0.25", "8.00"),
    # DALL·E, USD per image: contract section 13.4 (former openai.com/pricing table).
    "dall-e-3": _per_image({
        "standard": {"1024x1024": "0.040", "1024x1792": "0.080", "1792x1024": "0.080"},
        "hd": {"1024x1024": "0.080", "1024x1792": "0.120", "1792x1024": "0.120"},
    }),
    "dall-e-2": _per_image({"standard": {"1024x1024": "0.020", "512x512": "0.018", "256x256": "0.016"}}),
    # Text models, USD per 1M tokens (input, cached input, output): openai.com/api/pricing as
    # transcribed by third-party price tables in 2026 (e.g. CommitBrief's provider page for
    # gpt-4o/-mini, deploybase.ai's GPT-4.1 page); not in the contract. Verify before billing
    # and override in [metering.prices] where they differ (docs/metering.md says so too).
    "gpt-4o": _tokens("2.50", "1.25", "10.00"),
    "gpt-4o-mini": _tokens("0.15", "0.075", "0.60"),
    "gpt-4.1": _tokens("2.00", "0.50", "8.00"),
    "gpt-4.1-mini": _tokens("0.40", "0.10", "1.60"),
    "gpt-4.1-nano": _tokens("0.10", "0.025", "0.40"),
    "text-embedding-3-small": _tokens("0.02", "0.02", None),
    "text-embedding-3-large": _tokens("0.13", "0.13", None),
    "text-embedding-ada-002": _tokens("0.10", "0.10", None),
}

# Output image tokens per image, models before gpt-image-2: contract section 13.2.
_IMAGE_OUTPUT_TOKENS: dict[str, dict[str, int]] = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}
PARTIAL_IMAGE_OUTPUT_TOKENS = 100  # contract 4.3: each streamed partial image


def image_output_tokens(quality: str | None, size: str | None) -> int:
    """Output tokens one image is expected to take, for a pre-flight budget estimate.

    ``auto`` (or a missing or unknown value) is taken at its most expensive, so an estimate
    errs on the side of refusing; sizes off the table scale the 1024x1024 figure by area.
    """
    qualities = [quality] if quality in _IMAGE_OUTPUT_TOKENS else list(_IMAGE_OUTPUT_TOKENS)
    worst = 0
    for name in qualities:
        table = _IMAGE_OUTPUT_TOKENS[name]  # type: ignore[index]
        if size in table:
            worst = max(worst, table[size])  # type: ignore[index]
        elif size and re.fullmatch(r"\d+x\d+", size):
            width, _, height = size.partition("x")
            worst = max(worst, -(-table["1024x1024"] * int(width) * int(height) // (1024 * 1024)))
        else:
            worst = max(worst, *table.values())
    return worst


@dataclass(slots=True, frozen=True)
class Tokens:
    """One request's tokens, split by what each kind costs."""

    text_input: int = 0  # not served from the prompt cache
    text_cached: int = 0
    image_input: int = 0
    image_cached: int = 0
    text_output: int = 0
    image_output: int = 0

    @property
    def input_total(self) -> int:
        return self.text_input + self.text_cached + self.image_input + self.image_cached

    @property
    def output_total(self) -> int:
        return self.text_output + self.image_output


def round_micros(exact: Decimal) -> int:
    """The one rounding step: exact micro-dollars to a whole micro-dollar, half up."""
    return int(exact.quantize(_ONE, rounding=ROUND_HALF_UP))


@lru_cache(maxsize=1024)  # every hit of one cache entry costs and saves the same amounts
def micros_to_usd(micros: int) -> Decimal:
    """Integer micro-dollars as an exact USD Decimal with six places (8719 -> 0.008719)."""
    return Decimal(micros).scaleb(-6).quantize(_MICRO)


def format_usd(micros: int) -> str:
    """Integer micro-dollars as a USD string with exactly six decimals."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{fraction:06d}"


class PriceBook:
    """The built-in table with the config's overrides applied, and lookups by model id."""

    def __init__(self, overrides: dict[str, ModelPrice] | None = None) -> None:
        prices = dict(BUILTIN_PRICES)
        for model, override in (overrides or {}).items():
            prices[model] = prices[model].merged_with(override) if model in prices else override
        self.prices = prices
        self._by_length = sorted(prices, key=len, reverse=True)
        self._resolved: dict[str, str | None] = {}

    def resolve(self, model: str | None) -> str | None:
        """The table entry for `model`: itself, or the base id of a dated snapshot, or None."""
        if model is None:
            return None
        try:
            return self._resolved[model]
        except KeyError:
            pass
        found: str | None = model if model in self.prices else None
        if found is None:
            for base in self._by_length:
                if model.startswith(base + "-") and _SNAPSHOT_SUFFIX.fullmatch(model[len(base):]):
                    found = base
                    break
        if len(self._resolved) < 4096:  # client-chosen strings: keep the memo bounded
            self._resolved[model] = found
        return found

    def price(self, model: str | None) -> ModelPrice | None:
        base = self.resolve(model)
        return None if base is None else self.prices[base]

    def token_cost(self, model: str | None, tokens: Tokens) -> Decimal | None:
        """Exact micro-dollars for `tokens` on `model`, or None when some of them have no price."""
        price = self.price(model)
        if price is None:
            return None
        text_in, image_in = price.input, price.image_input
        parts: list[tuple[int, Decimal | None]] = [
            (tokens.text_input, text_in),
            (tokens.text_cached, price.cached_input if price.cached_input is not None else text_in),
            (tokens.image_input, image_in),
            (tokens.image_cached, price.image_cached_input if price.image_cached_input is not None else image_in),
            (tokens.text_output, price.output if price.output is not None else price.image_output),
            (tokens.image_output, price.image_output),
        ]
        total = Decimal(0)
        for count, per_token_micros in parts:
            if count:
                if per_token_micros is None:
                    return None
                total += count * per_token_micros
        return total

    def image_cost(self, model: str | None, quality: str | None, size: str | None, images: int) -> Decimal | None:
        """Exact micro-dollars for `images` per-image-priced images, or None without a price."""
        price = self.price(model)
        if price is None or not price.per_image:
            return None
        quality = quality if quality in price.per_image else ("standard" if quality in (None, "auto") else quality)
        sizes = price.per_image.get(quality or "standard")
        if sizes is None:
            return None
        usd = sizes.get(size or "1024x1024")
        if usd is None:
            return None
        return images * usd * 1_000_000

    def is_per_image(self, model: str | None) -> bool:
        price = self.price(model)
        return price is not None and bool(price.per_image)

