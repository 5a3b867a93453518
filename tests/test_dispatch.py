"""Hook dispatch: pluggy's order, async impls awaited, first-result semantics kept."""

from __future__ import annotations

import pluggy
import pytest

from gatekeeper import hookimpl, hookspecs
from gatekeeper.dispatch import Hooks


def make_hooks(*plugins) -> Hooks:
    pm = pluggy.PluginManager("gatekeeper")
    pm.add_hookspecs(hookspecs)
    hooks = Hooks(pm)
    for plugin in plugins:
        hooks.register(plugin)
    return hooks


class Recorder:
    def __init__(self, name, calls, result=None):
        self.name, self.calls, self.result = name, calls, result


def plugin(name, calls, result=None, *, tryfirst=False, trylast=False, is_async=True):
    class P(Recorder):
        if is_async:
            @hookimpl(tryfirst=tryfirst, trylast=trylast)
            async def cache_lookup(self, flow):
                self.calls.append(self.name)
                return self.result
        else:
            @hookimpl(tryfirst=tryfirst, trylast=trylast)
            def cache_lookup(self, flow):
                self.calls.append(self.name)
                return self.result
    return P(name, calls, result)


async def test_async_firstresult_returns_the_first_awaited_non_none_result():
    calls: list[str] = []
    hooks = make_hooks(plugin("late", calls, "late-answer"), plugin("early", calls, None))
    assert await hooks.call_first("cache_lookup", flow=None) == "late-answer"
    assert calls == ["early", "late"]  # last registered is called first; None lets the next one answer


async def test_tryfirst_and_trylast_order_is_pluggys():
    calls: list[str] = []
    hooks = make_hooks(plugin("last", calls, trylast=True), plugin("first", calls, tryfirst=True), plugin("plain", calls))
    await hooks.call_all("cache_lookup", flow=None)
    assert calls == ["first", "plain", "last"]


async def test_sync_and_async_impls_mix():
    calls: list[str] = []
    hooks = make_hooks(plugin("async", calls, "a"), plugin("sync", calls, "s", is_async=False))
    assert await hooks.call_all("cache_lookup", flow=None) == ["s", "a"]


async def test_an_impl_may_take_fewer_arguments_than_its_spec():
    seen = []

    class NoArgs:
        @hookimpl
        def exchange_error(self, error):
            seen.append(error)

    hooks = make_hooks(NoArgs())
    await hooks.call_all("exchange_error", flow=object(), error="boom")
    assert seen == ["boom"]


async def test_unregistering_refreshes_the_cached_order():
    calls: list[str] = []
    answering = plugin("answering", calls, "x")
    hooks = make_hooks(answering)
    assert await hooks.call_first("cache_lookup", flow=None) == "x"
    hooks.unregister(answering)
    assert await hooks.call_first("cache_lookup", flow=None) is None


def test_hook_wrappers_are_refused():
    class Wrapper:
        @hookimpl(wrapper=True)
        def cache_lookup(self, flow):
            return (yield)

    hooks = make_hooks(Wrapper())
    with pytest.raises(TypeError, match="wrappers are not supported"):
        hooks.impls("cache_lookup")
