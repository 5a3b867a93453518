"""Running the gateway: sockets, signals, graceful shutdown and live reload.

`serve` is what ``gatekeeper serve`` runs; `start_gateway` is the same start-up without the
signal handling, for tests and the plugin test kit, so tests exercise the production runner.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import http_writer, web

from gatekeeper.app import GATEWAY, Gateway, make_app
from gatekeeper.config import Config, ConfigError, ServerConfig, load_config
from gatekeeper.errors import ListenError
from gatekeeper.connection_guards import ConnectionGuards, GuardedAppRunner, GuardsCollector
from gatekeeper.logs import get_logger

__all__ = ["RunningGateway", "event_loop_name", "start_gateway", "serve"]

log = get_logger("gatekeeper.server")

YOUNG_GC_THRESHOLD = 5000  # allocations of tracked objects between young collections (Python: 700)
_AIOHTTP_SKIP_WRITELINES = http_writer.SKIP_WRITELINES  # aiohttp's own choice for asyncio's loop


@dataclass
class RunningGateway:
    runner: web.AppRunner
    gateway: Gateway
    url: str  # "http://127.0.0.1:PORT", "https://..." with [server] tls_cert_file, or "unix:/path"
    tls: ssl.SSLContext | None = None

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    async def stop(self) -> None:
        await self.runner.cleanup()


def tls_context(server: ServerConfig, config_path: str) -> ssl.SSLContext | None:
    """The server-side TLS context for ``[server] tls_cert_file`` / ``tls_key_file``, or None."""
    if not server.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    load_certificate(context, server, config_path)
    return context


def load_certificate(context: ssl.SSLContext, server: ServerConfig, config_path: str) -> None:
    """(Re)load the certificate chain and key into `context`: connections made from now on get
    them. A `ConfigError` names the file that would not load."""
    base = Path(config_path).resolve().parent if not config_path.startswith("<") else Path.cwd()
    certificate, key = (base / Path(name).expanduser() for name in (server.tls_cert_file, server.tls_key_file))
    try:
        context.load_cert_chain(certificate, key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"[server] tls_cert_file / tls_key_file: cannot load {certificate} with {key}: "
                          f"{error.strerror or error}") from None


async def start_gateway(config: Config, *, extra_plugins: list[Any] | None = None,
                        host: str | None = None, port: int | None = None) -> RunningGateway:
    """Build the app and listen on the configured TCP address or unix socket."""
    _unjoined_writes_on_uvloop(asyncio.get_running_loop())
    server = config.server
    tls = tls_context(server, config.path)  # a certificate that won't load stops the start before anything runs
    app = make_app(config, extra_plugins)
    guards = ConnectionGuards(server.header_timeout_s, server.send_timeout_s, server.write_buffer_bytes)
    runner = GuardedAppRunner(
        app,
        guards=guards,
        access_log=None,
        handler_cancellation=True,  # a client that goes away cancels its flow (and its upstream call)
        shutdown_timeout=server.shutdown_timeout_s,
        keepalive_timeout=server.keepalive_timeout_s,
        max_field_size=16384,
    )
    app[GATEWAY].metrics.register(GuardsCollector(guards))
    await runner.setup()
    host, port = host or server.host, server.port if port is None else port
    address = f"unix:{server.unix_socket}" if server.unix_socket else f"{host}:{port}"
    try:
        if server.unix_socket:
            site: web.BaseSite = web.UnixSite(runner, server.unix_socket)
            await site.start()
            # Connecting needs write permission: open it to the group (a sidecar's app container
            # shares the pod's fsGroup), not to everyone.
            os.chmod(server.unix_socket, 0o660)
            url = address
        else:
            site = web.TCPSite(runner, host, port, backlog=4096, ssl_context=tls)
            await site.start()
            sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
            bound = sockets[0].getsockname()[1] if sockets else port
            url = f"{'https' if tls else 'http'}://{host}:{bound}"
    except OSError as error:
        await runner.cleanup()  # the plugins have started: their shutdown ends their threads
        raise ListenError(address, error) from error
    return RunningGateway(runner, app[GATEWAY], url, tls)


def _is_uvloop(loop: asyncio.AbstractEventLoop) -> bool:
    return type(loop).__module__.startswith("uvloop")


def _unjoined_writes_on_uvloop(loop: asyncio.AbstractEventLoop) -> None:
    """On uvloop, let aiohttp hand a response's head and body to the transport unjoined.

    Before Python 3.12.9 aiohttp joins the head and a body of any size into one new buffer before
    writing (`http_writer.SKIP_WRITELINES`): asyncio's own `writelines` there joins anyway, or
    (3.12.0-3.12.8) ignored write flow control (CVE-2024-12254). uvloop's `writelines` queues each
    buffer as it is and sends them with one `writev`, under flow control, so on uvloop the join is
    a needless copy: 1.5 MB per large image answer, about a tenth of a large hit's CPU
    (docs/benchmarks.md). On asyncio's loop aiohttp's own choice stands. The setting is aiohttp's,
    so process-wide: the last gateway started decides, for its loop (one loop per process here).
    """
    http_writer.SKIP_WRITELINES = False if _is_uvloop(loop) else _AIOHTTP_SKIP_WRITELINES


async def _serve(config: Config, ready_message: str | None = None) -> None:
    running = await start_gateway(config)
    gateway = running.gateway
    # Everything built so far (modules, plugins, config) lives as long as the process: out of the
    # cyclic GC's sight, each full collection walks only what requests leave behind.
    gc.collect()
    gc.freeze()
    # A miss leaves some fifty GC-tracked objects (coroutines, futures, dicts) behind. At Python's
    # default of a young collection every 700 of them, collections took about 6% of a small
    # miss's CPU; every 5,000, about 2.5%, for 5-8% more misses a second (docs/benchmarks.md).
    gc.set_threshold(max(gc.get_threshold()[0], YOUNG_GC_THRESHOLD), 10, 10)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Future[None]] = set()

    def reload() -> None:
        try:
            fresh = load_config(config.path)
            from gatekeeper.plugins import build_hooks  # validate plugin sections too

            build_hooks(fresh)
            if running.tls is not None and fresh.server.tls_cert_file:
                # Certificate rotation: the files are read into a scratch context first, so a bad
                # pair never half-replaces the one being served.
                tls_context(fresh.server, config.path)
                load_certificate(running.tls, fresh.server, config.path)
                log.info("TLS certificate reloaded", certificate=fresh.server.tls_cert_file)
        except ConfigError as error:
            log.error("reload refused: config is invalid", error=str(error))
            return
        if (running.tls is not None) != bool(fresh.server.tls_cert_file):
            log.warning("turning HTTPS on or off ([server] tls_cert_file) takes effect on restart")
        changed = [name for name in fresh.server.__struct_fields__
                   if name not in ("tls_cert_file", "tls_key_file")
                   and getattr(fresh.server, name) != getattr(config.server, name)]
        if changed:
            # The listener, the limits and the guards were built from the [server] section at start.
            log.warning("[server] settings take effect on restart only", keys=changed)
        reloading = asyncio.ensure_future(gateway.reload(fresh))
        reloads.add(reloading)  # held until done: the loop keeps only a weak reference to a task
        reloading.add_done_callback(reloads.discard)
        log.info("config reloaded", path=config.path)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not config.path.startswith("<"):
        loop.add_signal_handler(signal.SIGHUP, reload)
    # The loop actually running, not the setting: the demo runs `_serve` on asyncio's own loop.
    running_loop = "uvloop" if _is_uvloop(loop) else "asyncio"
    log.info("listening", url=running.url, event_loop=running_loop)
    if ready_message:
        print(ready_message, flush=True)
    await stop.wait()
    log.info("shutting down: draining in-flight requests", in_flight=gateway.in_flight)
    gateway.draining = True
    await running.stop()
    log.info("stopped")


def event_loop_name(setting: bool | str) -> str:
    """The event loop `serve` runs on for ``[server] uvloop``: "uvloop" or "asyncio".

    ``"auto"`` (the default) takes uvloop when it is installed (it is a dependency wherever it
    builds: not on Windows). It measured as fast or faster on every case of the benchmark, up to
    a fifth more large misses a second (docs/benchmarks.md).
    """
    if setting is False:
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if setting is True:
            raise ConfigError("[server] uvloop = true, but the uvloop package is not installed "
                              "(pip install 'gatekeeper[uvloop]'), or set uvloop = \"auto\"") from None
        return "asyncio"
    return "uvloop"


def serve(config: Config, ready_message: str | None = None) -> None:
    if event_loop_name(config.server.uvloop) == "uvloop":
        import uvloop

        uvloop.run(_serve(config, ready_message))
    else:
        asyncio.run(_serve(config, ready_message))
