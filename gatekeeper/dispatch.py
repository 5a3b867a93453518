"""Async-aware hook calls in pluggy's order.

Pluggy keeps registration, validation, blocking and ordering, but it has no asyncio support: a
``firstresult`` hook whose impls are ``async def`` would stop at the first coroutine object.
`Hooks` walks ``hook.get_hookimpls()`` in the order pluggy would call them and awaits every
result that is awaitable (datasette's ``await_me_maybe``). The order of each hook is computed
once and cached; registering or unregistering a plugin through `Hooks` refreshes it.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any

import pluggy

from gatekeeper.memo import BoundedMemo

__all__ = ["Hooks"]

_Impl = tuple[Callable[..., Any], tuple[str, ...]]
_FLOW = ("flow",)
_Coroutine = types.CoroutineType


def _awaitable(result: Any) -> bool:
    # Coroutines are by far the common case; inspect.isawaitable is the slow general check (an
    # ABC isinstance), so its answer is remembered per type: a stage returns the same few types
    # (Principal, GatewayResponse) on every request. Generators are asked one by one, since only
    # some of them are awaitable (@types.coroutine).
    cls = result.__class__
    if cls is _Coroutine:
        return True
    if result is None:
        return False
    known = _awaitable_types.get(cls)
    if known is None:
        known = inspect.isawaitable(result)
        if cls is not types.GeneratorType:
            _awaitable_types.remember(cls, known)
    return known


_awaitable_types: BoundedMemo[type, bool] = BoundedMemo(256)


def _positional_caller(name: str, function: Callable[..., Any], argnames: tuple[str, ...],
                       passed: tuple[str, ...]) -> Callable[..., Any]:
    """`function` as a callable taking the `passed` arguments positionally, in that order."""
    if argnames == passed:
        return function
    unknown = [arg for arg in argnames if arg not in passed]
    if unknown:
        raise TypeError(f"hook {name} passes only {passed}, not {unknown} ({function.__qualname__})")
    # pluggy lets an impl take fewer arguments than the spec, in any order
    picks = tuple(passed.index(arg) for arg in argnames)
    return lambda *args: function(*[args[i] for i in picks])


class Hooks:
    """Calls the hooks of one plugin manager (one per gateway app, never module-global)."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._order: dict[str, list[_Impl]] = {}
        self._callers: dict[tuple[str, tuple[str, ...]], tuple[Callable[..., Any], ...]] = {}
        self._flow_callers: dict[str, tuple[Callable[[Any], Any], ...]] = {}  # by name alone: one lookup per stage

    def register(self, plugin: object, name: str | None = None) -> str | None:
        registered = self.pm.register(plugin, name=name)
        self._order.clear()
        self._callers.clear()
        self._flow_callers.clear()
        return registered

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        removed = self.pm.unregister(plugin=plugin, name=name)
        self._order.clear()
        self._callers.clear()
        self._flow_callers.clear()
        return removed

    def impls(self, name: str) -> list[_Impl]:
        """The impls of hook `name` in call order, as (function, argument names)."""
        order = self._order.get(name)
        if order is None:
            caller = getattr(self.pm.hook, name)
            order = []
            # pluggy calls the list from the end: tryfirst impls sit last, trylast ones first.
            for impl in reversed(caller.get_hookimpls()):
                if impl.hookwrapper or impl.wrapper:
                    raise TypeError(f"plugin {impl.plugin_name!r}: hook wrappers are not supported for {name}")
                order.append((impl.function, tuple(impl.argnames)))
            self._order[name] = order
        return order

    def callers(self, name: str, passed: tuple[str, ...]) -> tuple[Callable[..., Any], ...]:
        """The impls of hook `name`, in call order, each callable with the `passed` arguments
        positionally (``call(flow, chunks)``).

        The pipeline's stages call these once per request each: a direct call, with no keyword
        mapping per impl.
        """
        callers = self._callers.get((name, passed))
        if callers is None:
            callers = tuple(_positional_caller(name, function, argnames, passed)
                            for function, argnames in self.impls(name))
            self._callers[(name, passed)] = callers
        return callers

    def flow_callers(self, name: str) -> tuple[Callable[[Any], Any], ...]:
        """`callers` of a hook whose only argument is ``flow``: each is ``call(flow)``."""
        callers = self._flow_callers.get(name)
        if callers is None:
            callers = self._flow_callers[name] = self.callers(name, _FLOW)
        return callers

    async def flow_first(self, name: str, flow: Any) -> Any:
        """`call_first` for a hook that takes only ``flow``."""
        for call in self.flow_callers(name):
            result = call(flow)
            if _awaitable(result):
                result = await result
            if result is not None:
                return result
        return None

    async def flow_all(self, name: str, flow: Any) -> None:
        """`call_all` for a hook that takes only ``flow``, when the results don't matter."""
        for call in self.flow_callers(name):
            result = call(flow)
            if _awaitable(result):
                await result

    async def flow_each(self, name: str, flow: Any, passes: type[BaseException],
                        failed: Callable[[Any, Callable[..., Any]], None]) -> None:
        """`flow_all` where one impl's failure does not keep the next from running: an exception
        of type `passes` propagates (and ends the call); any other goes to ``failed(flow, impl)``,
        called inside its ``except`` block (so it may log the traceback), and the next impl runs."""
        for index, call in enumerate(self.flow_callers(name)):
            try:
                result = call(flow)
                if _awaitable(result):
                    await result
            except passes:
                raise
            except Exception:
                failed(flow, self.impls(name)[index][0])

    def has_impls(self, name: str) -> bool:
        return bool(self.impls(name))

    async def call_first(self, name: str, **kwargs: Any) -> Any:
        """Await impls in order and return the first non-None result."""
        for function, argnames in self.impls(name):
            result = function(*[kwargs[arg] for arg in argnames])
            if _awaitable(result):
                result = await result
            if result is not None:
                return result
        return None

    async def call_all(self, name: str, **kwargs: Any) -> list[Any]:
        """Await every impl in order; return their non-None results."""
        results = []
        for function, argnames in self.impls(name):
            result = function(*[kwargs[arg] for arg in argnames])
            if _awaitable(result):
                result = await result
            if result is not None:
                results.append(result)
        return results

    def call_sync(self, name: str, **kwargs: Any) -> list[Any]:
        """Call every impl of a synchronous hook (routes, commands); return non-None results."""
        results = []
        for function, argnames in self.impls(name):
            result = function(*[kwargs[arg] for arg in argnames])
            if inspect.isawaitable(result):
                raise TypeError(f"hook {name} must not be async ({function.__qualname__})")
            if result is not None:
                results.append(result)
        return results
