"""The example plugins load the ways docs/plugins.md says (by module name, by file, by folder), and
`gatekeeper plugins` shows what loaded, where from, and the order each hook's impls run in."""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path

import openai
import pytest

from gatekeeper.cli import main
from gatekeeper.config import ConfigError
from gatekeeper.testing.fake_upstream import FakeUpstream
from gatekeeper.testing.kit import CLIENT_KEY

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MODULES = ["examples.brand_prefix.brand_prefix", "examples.prompt_policy.prompt_policy",
           "examples.tenant_router.tenant_router"]


@pytest.fixture
def importable_examples(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))


def loaded(running) -> dict[str, str]:
    return {plugin.name: plugin.source for plugin in running.gateway.plugins.loaded}


async def test_examples_load_by_module_name(gateway_kit, importable_examples):
    running = await gateway_kit.start({"plugins": {"modules": MODULES}})
    assert {name: loaded(running)[name] for name in ("brand", "prompt_policy", "tenant_router")} == {
        "brand": "module", "prompt_policy": "module", "tenant_router": "module"}


async def test_an_example_loads_from_its_file_path_with_its_config_section(gateway_kit, fake_upstream):
    path = EXAMPLES / "prompt_policy" / "prompt_policy.py"
    running = await gateway_kit.start({"plugins": {"paths": [str(path)]}, "prompt_policy": {"words": ["acme"]}})
    assert loaded(running)["prompt_policy"] == f"path {path}"
    async with openai.AsyncOpenAI(base_url=running.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError):
            await client.images.generate(model="gpt-image-1-mini", prompt="acme", quality="low")
    assert fake_upstream.count() == 0


async def test_a_folder_path_loads_every_plugin_file_in_it(gateway_kit, tmp_path):
    folder = tmp_path / "plugins.d"
    folder.mkdir()
    shutil.copy(EXAMPLES / "prompt_policy" / "prompt_policy.py", folder)
    shutil.copy(EXAMPLES / "tenant_router" / "tenant_router.py", folder)
    running = await gateway_kit.start({"plugins": {"paths": [str(folder)]}})
    assert {"prompt_policy", "tenant_router"} <= set(loaded(running))


async def test_an_examples_section_without_the_example_loaded_is_an_error(gateway_kit):
    with pytest.raises(ConfigError, match=r"unknown section \[prompt_policy\]"):
        await gateway_kit.start({"prompt_policy": {"words": ["acme"]}})


async def test_the_three_examples_work_together_in_one_gateway(gateway_kit, fake_upstream, importable_examples):
    async with FakeUpstream() as own:
        running = await gateway_kit.start({
            "plugins": {"modules": MODULES},
            "upstreams": {"own": {"base_url": own.base_url, "models": [], "priority": -1, "max_retries": 0}},
            "auth": {"keys": [{"id": "acme-app", "key": CLIENT_KEY, "tenant": "acme"}]},
            "brand": {"prefixes": {"acme": "ACME style."}, "separator": " "},
            "prompt_policy": {"words": ["globex"]},
            "tenant_router": {"tenants": {"acme": "own"}},
        })
        async with openai.AsyncOpenAI(base_url=running.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
            await client.images.generate(model="gpt-image-1-mini", prompt="a fox", quality="low")
            with pytest.raises(openai.BadRequestError):
                await client.images.generate(model="gpt-image-1-mini", prompt="a globex fox", quality="low")
        assert [call.json()["prompt"] for call in own.calls] == ["ACME style. a fox"]
    assert fake_upstream.count() == 0


# ---------------------------------------------------------------- gatekeeper plugins


def write_config(tmp_path: Path, plugins: str, sections: str = "") -> Path:
    config = tmp_path / "config.toml"
    config.write_text(textwrap.dedent('''
        [upstream]
        base_url = "http://127.0.0.1:9/v1"
        api_key = "sk-upstream-for-listing"
        [auth]
        keys = [{ id = "app", key = "sk-gk-listing-0001", tenant = "t" }]
    ''') + plugins + sections)
    return config


def run_plugins_command(config: Path, capsys) -> str:
    assert main(["plugins", "--config", str(config)]) == 0
    return capsys.readouterr().out


def test_gatekeeper_plugins_lists_each_plugin_with_where_it_came_from(tmp_path, capsys, importable_examples):
    policy_path = EXAMPLES / "prompt_policy" / "prompt_policy.py"
    config = write_config(tmp_path, f'[plugins]\nmodules = ["{MODULES[2]}"]\npaths = ["{policy_path}"]\n')
    listing = run_plugins_command(config, capsys)
    assert re.search(r"^\s+auth\s+builtin\s+gatekeeper_plugins\.auth$", listing, re.MULTILINE)
    assert re.search(rf"^\s+tenant_router\s+module\s+{re.escape(MODULES[2])}$", listing, re.MULTILINE)
    assert re.search(rf"^\s+prompt_policy\s+path {re.escape(str(policy_path))}\s", listing, re.MULTILINE)


def test_gatekeeper_plugins_shows_the_hook_call_order(tmp_path, capsys, importable_examples):
    config = write_config(tmp_path, f'[plugins]\nmodules = ["{MODULES[1]}", "{MODULES[2]}"]\n')
    listing = run_plugins_command(config, capsys)
    # Plugins loaded after the built-ins run before them, the last loaded first.
    assert re.search(r"^\s+check_request\s+tenant_router -> prompt_policy -> auth\b", listing, re.MULTILINE)
    assert re.search(r"^\s+authenticate\s+auth$", listing, re.MULTILINE)


def test_gatekeeper_plugins_puts_a_tryfirst_impl_ahead_of_the_built_ins(tmp_path, capsys, importable_examples):
    config = write_config(tmp_path, f'[plugins]\nmodules = ["{MODULES[0]}"]\n')
    listing = run_plugins_command(config, capsys)
    assert re.search(r"^\s+normalize_request\s+brand\b", listing, re.MULTILINE)


def test_gatekeeper_plugins_leaves_out_a_plugin_blocked_by_environment(tmp_path, capsys, importable_examples,
                                                                       monkeypatch):
    monkeypatch.setenv("GATEKEEPER_BLOCKED", "tenant_router")
    config = write_config(tmp_path, f'[plugins]\nmodules = ["{MODULES[1]}", "{MODULES[2]}"]\n')
    listing = run_plugins_command(config, capsys)
    assert "tenant_router" not in listing
    assert re.search(r"^\s+check_request\s+prompt_policy -> auth\b", listing, re.MULTILINE)


def test_check_config_describes_what_each_example_will_do(tmp_path, capsys, importable_examples):
    config = write_config(tmp_path, f'[plugins]\nmodules = {MODULES!r}\n'.replace("'", '"'),
                          '[brand.prefixes]\nacme = "ACME style."\n[prompt_policy]\nwords = ["x", "y"]\n')
    assert main(["check-config", "--config", str(config)]) == 0
    report = capsys.readouterr().out
    assert "house-style prefixes for 1 tenant(s)" in report
    assert "refuses image prompts matching 2 rule(s)" in report
    assert "routes no tenants" in report


async def test_a_misspelt_hook_is_an_error_at_start_up(gateway_kit, tmp_path):
    plugin = tmp_path / "typo.py"
    plugin.write_text("from gatekeeper import hookimpl\n\n@hookimpl\ndef check_requests(flow):\n    pass\n")
    with pytest.raises(ConfigError, match="check_requests"):
        await gateway_kit.start({"plugins": {"paths": [str(plugin)]}})
