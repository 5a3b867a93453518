"""`[server] uvloop`: which event loop `gatekeeper serve` runs on.

"auto" (the default) runs on uvloop wherever it is installed, which it is as a dependency; false
keeps asyncio's own loop; true insists on uvloop and says so clearly when it is missing.
"""

from __future__ import annotations

import json
import sys

import openai
import pytest

from gateway_processes import GatewayProcess, free_port, serve_config
from gatekeeper.config import ConfigError, load_config
from gatekeeper.server import event_loop_name
from gatekeeper.testing.kit import CLIENT_KEY


def listening_line(log_text: str) -> dict:
    for line in log_text.splitlines():
        if line.startswith("{") and json.loads(line).get("event") == "listening":
            return json.loads(line)
    raise AssertionError(f"no 'listening' line in:\n{log_text}")


@pytest.mark.parametrize(("uvloop_line", "loop"), [("", "uvloop"), ('uvloop = "auto"', "uvloop"),
                                                    ("uvloop = true", "uvloop"), ("uvloop = false", "asyncio")])
async def test_serve_runs_on_the_loop_the_setting_names_and_answers_an_sdk_client(fake_upstream, tmp_path, uvloop_line, loop):
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(serve_config(fake_upstream.base_url, port, server=uvloop_line, sections=f'''
[auth]
keys = [{{ id = "loop-app", key = "{CLIENT_KEY}", tenant = "loops" }}]

[plugins]
blocked = ["metering", "audit"]
'''))
    process = GatewayProcess(config, port, tmp_path / "gatekeeper.log")
    await process.start()
    try:
        async with openai.AsyncOpenAI(base_url=process.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
            image = await client.images.generate(model="gpt-image-1", prompt="a fox on a fast loop", size="1024x1024")
        assert image.data[0].b64_json
        assert listening_line(process.log_text())["event_loop"] == loop
    finally:
        assert await process.stop() == 0


def test_auto_falls_back_to_asyncio_where_uvloop_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what `import uvloop` meets where it is not installed
    assert event_loop_name("auto") == "asyncio"
    assert event_loop_name(False) == "asyncio"


def test_true_where_uvloop_is_missing_is_a_config_error_that_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)
    with pytest.raises(ConfigError, match=r"uvloop package is not installed.*gatekeeper\[uvloop\]"):
        event_loop_name(True)


def test_a_setting_other_than_true_false_or_auto_is_refused(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[server]\nuvloop = "yes"\n')
    with pytest.raises(ConfigError, match="uvloop"):
        load_config(config)
