"""Finding, configuring and registering plugins, one plugin manager per gateway.

A plugin is a module. If it defines a class ``Plugin``, that class is instantiated as
``Plugin(config, settings)`` where ``settings`` is its own config section decoded into
``Plugin.Config`` (a msgspec Struct) and registered under ``Plugin.name``; otherwise the module
itself is registered (stateless hooks, as in datasette). Sources, in order: the built-ins named
in ``[plugins] builtins``, modules from the ``gatekeeper`` entry-point group, ``[plugins]
modules`` and ``[plugins] paths``. Names in ``[plugins] blocked`` (or ``$GATEKEEPER_BLOCKED``,
comma separated) are never registered, so a user's plugin can take a built-in's place.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pluggy

from gatekeeper import hookspecs
from gatekeeper.config import BUILTIN_PLUGINS, Config, ConfigError, decode_section
from gatekeeper.dispatch import Hooks

__all__ = ["LoadedPlugin", "build_hooks", "BUILTIN_MODULES"]

BUILTIN_MODULES = BUILTIN_PLUGINS
ENTRY_POINT_GROUP = "gatekeeper"


@dataclass
class LoadedPlugin:
    name: str
    source: str  # "builtin", "entry point <dist>", "module", "path <file>", "test"
    module: str
    instance: Any
    section: str | None = None
    settings: Any = None


@dataclass
class PluginSet:
    hooks: Hooks
    loaded: list[LoadedPlugin] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        """One line per plugin: what it is, where it came from, what its section says."""
        lines = []
        for plugin in self.loaded:
            describe = getattr(plugin.instance, "describe", None)
            summary = describe() if callable(describe) else ""
            lines.append(f"{plugin.name:<12} {plugin.source:<20} {summary}".rstrip())
        return lines


def _import_file(file: Path) -> ModuleType:
    name = f"gatekeeper_path_plugin_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"[plugins] paths: cannot load {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _modules_from_path(path: str) -> list[ModuleType]:
    """A plugin file, or every .py file in a plugin folder."""
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"[plugins] paths: {path} does not exist")
    files = sorted(file.glob("*.py")) if file.is_dir() else [file]
    return [_import_file(item) for item in files]


def instantiate(module: ModuleType | Any, config: Config, source: str, used_sections: set[str]) -> LoadedPlugin:
    """Turn a plugin module (or object) into a registered-ready `LoadedPlugin`."""
    plugin_class = getattr(module, "Plugin", None)
    module_name = getattr(module, "__name__", type(module).__name__)
    if isinstance(plugin_class, type):
        section = getattr(plugin_class, "config_section", None)
        settings_type = getattr(plugin_class, "Config", None)
        settings = None
        if section and settings_type is not None:
            settings = decode_section(config.sections.get(section), settings_type, section, config.path)
            used_sections.add(section)
        instance = plugin_class(config, settings)
        name = getattr(plugin_class, "name", None) or module_name.rsplit(".", 1)[-1]
        return LoadedPlugin(name, source, module_name, instance, section, settings)
    name = getattr(module, "name", None) if not isinstance(module, ModuleType) else None
    return LoadedPlugin(name or module_name.rsplit(".", 1)[-1], source, module_name, module)


def build_hooks(config: Config, extra: list[Any] | None = None) -> PluginSet:
    """Load every configured plugin into a fresh plugin manager."""
    pm = pluggy.PluginManager("gatekeeper")
    pm.add_hookspecs(hookspecs)
    blocked = list(config.plugins.blocked)
    blocked += [name.strip() for name in os.environ.get("GATEKEEPER_BLOCKED", "").split(",") if name.strip()]
    for name in blocked:
        pm.set_blocked(name)
    plugin_set = PluginSet(Hooks(pm), blocked=blocked)

    candidates: list[tuple[Any, str]] = []
    for name in config.plugins.builtins:
        if name not in BUILTIN_MODULES:
            raise ConfigError(f"{config.path}: [plugins] builtins names unknown plugin {name!r}; known: {', '.join(BUILTIN_MODULES)}")
        if name in blocked:
            continue
        candidates.append((importlib.import_module(BUILTIN_MODULES[name]), "builtin"))
    if config.plugins.entry_points:
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry_point.name in blocked:
                continue
            dist = entry_point.dist.name if entry_point.dist else "?"
            candidates.append((entry_point.load(), f"entry point {dist}"))
    for module_name in config.plugins.modules:
        try:
            candidates.append((importlib.import_module(module_name), "module"))
        except ImportError as error:
            raise ConfigError(f"{config.path}: [plugins] modules: cannot import {module_name!r}: {error}") from None
    for path in config.plugins.paths:
        for module in _modules_from_path(path):
            candidates.append((module, f"path {path}"))
    for item in extra or []:
        candidates.append((item, "test"))

    # pluggy calls the last registered impl first: register built-ins in reverse so they run in
    # the listed order, and so plugins added after them (entry points, modules, paths) run first.
    builtin_count = sum(1 for _, source in candidates if source == "builtin")
    candidates[:builtin_count] = reversed(candidates[:builtin_count])
    used_sections: set[str] = set()
    for module, source in candidates:
        plugin = instantiate(module, config, source, used_sections)
        if plugin.name in blocked:
            continue
        plugin_set.hooks.register(plugin.instance, name=plugin.name)
        plugin_set.loaded.append(plugin)
    plugin_set.loaded.sort(key=lambda p: (p.source != "builtin", config.plugins.builtins.index(p.name) if p.name in config.plugins.builtins else 0))

    # Sections of built-ins that are switched off are still validated, so a typo never hides.
    for name, module_name in BUILTIN_MODULES.items():
        if name in config.sections and name not in used_sections:
            plugin_class = getattr(importlib.import_module(module_name), "Plugin", None)
            settings_type = getattr(plugin_class, "Config", None)
            if settings_type is not None:
                decode_section(config.sections[name], settings_type, name, config.path)
                used_sections.add(name)
    unknown = sorted(set(config.sections) - used_sections)
    if unknown:
        raise ConfigError(f"{config.path}: unknown section [{unknown[0]}]: no loaded plugin declares it")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as error:
        raise ConfigError(f"plugin {error.plugin!r} implements an unknown hook: {error}") from None
    return plugin_set


def settings_to_dict(settings: Any) -> dict[str, Any]:
    return msgspec.to_builtins(settings) if settings is not None else {}
