"""Configuration: a TOML file decoded into msgspec Structs.

The core owns ``[server]``, ``[upstream]``, ``[upstreams.NAME]`` and ``[plugins]``. Every other
section belongs to the plugin that declares it (its ``Plugin.config_section`` and
``Plugin.Config`` struct) and is decoded by `gatekeeper.plugins` once plugins are loaded.
Unknown keys and sections are errors that name the key and the file; ``${VAR}`` (or
``${VAR:-default}``) is replaced from the environment, and a missing variable is an error.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from yarl import URL

from gatekeeper.forwarded import parse_networks

__all__ = [
    "Config",
    "ConfigError",
    "PluginsConfig",
    "ServerConfig",
    "UpstreamConfig",
    "decode_section",
    "load_config",
    "parse_config",
    "resolve_config_path",
]

# The built-in plugins, in the order their hooks are called (each lives in plugins/<name>.py,
# installed as gatekeeper_plugins.<name>).
BUILTIN_PLUGINS = {
    "auth": "gatekeeper_plugins.auth",
    "normalize": "gatekeeper_plugins.normalize",
    "cache": "gatekeeper_plugins.cache",
    "forward": "gatekeeper_plugins.forward",
    "metering": "gatekeeper_plugins.metering",
    "audit": "gatekeeper_plugins.audit",
}
DEFAULT_BUILTINS = list(BUILTIN_PLUGINS)
CORE_SECTIONS = ("server", "upstream", "upstreams", "plugins")

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
T = TypeVar("T")

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


class ConfigError(Exception):
    """A config file that can't be used; the message names the file and the key."""


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8080
    unix_socket: str | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    # POST bodies to these paths go upstream as they arrive instead of being read whole first
    # (gatekeeper/uploads.py): file uploads, which no stage reads. "*" is one path segment.
    upload_paths: list[str] = msgspec.field(
        default_factory=lambda: ["/v1/files", "/v1/uploads/*/parts", "/v1/containers/*/files"])
    max_upload_bytes: PositiveInt = 512 * 1024 * 1024  # the Files API's own limit per file
    max_concurrency: NonNegativeInt = 512  # 0: no limit
    header_timeout_s: PositiveFloat = 10.0  # the whole request head, from its first byte (or from connect)
    body_timeout_s: PositiveFloat = 60.0
    keepalive_timeout_s: PositiveFloat = 75.0  # an idle keep-alive connection is closed after this
    send_timeout_s: PositiveFloat = 60.0  # a client that reads nothing for this long is disconnected
    shutdown_timeout_s: float = 30.0
    write_buffer_bytes: PositiveInt = 1024 * 1024  # per-connection send buffer high-water mark
    uvloop: bool | Literal["auto"] = "auto"  # "auto": uvloop when the package is installed
    access_log: bool = True
    log_level: str = "info"
    log_format: str = "auto"  # "json", "console", or "auto" (console on a TTY)
    # Load balancers whose X-Forwarded-For names the client (gatekeeper/forwarded.py); empty: the
    # connection's peer is the client, whatever its headers say.
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    # Browser apps on /v1 (gatekeeper/cors.py): ["*"] as api.openai.com, or exact origins
    # ("https://app.example.com"); empty: no CORS headers at all.
    cors_allow_origins: list[str] = msgspec.field(default_factory=list)
    # HTTPS: a PEM certificate chain and its key (relative paths: from the config file's folder).
    # Both or neither; "" is unset. SIGHUP reloads them from disk (certificate rotation).
    tls_cert_file: str = ""
    tls_key_file: str = ""

    def __post_init__(self) -> None:
        parse_networks(self.trusted_proxies)
        for path in self.upload_paths:
            if not path.startswith("/v1/") or path.endswith("/") or "//" in path:
                raise ValueError(f"upload_paths: {path!r} is not a path under /v1/ "
                                 "(\"/v1/files\", \"/v1/uploads/*/parts\")")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: set both for HTTPS, or neither")
        if self.tls_cert_file and self.unix_socket:
            raise ValueError("tls_cert_file is for TCP: a unix_socket is reached only from this host, in clear")


class UpstreamConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    base_url: str = "https://api.openai.com/v1"
    api_key: str | None = None
    organization: str | None = None
    project: str | None = None
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])  # fnmatch globs of the models it serves
    priority: int = 0  # higher is tried first
    weight: NonNegativeInt = 1  # random share among upstreams of equal priority (0: only as a fallback)
    max_retries: NonNegativeInt = 2  # attempts after the first (failovers included; each upstream gets one anyway)
    connect_timeout_s: PositiveFloat = 10.0
    read_timeout_s: PositiveFloat = 600.0  # longest silence: before the headers or between body chunks
    total_timeout_s: PositiveFloat = 900.0  # the whole upstream exchange, retries and body included
    buffer_response_bytes: NonNegativeInt = 0  # JSON answers up to this are read whole first (0: stream them)
    retry_after_send: bool = False  # re-send POSTs whose request may have reached the upstream (bills twice)
    retry_backoff_s: NonNegativeFloat = 0.5  # first retry waits up to this (full jitter), doubling each time
    retry_max_delay_s: NonNegativeFloat = 8.0  # cap on one wait, and on a retry-after the gateway honours
    breaker_failures: NonNegativeInt = 5  # consecutive failures that open the circuit (0: no breaker)
    breaker_cooldown_s: NonNegativeFloat = 30.0  # open this long, then one probe request (half-open)
    # An egress proxy for this upstream, http://[user:password@]host:port; "" goes direct. Unset:
    # the standard HTTPS_PROXY / HTTP_PROXY / NO_PROXY variables decide, as for the OpenAI SDK.
    proxy: str | None = None

    def __post_init__(self) -> None:
        if self.proxy:
            proxy = URL(self.proxy)
            if proxy.scheme != "http" or not proxy.host:
                raise ValueError("proxy must be an http://host:port URL (an https:// upstream goes through it "
                                 "with CONNECT)")


class PluginsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    builtins: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_BUILTINS))
    modules: list[str] = msgspec.field(default_factory=list)
    paths: list[str] = msgspec.field(default_factory=list)
    blocked: list[str] = msgspec.field(default_factory=list)
    entry_points: bool = True


class Config(msgspec.Struct, kw_only=True):
    """The whole configuration: core sections decoded, plugin sections kept raw until loading."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    upstream: UpstreamConfig | None = None
    upstreams: dict[str, UpstreamConfig] = msgspec.field(default_factory=dict)
    plugins: PluginsConfig = msgspec.field(default_factory=PluginsConfig)
    sections: dict[str, Any] = msgspec.field(default_factory=dict)
    path: str = "<memory>"

    def all_upstreams(self) -> dict[str, UpstreamConfig]:
        """Named upstreams; a lone ``[upstream]`` is named ``default``."""
        upstreams = dict(self.upstreams)
        if self.upstream is not None:
            upstreams.setdefault("default", self.upstream)
        return upstreams

    def secrets(self) -> list[str]:
        """Every upstream key and proxy password: values that must never appear in a response or a log line."""
        upstreams = self.all_upstreams().values()
        passwords = [URL(u.proxy).password for u in upstreams if u.proxy]
        return [u.api_key for u in upstreams if u.api_key] + [p for p in passwords if p]


class _CoreConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    upstream: UpstreamConfig | None = None
    upstreams: dict[str, UpstreamConfig] = msgspec.field(default_factory=dict)
    plugins: PluginsConfig = msgspec.field(default_factory=PluginsConfig)


def resolve_config_path(cli_path: str | None) -> Path:
    """``--config``, then ``$GATEKEEPER_CONFIG``, then ``./config.toml``."""
    return Path(cli_path or os.environ.get("GATEKEEPER_CONFIG") or "config.toml")


def _interpolate(value: Any, where: str, path: str, environ: os._Environ[str] | dict[str, str]) -> Any:
    if isinstance(value, str):
        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in environ:
                return environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{path}: {where} uses ${{{name}}}, but the environment variable {name} is not set")

        return _ENV_PATTERN.sub(replace, value) if "${" in value else value
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{where}.{k}" if where else k, path, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{where}[{i}]", path, environ) for i, v in enumerate(value)]
    return value


def _where(error: msgspec.ValidationError, prefix: str = "") -> str:
    """Turn msgspec's ``... - at `$.server.port``` into a TOML-ish key name."""
    message = str(error)
    match = re.search(r"at `\$\.?([^`]*)`", message)
    key = match.group(1) if match else ""
    unknown = re.search(r"unknown field `([^`]+)`", message)
    if unknown:
        key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
    key = re.sub(r"\[(\d+)\]", r"[\1]", key)
    full = ".".join(part for part in (prefix, key) if part)
    text = message.split(" - at ")[0]
    return f"[{full}] {text}" if full else text


def decode_section(raw: Any, struct: type[T], section: str, path: str) -> T:
    """Decode one plugin section into its Struct, with errors that name key and file."""
    try:
        return msgspec.convert(raw if raw is not None else {}, struct, strict=True)
    except msgspec.ValidationError as error:
        raise ConfigError(f"{path}: {_where(error, section)}") from None


def parse_config(raw: dict[str, Any], path: str = "<memory>", environ: dict[str, str] | None = None) -> Config:
    """Validate an already-parsed TOML document (env interpolation included)."""
    raw = _interpolate(raw, "", path, os.environ if environ is None else environ)
    core = {k: v for k, v in raw.items() if k in CORE_SECTIONS}
    if isinstance(core.get("upstreams"), dict):
        # Decoded one by one so an error names the upstream ([upstreams.relay.api_key], not [upstreams[...]]).
        for name, section in core["upstreams"].items():
            decode_section(section, UpstreamConfig, f"upstreams.{name}", path)
    try:
        decoded = msgspec.convert(core, _CoreConfig, strict=True)
    except msgspec.ValidationError as error:
        raise ConfigError(f"{path}: {_where(error)}") from None
    config = Config(
        server=decoded.server,
        upstream=decoded.upstream,
        upstreams=decoded.upstreams,
        plugins=decoded.plugins,
        sections={k: v for k, v in raw.items() if k not in CORE_SECTIONS},
        path=path,
    )
    if not config.all_upstreams():
        config.upstream = UpstreamConfig()
    return config


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Read and validate a config file (plugin sections are checked when plugins load)."""
    resolved = resolve_config_path(str(path) if path else None)
    try:
        with open(resolved, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{resolved}: config file not found (use --config or GATEKEEPER_CONFIG)") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{resolved}: not valid TOML: {error}") from None
    return parse_config(raw, str(resolved), environ)
