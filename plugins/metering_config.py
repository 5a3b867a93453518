"""The ``[metering]`` config section."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Literal

import msgspec

from gatekeeper.config import Config, ConfigError, decode_section
from gatekeeper_plugins.metering_budgets import Budget
from gatekeeper_plugins.metering_prices import ModelPrice
from gatekeeper_plugins.metering_retention import MIN_RETENTION_DAYS
from gatekeeper_plugins.metering_store import IDENTIFIER, UsageStore, store_for_url

__all__ = ["MeteringConfig", "load_settings", "store_from_settings"]


class MeteringConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    database: str = "sqlite:///usage.db"  # relative paths are relative to the config file
    table: str = "gatekeeper_usage"
    schema: str | None = None  # PostgreSQL only
    pool_size: int = 4  # PostgreSQL connections per gateway process
    batch_rows: int = 1000
    flush_interval_ms: int = 250
    max_queue_rows: int = 100_000
    cache_hit_cost_fraction: Decimal = Decimal(0)
    chat_stream_without_usage: Literal["unmetered", "refuse"] = "unmetered"
    default_estimate_usd: Decimal = Decimal(0)
    budget_refresh_s: float = 10.0
    retention_days: int = 0  # rows older than this are deleted (0: keep every row); at least 32
    budgets: dict[str, Budget] = msgspec.field(default_factory=dict)
    key_budgets: dict[str, Budget] = msgspec.field(default_factory=dict)
    prices: dict[str, ModelPrice] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.database.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("database must start with sqlite:/// or postgresql://")
        if not IDENTIFIER.fullmatch(self.table):
            raise ValueError("table must be a plain SQL identifier (letters, digits, _)")
        if self.schema is not None and not IDENTIFIER.fullmatch(self.schema):
            raise ValueError("schema must be a plain SQL identifier (letters, digits, _)")
        if not 0 <= self.cache_hit_cost_fraction <= 1:
            raise ValueError("cache_hit_cost_fraction must be between 0 and 1")
        if self.default_estimate_usd < 0:
            raise ValueError("default_estimate_usd must not be negative")
        if min(self.batch_rows, self.flush_interval_ms, self.max_queue_rows, self.pool_size) < 1:
            raise ValueError("batch_rows, flush_interval_ms, max_queue_rows and pool_size must be at least 1")
        if self.budget_refresh_s <= 0:
            raise ValueError("budget_refresh_s must be positive")
        if self.retention_days and self.retention_days < MIN_RETENTION_DAYS:
            raise ValueError(f"retention_days must be 0 (keep every row) or at least {MIN_RETENTION_DAYS}: "
                             "budgets sum the rows of the current month")


def load_settings(config: Config) -> MeteringConfig:
    """The ``[metering]`` section of `config`, validated (for CLI commands)."""
    return decode_section(config.sections.get("metering"), MeteringConfig, "metering", config.path)


def config_dir(config: Config) -> Path | None:
    return None if config.path.startswith("<") else Path(config.path).resolve().parent


def store_from_settings(config: Config, settings: MeteringConfig) -> UsageStore:
    try:
        return store_for_url(settings.database, settings.table, settings.schema, settings.pool_size,
                             config_dir(config))
    except ValueError as error:
        raise ConfigError(f"{config.path}: [metering.database] {error}") from None
