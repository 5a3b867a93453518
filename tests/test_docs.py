"""Every hook is documented and has a test of its own (as datasette checks its hooks)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gatekeeper import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS = [name for name in hookspecs.__all__ if name not in ("hookspec", "hookimpl")]


def test_every_exported_hook_is_a_hookspec():
    for name in HOOKS:
        assert hasattr(getattr(hookspecs, name), "gatekeeper_spec"), name


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_are_documented(hook):
    reference = (ROOT / "docs" / "plugins.md").read_text()
    assert re.search(rf"^### {hook}\(", reference, re.MULTILINE), f"docs/plugins.md has no section for {hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_have_tests(hook):
    names = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        names.update(re.findall(r"def (test_hook_\w+)", path.read_text()))
    assert any(hook in name for name in names), f"no test named test_hook_..{hook}.. exists"


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_have_docstrings(hook):
    assert (getattr(hookspecs, hook).__doc__ or "").strip(), hook
