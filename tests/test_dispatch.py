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


async def test_flow_first_awaits_coroutines_and_returns_other_results_as_they_are():
    class Answer:  # an object that is not awaitable, returned again and again
        pass

    answer = Answer()
    calls: list[str] = []
    sync = plugin("sync", calls, answer, is_async=False)
    hooks = make_hooks(sync)
    assert await hooks.flow_first("cache_lookup", None) is answer
    assert await hooks.flow_first("cache_lookup", None) is answer
    hooks.unregister(sync)
    hooks.register(plugin("async", calls, answer))
    assert await hooks.flow_first("cache_lookup", None) is answer
    assert calls == ["sync", "sync", "async"]


def test_callers_pass_arguments_positionally_to_impls_that_take_them_in_any_order_or_fewer():
    seen = []

    class Reversed:
        @hookimpl
        def wrap_response_stream(self, chunks, flow):
            seen.append(("reversed", chunks, flow))

    class FlowOnly:
        @hookimpl
        def wrap_response_stream(self, flow):
            seen.append(("flow only", flow))

    hooks = make_hooks(Reversed(), FlowOnly())
    for call in hooks.callers("wrap_response_stream", ("flow", "chunks")):
        call("the flow", "the chunks")
    assert seen == [("flow only", "the flow"), ("reversed", "the chunks", "the flow")]


def test_a_flow_only_caller_refuses_an_impl_that_wants_more_than_the_flow():
    class Greedy:
        @hookimpl
        def exchange_error(self, flow, error):
            pass

    hooks = make_hooks(Greedy())
    with pytest.raises(TypeError, match="passes only"):
        hooks.flow_callers("exchange_error")
