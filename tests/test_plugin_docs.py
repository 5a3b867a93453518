"""docs/plugins.md works as printed: the tutorial package builds, installs, loads and passes its tests,
and the other complete snippets (a first plugin, a replacement for auth, a test-kit test) do what
the page says.

Each snippet is taken from the page by the file name on its first line (``# sso_auth.py``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai
import pytest

from gatekeeper.config import ConfigError
from gatekeeper.testing.kit import CLIENT_KEY, UPSTREAM_KEY

ROOT = Path(__file__).resolve().parent.parent
PLUGINS_DOC = ROOT / "docs" / "plugins.md"
TUTORIAL = "gatekeeper-max-images"
GENERATE = {"model": "gpt-image-1-mini", "prompt": "a fox", "quality": "low"}


def doc_files() -> dict[str, str]:
    """Every fenced block whose first line names a file: {"sso_auth.py": "<the block>"}."""
    blocks = re.findall(r"^```(?:python|toml|ini)\n# ([\w./-]+\.(?:py|toml|cfg))\n(.*?)^```", PLUGINS_DOC.read_text(),
                        re.MULTILINE | re.DOTALL)
    return {name: f"# {name}\n{body}" for name, body in blocks}


def write_doc_files(target: Path, prefix: str = "") -> list[Path]:
    written = []
    for name, text in doc_files().items():
        if name.startswith(prefix):
            path = target / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(path)
    return written


def env_with(path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory) -> dict[str, Path]:
    """The tutorial package written from the page, built and installed into its own site dir."""
    work = tmp_path_factory.mktemp("tutorial")
    write_doc_files(work, TUTORIAL + "/")
    site = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(work / TUTORIAL)], check=True, capture_output=True)
    return {"package": work / TUTORIAL, "site": site}


def test_the_page_holds_every_tutorial_file():
    assert {f"{TUTORIAL}/pyproject.toml", f"{TUTORIAL}/gatekeeper_max_images.py",
            f"{TUTORIAL}/tests/test_max_images.py"} <= set(doc_files())


def test_the_tutorial_package_installs_with_its_entry_point(tutorial):
    entry_points = next(tutorial["site"].glob("gatekeeper_max_images-*.dist-info")) / "entry_points.txt"
    assert entry_points.read_text().split() == ["[gatekeeper]", "max_images", "=", "gatekeeper_max_images"]


def test_the_tutorial_tests_pass_as_printed(tutorial):
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                            cwd=tutorial["package"], env=env_with(tutorial["site"]), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout


def test_gatekeeper_plugins_lists_the_installed_tutorial_plugin_and_its_place(tutorial, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[upstream]\napi_key = "sk-x"\n{doc_files()["config.toml"].partition(chr(10))[2]}')
    result = subprocess.run([sys.executable, "-m", "gatekeeper", "plugins", "--config", str(config)],
                            env=env_with(tutorial["site"]), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s+max_images\s+entry point gatekeeper-max-images\s+gatekeeper_max_images$",
                     result.stdout, re.MULTILINE)
    assert re.search(r"^\s+check_request\s+max_images -> auth", result.stdout, re.MULTILINE)


async def test_an_installed_tutorial_plugin_refuses_through_its_entry_point(tutorial, gateway_kit, fake_upstream,
                                                                           monkeypatch):
    monkeypatch.syspath_prepend(str(tutorial["site"]))
    running = await gateway_kit.start({"max_images": {"limit": 1}})
    async with openai.AsyncOpenAI(base_url=running.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.images.generate(**GENERATE, n=2)
    assert refused.value.code == "too_many_images"
    assert fake_upstream.count() == 0


async def test_a_blocked_entry_point_plugin_is_not_loaded(tutorial, gateway_kit, fake_upstream, monkeypatch):
    monkeypatch.syspath_prepend(str(tutorial["site"]))
    running = await gateway_kit.start({"plugins": {"blocked": ["max_images"]}})
    assert "max_images" not in [plugin.name for plugin in running.gateway.plugins.loaded]
    async with openai.AsyncOpenAI(base_url=running.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        await client.images.generate(**GENERATE, n=2)
    assert fake_upstream.count("/v1/images/generations") == 1


async def test_the_first_plugin_loads_from_a_path_and_refuses_its_word(gateway_kit, fake_upstream, tmp_path):
    [path] = write_doc_files(tmp_path, "house_style.py")
    running = await gateway_kit.start({"plugins": {"paths": [str(path)]}})
    async with openai.AsyncOpenAI(base_url=running.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.images.generate(**{**GENERATE, "prompt": "an ACME anvil"})
    assert refused.value.code == "moderation_blocked"
    assert fake_upstream.count() == 0


async def sso_gateway(gateway_kit, tmp_path, **sso):
    [path] = write_doc_files(tmp_path, "sso_auth.py")
    return await gateway_kit.start({"plugins": {"blocked": ["auth"], "paths": [str(path)]}, "sso_auth": sso})


async def test_the_sso_auth_replacement_takes_the_blocked_auths_place(gateway_kit, fake_upstream, tmp_path):
    running = await sso_gateway(gateway_kit, tmp_path, admins=["ops@example.com"])
    loaded = [plugin.name for plugin in running.gateway.plugins.loaded]
    assert "sso_auth" in loaded and "auth" not in loaded
    headers = {"X-Forwarded-User": "ana@example.com", "X-Forwarded-Groups": "design, staff"}
    async with aiohttp.ClientSession() as session:
        async with session.post(running.base_url + "/images/generations", json=GENERATE, headers=headers) as response:
            assert response.status == 200
    assert fake_upstream.calls[-1].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_the_sso_auth_replacement_refuses_requests_without_the_proxys_identity(gateway_kit, tmp_path):
    running = await sso_gateway(gateway_kit, tmp_path)
    async with aiohttp.ClientSession() as session:
        bearer = {"Authorization": f"Bearer {CLIENT_KEY}"}  # auth's keys mean nothing once auth is blocked
        async with session.post(running.base_url + "/images/generations", json=GENERATE, headers=bearer) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "invalid_api_key"


async def test_the_sso_auth_replacement_trusts_the_headers_only_from_its_proxies(gateway_kit, tmp_path):
    running = await sso_gateway(gateway_kit, tmp_path, trusted_proxies=["10.0.0.0/8"])
    async with aiohttp.ClientSession() as session:
        headers = {"X-Forwarded-User": "mallory@example.com"}  # sent straight from 127.0.0.1
        async with session.post(running.base_url + "/images/generations", json=GENERATE, headers=headers) as response:
            assert response.status == 401


def test_the_test_kit_example_passes_as_printed(tmp_path):
    write_doc_files(tmp_path, "tests/")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "asyncio_mode=auto",
                             "-o", "asyncio_default_fixture_loop_scope=function", "tests"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


async def test_a_range_constraint_in_the_tutorial_struct_names_the_key(tutorial, gateway_kit, monkeypatch):
    monkeypatch.syspath_prepend(str(tutorial["site"]))
    with pytest.raises(ConfigError, match=r"\[max_images\.limit\] Expected `int` <= 10"):
        await gateway_kit.start({"max_images": {"limit": 11}})
