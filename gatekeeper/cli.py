"""The ``gatekeeper`` command line.

Core commands live here (serve, check-config, plugins, fake-upstream); plugins add their own
(keys, usage, audit ...) through the `register_commands` hook.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Sequence

import pluggy

from gatekeeper import __version__, hookspecs
from gatekeeper.config import ConfigError, load_config
from gatekeeper.dispatch import Hooks
from gatekeeper.errors import ListenError, StartupError
from gatekeeper.logs import configure_logging, get_logger, redact_text

__all__ = ["main", "build_parser"]


def _command_hooks() -> Hooks:
    """Plugin modules (not instances) for `register_commands`: built-ins and entry points."""
    from gatekeeper.plugins import BUILTIN_MODULES, ENTRY_POINT_GROUP

    pm = pluggy.PluginManager("gatekeeper")
    pm.add_hookspecs(hookspecs)
    hooks = Hooks(pm)
    for name, module_name in BUILTIN_MODULES.items():
        hooks.register(importlib.import_module(module_name), name=f"{name}-commands")
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            hooks.register(entry_point.load(), name=f"{entry_point.name}-commands")
        except Exception as error:  # a broken third-party plugin must not break the CLI
            print(f"warning: plugin {entry_point.name!r} failed to load: {error}", file=sys.stderr)
    return hooks


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config file (default: $GATEKEEPER_CONFIG, then ./config.toml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatekeeper", description="A fast OpenAI-compatible gateway.")
    parser.add_argument("--version", action="version", version=f"gatekeeper {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    add_config_argument(serve)
    serve.add_argument("--host", help="listen address (overrides [server] host)")
    serve.add_argument("--port", type=int, help="listen port (overrides [server] port)")
    serve.add_argument("--demo", action="store_true",
                       help="run on the built-in fake OpenAI upstream with a demo client key (no key, no network)")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file and say what each plugin will do")
    add_config_argument(check)
    check.set_defaults(func=cmd_check_config)

    plugins = sub.add_parser("plugins", help="list loaded plugins, where each came from, and the hook call order")
    add_config_argument(plugins)
    plugins.set_defaults(func=cmd_plugins)

    fake = sub.add_parser("fake-upstream", help="run the built-in fake OpenAI upstream (for tests and demos)")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8090)
    fake.add_argument("--api-key", help="require this upstream key (default: accept any)")
    fake.set_defaults(func=cmd_fake_upstream)

    _command_hooks().call_sync("register_commands", subparsers=sub)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    if args.demo:
        from gatekeeper.demo import run_demo

        return run_demo(host=args.host or "127.0.0.1", port=args.port or 8080)
    config = load_config(args.config)
    if args.host:
        config.server.host = args.host
    if args.port is not None:
        config.server.port = args.port
    configure_logging(config.server.log_level, config.server.log_format)
    from gatekeeper.plugins import build_hooks
    from gatekeeper.server import serve

    build_hooks(config)  # fail fast, before binding, on a bad plugin section
    serve(config)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from gatekeeper.plugins import build_hooks
    from gatekeeper.server import tls_context

    config = load_config(args.config)
    plugin_set = build_hooks(config)
    print(f"{config.path}: OK")
    server = config.server
    tls = tls_context(server, config.path)  # the pair loads, or a ConfigError names it
    scheme = "https" if tls else "http"
    where = f"unix:{server.unix_socket}" if server.unix_socket else f"{scheme}://{server.host}:{server.port}"
    print(f"server       listens on {where}, max body {server.max_body_bytes} bytes, max concurrency {server.max_concurrency}")
    if server.upload_paths:
        paths = ", ".join(server.upload_paths)
        print(f"uploads      stream upstream unread, up to {server.max_upload_bytes} bytes: POST {paths}")
    for name, upstream in config.all_upstreams().items():
        key = "key set" if upstream.api_key else "NO KEY"
        print(f"upstream     {name}: {upstream.base_url} ({key}; models {', '.join(upstream.models)})")
    for line in plugin_set.describe():
        print(f"plugin       {line}")
    if plugin_set.blocked:
        print(f"blocked      {', '.join(plugin_set.blocked)}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from gatekeeper.plugins import build_hooks

    config = load_config(args.config)
    plugin_set = build_hooks(config)
    print("Loaded plugins:")
    for plugin in plugin_set.loaded:
        print(f"  {plugin.name:<12} {plugin.source:<24} {plugin.module}")
    print("\nHook call order:")
    pm = plugin_set.hooks.pm
    for name in hookspecs.__all__:
        if name in ("hookspec", "hookimpl"):
            continue
        impls = [impl.plugin_name for impl in reversed(getattr(pm.hook, name).get_hookimpls())]
        print(f"  {name:<22} {' -> '.join(impls) if impls else '(none)'}")
    return 0


def cmd_fake_upstream(args: argparse.Namespace) -> int:
    from gatekeeper.testing.fake_upstream import serve

    serve(args.host, args.port, api_key=args.api_key)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as error:
        print(redact_text(f"config error: {error}"), file=sys.stderr)  # a value in the wrong place may be a key
        return 2
    except StartupError as error:  # through the log: its redaction keeps database passwords out
        cause = f"{type(error.error).__name__}: {error.error}"
        get_logger("gatekeeper").error("gateway could not start", plugin=error.plugin, error=cause)
        return 1
    except ListenError as error:
        get_logger("gatekeeper").error("gateway could not start", address=error.address,
                                       error=error.error.strerror or str(error.error))
        return 1
    except KeyboardInterrupt:
        return 130
