"""The `[metering]` section: validated with errors that name the key and file, and live on SIGHUP."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import aiohttp
import openai
import pytest

from gatekeeper.config import ConfigError, load_config, parse_config
from gatekeeper.plugins import build_hooks
from gatekeeper.testing.kit import UPSTREAM_KEY
from metering_support import DESIGN_KEY, gateway_config, usage_db  # noqa: F401

PROMPT = "a red fox in the snow"


def load(tmp_path: Path, metering: str) -> None:
    config_file = tmp_path / "gk.toml"
    config_file.write_text(f'[upstream]\napi_key = "{UPSTREAM_KEY}"\n[metering]\n{metering}\n')
    build_hooks(load_config(config_file))


@pytest.mark.parametrize(("setting", "message"), [
    ('database = "mysql://db/usage"', "[metering] database must start with sqlite:/// or postgresql://"),
    ('table = "usage; DROP TABLE x"', "[metering] table must be a plain SQL identifier"),
    ("cache_hit_cost_fraction = 1.5", "[metering] cache_hit_cost_fraction must be between 0 and 1"),
    ('chat_stream_without_usage = "strip"', "[metering.chat_stream_without_usage]"),
    ("budgets.design = { monthly = 100 }", "unknown field `monthly`"),
    ('prices."gpt-image-1.5" = { image_outptu = 32 }', "unknown field `image_outptu`"),
])
def test_a_bad_setting_is_refused_naming_the_key_and_file(tmp_path, setting, message):
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, setting)
    assert message in str(refused.value)
    assert str(tmp_path / "gk.toml") in str(refused.value)


def test_the_commented_example_in_config_toml_is_valid_once_uncommented(tmp_path):
    shipped = (Path(__file__).resolve().parents[2] / "config.toml").read_text()
    section = shipped[shipped.index("\n[metering]\n"):]
    section = section[: section.find("\n[", 1) if "\n[" in section[1:] else None]
    uncommented = re.sub(r'(?m)^# (?=[a-z_][\w."-]* = )', "", section)
    (tmp_path / "gk.toml").write_text(f'[upstream]\napi_key = "{UPSTREAM_KEY}"\n' + uncommented)
    plugin = build_hooks(load_config(tmp_path / "gk.toml")).hooks.pm.get_plugin("metering")
    assert plugin.settings.budgets["design"].monthly_usd == 100
    assert plugin.settings.key_budgets["design-1"].monthly_usd == 20
    assert plugin.prices.price("dall-e-3").per_image["standard"]["1024x1792"] == Decimal("0.08")
    assert plugin.store.path == str(tmp_path / "usage.db")  # relative to the config file


async def test_a_reloaded_config_takes_new_budgets_without_a_restart(usage_db, gateway_kit):
    gateway = await gateway_kit.start(gateway_config(usage_db, budgets={"design": {"monthly_usd": 0.001}}))
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as client:
        with pytest.raises(openai.RateLimitError):
            await client.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024")
        raised = parse_config(gateway_kit.config_dict(gateway_config(usage_db, budgets={"design": {"monthly_usd": 5}})))
        await gateway.gateway.hooks.call_all("reload_config", gateway=gateway.gateway, config=raised)
        await client.images.generate(model="gpt-image-1.5", prompt=PROMPT, quality="low", size="1024x1024")


async def test_chat_streams_without_usage_can_be_refused_before_forwarding(usage_db, gateway_kit, fake_upstream):
    gateway = await gateway_kit.start(gateway_config(usage_db, chat_stream_without_usage="refuse"))
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DESIGN_KEY, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                 messages=[{"role": "user", "content": "hi"}])
        stream = await client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                      stream_options={"include_usage": True},
                                                      messages=[{"role": "user", "content": "hi"}])
        [chunk async for chunk in stream]
    assert refused.value.code == "stream_usage_required"
    assert fake_upstream.count("/v1/chat/completions") == 1


async def test_ready_reports_the_metering_backlog(usage_db, gateway_kit):
    gateway = await gateway_kit.start(gateway_config(usage_db))
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/ready") as response:
            report = (await response.json())["plugins"]["metering"]
    assert report["ready"] is True
    assert report["database"] == ("sqlite" if usage_db["database"].startswith("sqlite") else "postgresql")
    assert (report["queued_rows"], report["dropped_rows"], report["last_error"]) == (0, 0, None)
