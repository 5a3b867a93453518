"""The usage table stays bounded: `[metering] retention_days` and `gatekeeper prune-usage`.

Old rows go, a chunk per transaction; this month's rows, which budgets sum, never do.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from gatekeeper.cli import main
from gatekeeper.config import ConfigError, load_config
from gatekeeper.plugins import build_hooks
from gatekeeper_plugins.metering_retention import month_start, parse_before
from gatekeeper_plugins.metering_store import store_for_url
from metering_support import gateway_config, seed_usage, usage_db, usage_rows  # noqa: F401

DAY = 86400.0


async def seed_days_ago(storage: dict, *days: float) -> None:
    for age in days:
        await seed_usage(storage, tenant="design", key_id="key-design", cost_micros=1000,
                         when=time.time() - age * DAY, model=f"age-{age:g}")


async def test_delete_before_removes_exactly_the_older_rows_in_chunks(usage_db):
    await seed_days_ago(usage_db, 400, 200, 100, 61, 59, 1, 0)
    store = store_for_url(usage_db["database"], usage_db["table"])
    await store.open(create=False)
    try:
        deleted = await store.delete_before(datetime.now(UTC) - timedelta(days=60), chunk_rows=2)
    finally:
        await store.close()
    assert deleted == 4
    assert [row["model"] for row in await usage_rows(usage_db)] == ["age-59", "age-1", "age-0"]


async def test_a_gateway_with_retention_days_prunes_old_rows_when_it_starts(usage_db, gateway_kit):
    await seed_days_ago(usage_db, 90, 50, 30, 2)
    await gateway_kit.start(gateway_config(usage_db, retention_days=45))
    for _ in range(250):
        models = [row["model"] for row in await usage_rows(usage_db)]
        if len(models) == 2:
            break
        await asyncio.sleep(0.02)
    assert models == ["age-30", "age-2"]


def test_check_config_says_how_long_rows_are_kept(tmp_path, capsys):
    config_file = tmp_path / "gk.toml"
    config_file.write_text('[upstream]\napi_key = "sk-x"\n[metering]\nretention_days = 400\n')
    assert main(["check-config", "--config", str(config_file)]) == 0
    assert "rows kept 400 days" in capsys.readouterr().out


async def test_without_retention_days_every_row_is_kept(usage_db, gateway_kit):
    await seed_days_ago(usage_db, 900, 1)
    await gateway_kit.start(gateway_config(usage_db))
    await asyncio.sleep(0.2)
    assert len(await usage_rows(usage_db)) == 2


@pytest.mark.parametrize("days", [1, 31, -1])
def test_retention_days_must_leave_this_month_whole(days, tmp_path):
    config_file = tmp_path / "gk.toml"
    config_file.write_text(f'[upstream]\napi_key = "sk-x"\n[metering]\nretention_days = {days}\n')
    with pytest.raises(ConfigError, match=r"\[metering\] retention_days must be 0 \(keep every row\) or at least 32"):
        build_hooks(load_config(config_file))


async def test_prune_usage_counts_with_dry_run_then_deletes(usage_db, tmp_path, capsys):
    await seed_days_ago(usage_db, 500, 400, 10)
    config = tmp_path / "config.toml"
    config.write_text(f'[upstream]\napi_key = "sk-x"\n[metering]\ndatabase = "{usage_db["database"]}"\n'
                      f'table = "{usage_db["table"]}"\n')
    cutoff = (datetime.now(UTC) - timedelta(days=300)).strftime("%Y-%m-%d")

    dry = await asyncio.to_thread(main, ["prune-usage", "--before", cutoff, "--dry-run", "--config", str(config)])
    assert dry == 0 and f"would delete 2 usage row(s) from before {cutoff}" in capsys.readouterr().out
    assert len(await usage_rows(usage_db)) == 3

    done = await asyncio.to_thread(main, ["prune-usage", "--before", cutoff, "--config", str(config)])
    assert done == 0 and f"deleted 2 usage row(s) from before {cutoff}" in capsys.readouterr().out
    assert [row["model"] for row in await usage_rows(usage_db)] == ["age-10"]


def test_prune_usage_refuses_a_date_inside_this_month():
    now = datetime(2026, 11, 27, 18, 0, tzinfo=UTC)
    assert parse_before("2026-11-01", now) == month_start(now) == datetime(2026, 11, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="budgets count"):
        parse_before("2026-11-02", now)
    with pytest.raises(ValueError, match="not a date"):
        parse_before("last week", now)


def test_prune_usage_exits_2_on_a_bad_date(tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text('[upstream]\napi_key = "sk-x"\n')
    assert main(["prune-usage", "--before", "2999-01-01", "--config", str(config)]) == 2
    assert "budgets count" in capsys.readouterr().err
