"""Prices: image tokens at image rates, text at text rates, exact micro-dollars, one rounding."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gatekeeper_plugins.metering_budgets import estimate_micros
from gatekeeper_plugins.metering_prices import (
    ModelPrice,
    PriceBook,
    Tokens,
    format_usd,
    image_output_tokens,
    micros_to_usd,
    round_micros,
)
from gatekeeper_plugins.metering_usage import RequestFacts

BOOK = PriceBook()


@pytest.mark.parametrize(("model", "base"), [
    ("gpt-image-1.5", "gpt-image-1.5"),
    ("gpt-image-1.5-2025-12-16", "gpt-image-1.5"),
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),  # the longest matching base, not gpt-4o
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("gpt-image-1-mini", "gpt-image-1-mini"),
    ("gpt-4o-audio-preview", None),  # another product, not a snapshot: never billed at gpt-4o rates
    ("gpt-image-2", None),
    ("dall-e-3", "dall-e-3"),
])
def test_a_model_id_resolves_to_itself_or_the_base_of_its_dated_snapshot(model, base):
    assert BOOK.resolve(model) == base


def test_image_tokens_are_billed_at_image_rates_and_text_tokens_at_text_rates():
    tokens = Tokens(text_input=100, image_input=50, text_output=10, image_output=272)
    # gpt-image-1.5: 100 x $5 + 50 x $8 + 10 x $10 + 272 x $32 per 1M tokens.
    assert BOOK.token_cost("gpt-image-1.5", tokens) == Decimal(500 + 400 + 100 + 8704)


def test_cached_input_is_billed_at_the_cached_rate_of_its_kind():
    assert BOOK.token_cost("gpt-image-1.5", Tokens(text_cached=1000, image_cached=1000)) == Decimal(1250 + 2000)
    assert BOOK.token_cost("gpt-4o-mini", Tokens(text_input=1000, text_cached=1000)) == Decimal("225.000")


def test_a_model_without_a_text_output_price_bills_text_output_at_its_image_output_rate():
    assert BOOK.token_cost("gpt-image-1", Tokens(text_output=10)) == Decimal(400)


def test_costs_stay_exact_below_a_micro_dollar():
    assert BOOK.token_cost("gpt-4o-mini", Tokens(text_input=3, text_output=4)) == Decimal("2.85")


def test_dall_e_is_priced_per_image_by_quality_and_size():
    assert BOOK.image_cost("dall-e-3", "hd", "1024x1792", 1) == Decimal("120000")
    assert BOOK.image_cost("dall-e-2", None, "256x256", 3) == Decimal("48000")
    assert BOOK.image_cost("dall-e-2", "auto", None, 1) == Decimal("20000")
    assert BOOK.image_cost("dall-e-3", "standard", "640x480", 1) is None


def test_an_unknown_model_has_no_cost():
    assert BOOK.token_cost("gpt-99", Tokens(text_input=5)) is None
    assert BOOK.image_cost("gpt-99", "low", "1024x1024", 1) is None


def test_an_override_replaces_only_the_fields_it_sets():
    book = PriceBook({"gpt-image-1.5": ModelPrice(image_output=Decimal("30"))})
    assert book.token_cost("gpt-image-1.5", Tokens(text_input=1, image_output=1)) == Decimal(5 + 30)


def test_an_override_can_price_a_new_model_per_image():
    book = PriceBook({"house-painter": ModelPrice(per_image={"standard": {"1024x1024": Decimal("0.5")}})})
    assert book.image_cost("house-painter", None, "1024x1024", 2) == Decimal("1000000.0")


def test_a_negative_price_is_refused():
    with pytest.raises(ValueError, match="image_output must not be negative"):
        ModelPrice(image_output=Decimal("-1"))


@pytest.mark.parametrize(("exact", "micros"), [("2.5", 3), ("2.4999", 2), ("22.5", 23), ("0.45", 0), ("3.5", 4)])
def test_rounding_is_half_up_to_a_whole_micro_dollar(exact, micros):
    assert round_micros(Decimal(exact)) == micros


def test_money_is_shown_with_exactly_six_decimals():
    assert (format_usd(0), format_usd(8734), format_usd(123_456_789)) == ("0.000000", "0.008734", "123.456789")
    assert str(micros_to_usd(8734)) == "0.008734"


@pytest.mark.parametrize(("quality", "size", "tokens"), [
    ("low", "1024x1024", 272), ("medium", "1024x1536", 1584), ("high", "1536x1024", 6208),
    ("auto", "1024x1024", 4160),  # auto is taken at its most expensive
    ("low", "auto", 408), (None, None, 6240), ("high", "2048x2048", 16640),  # off the table: scaled by area
])
def test_the_estimate_table_follows_contract_13_2(quality, size, tokens):
    assert image_output_tokens(quality, size) == tokens


def test_an_image_estimate_counts_every_image_partial_and_prompt_byte():
    facts = RequestFacts(model="gpt-image-1.5", n=2, quality="low", size="1024x1024", stream=True,
                         partial_images=3, prompt_bytes=21)
    # 2 x (272 + 3 x 100) image tokens x $32 + 21 prompt bytes as tokens x $5.
    assert estimate_micros("images/generations", facts, BOOK, 0) == 2 * 572 * 32 + 105


def test_a_dall_e_estimate_is_its_per_image_price():
    facts = RequestFacts(model="dall-e-3", quality="hd", size="1792x1024")
    assert estimate_micros("images/generations", facts, BOOK, 0) == 120_000


def test_a_text_request_is_estimated_at_the_configured_default():
    assert estimate_micros("chat/completions", RequestFacts(model="gpt-4o"), BOOK, 777) == 777
