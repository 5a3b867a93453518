"""``gatekeeper serve --demo``: the whole pipeline on the built-in fake upstream.

Needs no OpenAI key and no network: the fake upstream runs in the same process on a free
loopback port, storage goes to ``./gatekeeper-demo/``, and a demo client key is printed with a
curl line and an openai-SDK snippet that work as printed.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path
from typing import Any

from gatekeeper.config import parse_config
from gatekeeper.logs import configure_logging

__all__ = ["DEMO_CLIENT_KEY", "demo_config", "run_demo"]

DEMO_CLIENT_KEY = "sk-gk-demo-key"
DEMO_ADMIN_KEY = "sk-gk-demo-admin"


def demo_config(upstream_url: str, upstream_key: str, host: str, port: int, workdir: Path) -> dict[str, Any]:
    return {
        "server": {"host": host, "port": port},
        # On loopback: never through a proxy the machine's environment names for the internet.
        "upstream": {"base_url": upstream_url, "api_key": upstream_key, "proxy": ""},
        "auth": {
            "admin_keys": [DEMO_ADMIN_KEY],
            "keys": [{"id": "demo-1", "key": DEMO_CLIENT_KEY, "tenant": "demo"}],
        },
        "cache": {"backend": "memory", "max_bytes": 268435456},
        "audit": {"path": str(workdir / "audit" / "gatekeeper-audit.jsonl"), "fsync": "always"},
        "metering": {"database": f"sqlite:///{workdir.resolve()}/usage.db"},
    }


def banner(url: str) -> str:
    return f"""
gatekeeper demo is running on {url} (fake OpenAI upstream, no key, no network)

Try it with curl:
  curl -s {url}/v1/images/generations -H "Authorization: Bearer {DEMO_CLIENT_KEY}" -H "Content-Type: application/json" -d '{{"model":"gpt-image-1.5","prompt":"a red fox in the snow","size":"1024x1024","quality":"low"}}' | head -c 300; echo

Or with the openai SDK (pip install openai):
  python -c 'from openai import OpenAI; c = OpenAI(base_url="{url}/v1", api_key="{DEMO_CLIENT_KEY}"); r = c.images.generate(model="gpt-image-1.5", prompt="a red fox in the snow"); print(r.usage)'

Admin key for /admin routes: {DEMO_ADMIN_KEY}. Press Ctrl+C to stop.
"""


async def _run(host: str, port: int) -> None:
    from gatekeeper.server import _serve
    from gatekeeper.testing.fake_upstream import FakeUpstream

    upstream_key = "sk-demo-upstream-" + secrets.token_hex(8)
    upstream = FakeUpstream(api_key=upstream_key)
    upstream_url = await upstream.start()
    workdir = Path(os.environ.get("GATEKEEPER_DEMO_DIR", "gatekeeper-demo"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = parse_config(demo_config(upstream_url, upstream_key, host, port, workdir), path="<demo>")
    try:
        await _serve(config, ready_message=banner(f"http://{host}:{port}"))
    finally:
        await upstream.stop()


def run_demo(host: str = "127.0.0.1", port: int = 8080) -> int:
    configure_logging("info", "auto")
    asyncio.run(_run(host, port))
    return 0
