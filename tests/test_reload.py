"""SIGHUP re-reads the config: plugins take their live settings; `[server]` waits for a restart, and says so."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp

from gateway_processes import GatewayProcess, free_port, serve_config
from gatekeeper.testing.kit import CLIENT_KEY

RESTART_WARNING = "[server] settings take effect on restart only"
SECTIONS = f'''
[auth]
keys = [{{ id = "app", key = "{CLIENT_KEY}", tenant = "t" }}]

[plugins]
blocked = ["metering", "audit"]
'''


async def test_a_changed_server_setting_is_named_on_reload_and_the_running_one_stays(fake_upstream, tmp_path):
    port = free_port()
    config = tmp_path / "gatekeeper.toml"
    config.write_text(serve_config(fake_upstream.base_url, port, server="max_body_bytes = 100000", sections=SECTIONS))
    served = GatewayProcess(config, port, tmp_path / "gatekeeper.log")
    await served.start()
    try:
        changed = "max_body_bytes = 1000\nmax_concurrency = 7"
        config.write_text(serve_config(fake_upstream.base_url, port, server=changed, sections=SECTIONS))
        served.process.send_signal(signal.SIGHUP)
        warning = None
        for _ in range(100):
            lines = [json.loads(line) for line in served.log_text().splitlines() if line.startswith("{")]
            warning = next((line for line in lines if line["event"] == RESTART_WARNING), None)
            if warning is not None:
                break
            await asyncio.sleep(0.05)
        assert warning is not None and warning["level"] == "warning"
        assert warning["keys"] == ["max_body_bytes", "max_concurrency"]
        async with aiohttp.ClientSession() as session:
            async with session.post(served.base_url + "/images/generations",
                                    headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                                    json={"model": "gpt-image-1.5", "prompt": "x" * 5000}) as response:
                assert response.status == 200  # still the limit it started with
    finally:
        await served.stop()
