"""Client keys become tenants; the upstream key stays the gateway's own.

Every ``/v1`` request must carry ``Authorization: Bearer <gateway key>``. The key is looked up
by its SHA-256 digest (only digests are kept in memory, compared with `hmac.compare_digest`)
and becomes the flow's `Principal`: key id, tenant, labels (``department`` and any ``labels``)
and model allow-list. ``/admin`` routes take the ``admin_keys`` instead, which are refused on
``/v1``. Per-key policy runs in `check_request`: a model outside the key's globs is a 403,
going over ``rpm`` a 429 with ``retry-after``. The upstream key is never accepted from a
client, and SIGHUP swaps in a new key table without touching requests in flight.

The CLI gains ``gatekeeper keys new`` (a fresh key and its ``key_sha256`` config block) and
``gatekeeper keys hash`` (the digest of a key read from stdin).
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import hashlib
import hmac
import json
import math
import re
import secrets
import sys
import time
from collections import deque
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal

import msgspec
from aiohttp import web

from gatekeeper import hookimpl
from gatekeeper.config import Config, ConfigError, decode_section
from gatekeeper.errors import GatewayError
from gatekeeper.flow import Flow, Outcome, Principal
from gatekeeper.logs import get_logger, register_secret, register_url_secrets

__all__ = ["Plugin", "AuthConfig", "KeyConfig", "KeyTable", "hash_key", "new_key", "register_commands"]

log = get_logger("gatekeeper.auth")

KEY_PREFIX = "sk-gk-"
WINDOW_S = 60.0
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
_ADMIN_PREFIX = "admin-"


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of a key: the only form in which keys are kept."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


# ---------------------------------------------------------------- config


class KeyConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One ``[[auth.keys]]`` entry."""

    id: str
    tenant: str
    key: str | None = None
    key_sha256: str | None = None
    department: str | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    models: list[str] | None = None
    rpm: int | None = None
    expires: datetime.date | None = None  # refused from 00:00 UTC on this date


class AuthConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The ``[auth]`` section."""

    admin_keys: list[str] = msgspec.field(default_factory=list)
    keys: list[KeyConfig] = msgspec.field(default_factory=list)
    rate_limit_backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "gatekeeper:auth:rpm:"


# ---------------------------------------------------------------- the key table


@dataclass(frozen=True, slots=True)
class KeyRecord:
    digest: str
    principal: Principal
    rpm: int | None
    expires_at: float | None  # epoch seconds; the key is refused from this instant on


class KeyTable:
    """Digests of every accepted key, built once per config and replaced whole on reload."""

    __slots__ = ("clients", "admins", "upstream_digests")

    def __init__(self, clients: dict[str, KeyRecord], admins: dict[str, KeyRecord], upstream_digests: frozenset[str]):
        self.clients = clients
        self.admins = admins
        self.upstream_digests = upstream_digests

    @classmethod
    def build(cls, settings: AuthConfig, upstream_keys: Iterable[str], path: str) -> KeyTable:
        """Validate `settings` and hash every key; errors name the entry, never the secret."""
        upstream_digests = frozenset(hash_key(key) for key in upstream_keys)
        owners: dict[str, str] = {}  # digest -> "client key id 'x'" / "admin_keys[0]"

        def claim(digest: str, owner: str) -> None:
            if digest in upstream_digests:
                raise ConfigError(f"{path}: [auth] {owner} is the upstream api_key; the upstream key is never a client key")
            if digest in owners:
                raise ConfigError(f"{path}: [auth] {owner} is the same key as {owners[digest]}")
            owners[digest] = owner

        admins: dict[str, KeyRecord] = {}
        for index, key in enumerate(settings.admin_keys):
            where = f"admin_keys[{index}]"
            _check_raw_key(key, where, path)
            digest = hash_key(key)
            claim(digest, where)
            principal = Principal(key_id=f"{_ADMIN_PREFIX}{index + 1}", tenant="admin", is_admin=True)
            admins[digest] = KeyRecord(digest, principal, None, None)

        clients: dict[str, KeyRecord] = {}
        ids: set[str] = set()
        for index, entry in enumerate(settings.keys):
            where = f"keys[{index}] (id {entry.id!r})"
            _check_entry(entry, where, path)
            digest = _entry_digest(entry, where, path)
            if entry.id in ids:
                raise ConfigError(f"{path}: [auth] {where}: the id is used by another key; ids must be unique")
            ids.add(entry.id)
            claim(digest, f"client key id {entry.id!r}")
            labels = dict(entry.labels)
            if entry.department is not None:
                labels["department"] = entry.department
            principal = Principal(key_id=entry.id, tenant=entry.tenant, labels=labels,
                                  models=tuple(entry.models) if entry.models is not None else None)
            expires_at = None
            if entry.expires is not None:
                expires_at = datetime.datetime.combine(entry.expires, datetime.time(), datetime.UTC).timestamp()
            clients[digest] = KeyRecord(digest, principal, entry.rpm, expires_at)
        return cls(clients, admins, upstream_digests)


def _check_raw_key(key: str, where: str, path: str) -> None:
    if not key:
        raise ConfigError(f"{path}: [auth] {where} is empty (is its environment variable set to an empty value?)")
    if any(char.isspace() for char in key):
        raise ConfigError(f"{path}: [auth] {where} contains whitespace; it could never be sent as a bearer token")


def _entry_digest(entry: KeyConfig, where: str, path: str) -> str:
    if (entry.key is None) == (entry.key_sha256 is None):
        raise ConfigError(f"{path}: [auth] {where}: set exactly one of `key` and `key_sha256`")
    if entry.key is not None:
        _check_raw_key(entry.key, f"{where} key", path)
        return hash_key(entry.key)
    assert entry.key_sha256 is not None
    if not _HEX_DIGEST.fullmatch(entry.key_sha256):
        raise ConfigError(f"{path}: [auth] {where} key_sha256 must be 64 hex digits (see `gatekeeper keys hash`)")
    return entry.key_sha256.lower()


def _check_entry(entry: KeyConfig, where: str, path: str) -> None:
    if not entry.id or entry.id.startswith(_ADMIN_PREFIX):
        raise ConfigError(f"{path}: [auth] {where}: id must be non-empty and must not start with {_ADMIN_PREFIX!r} "
                          "(that prefix names admin keys in metering and audit)")
    if not entry.tenant:
        raise ConfigError(f"{path}: [auth] {where}: tenant must not be empty")
    if entry.models is not None and not entry.models:
        raise ConfigError(f"{path}: [auth] {where}: models is an empty list; leave it out to allow every model")
    if entry.rpm is not None and entry.rpm < 1:
        raise ConfigError(f"{path}: [auth] {where}: rpm must be at least 1")
    if "department" in entry.labels and entry.department is not None:
        raise ConfigError(f"{path}: [auth] {where}: department is set both as a key and in labels")


# ---------------------------------------------------------------- rate limiting


class MemoryRateLimiter:
    """A per-key sliding window of request times, in this process only (per replica)."""

    def __init__(self) -> None:
        self.windows: dict[str, deque[float]] = {}

    def acquire(self, key_id: str, rpm: int) -> float | None:
        """Count one request; return None if allowed, else the seconds until one is."""
        now = time.monotonic()
        window = self.windows.get(key_id)
        if window is None:
            window = self.windows[key_id] = deque()
        horizon = now - WINDOW_S
        while window and window[0] <= horizon:
            window.popleft()
        if len(window) >= rpm:
            return window[len(window) - rpm] + WINDOW_S - now
        window.append(now)
        return None

    def forget_except(self, key_ids: set[str]) -> None:
        for key_id in [k for k in self.windows if k not in key_ids]:
            del self.windows[key_id]


# Sliding window in a sorted set, timed by the Redis server so replicas' clocks don't matter.
_REDIS_ACQUIRE = """
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000 + math.floor(tonumber(now_t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
local limit = tonumber(ARGV[1])
if count < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return -1
end
local oldest = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
return tonumber(oldest[2]) + window - now
"""


class RedisRateLimiter:
    """The same sliding window shared by every replica through Redis; fails open if Redis is down."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis.asyncio as redis

        self.prefix = prefix
        self.client = redis.Redis.from_url(url)
        self.script = self.client.register_script(_REDIS_ACQUIRE)
        self._warned_at = 0.0

    async def acquire(self, key_id: str, rpm: int, request_id: str) -> float | None:
        try:
            wait_ms = await self.script(keys=[self.prefix + key_id], args=[rpm, int(WINDOW_S * 1000), request_id])
        except Exception as error:  # availability over enforcement: a Redis outage must not stop traffic
            now = time.monotonic()
            if now - self._warned_at > 10:
                self._warned_at = now
                log.warning("rate limit not enforced: redis unavailable", error=type(error).__name__)
            return None
        return None if int(wait_ms) < 0 else int(wait_ms) / 1000.0

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self.client.aclose()


# ---------------------------------------------------------------- the plugin


def _invalid_key(message: str = "Incorrect API key provided. Ask your gateway administrator for a valid key.") -> GatewayError:
    return GatewayError(401, message, code="invalid_api_key", outcome=Outcome.AUTH_FAIL)


_MISSING = ("You didn't provide an API key. You need to provide your gateway key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")


def _is_admin_path(path: str) -> bool:
    return path == "/admin" or path.startswith("/admin/")


class Plugin:
    """Authenticate every request by its bearer key and enforce that key's policy."""

    name = "auth"
    config_section = "auth"
    Config = AuthConfig

    def __init__(self, config: Config, settings: AuthConfig | None) -> None:
        settings = settings or AuthConfig()
        register_url_secrets(settings.redis_url)
        self.table = KeyTable.build(settings, config.secrets(), config.path)
        # Only what the limiter needs is kept: `settings` itself holds raw keys.
        self.backend = (settings.rate_limit_backend, settings.redis_url, settings.redis_prefix)
        self.limiter = MemoryRateLimiter()
        self.shared_limiter: RedisRateLimiter | None = None  # replaces `limiter` when the backend is Redis

    def describe(self) -> str:
        table = self.table
        return f"{len(table.clients)} client keys, {len(table.admins)} admin keys, rate limits in {self.backend[0]}"

    @hookimpl
    def startup(self) -> None:
        if not self.table.clients:
            log.warning("auth: no client keys configured; every /v1 request will get 401 (see docs/auth.md)")
        backend, redis_url, redis_prefix = self.backend
        if backend == "redis":
            self.shared_limiter = RedisRateLimiter(redis_url, redis_prefix)

    @hookimpl
    async def shutdown(self) -> None:
        if self.shared_limiter is not None:
            await self.shared_limiter.close()

    @hookimpl
    async def ready_check(self) -> dict[str, Any]:
        report: dict[str, Any] = {"ready": True, "client_keys": len(self.table.clients),
                                  "admin_keys": len(self.table.admins)}
        if self.shared_limiter is not None:
            report["redis"] = "ok" if await self.shared_limiter.ping() else "unavailable (rate limits not enforced)"
        return report

    @hookimpl
    def register_routes(self) -> list[web.RouteDef]:
        return [web.get("/admin/keys", self.keys_route)]

    async def keys_route(self, _request: web.Request) -> web.Response:
        """``GET /admin/keys``: who may call this process, one entry per client key by its id, with
        its tenant, labels, models, rpm and expiry; never a key, nor its digest."""
        now = time.time()
        keys = []
        for record in sorted(self.table.clients.values(), key=lambda record: record.principal.key_id):
            principal, expires_at = record.principal, record.expires_at
            keys.append({
                "id": principal.key_id, "tenant": principal.tenant, "labels": principal.labels,
                "models": list(principal.models) if principal.models is not None else None, "rpm": record.rpm,
                "expires": (datetime.datetime.fromtimestamp(expires_at, datetime.UTC).date().isoformat()
                            if expires_at is not None else None),
                "expired": expires_at is not None and now >= expires_at,
            })
        return web.Response(body=msgspec.json.encode({"client_keys": keys, "admin_keys": len(self.table.admins)}),
                            content_type="application/json")

    @hookimpl
    def reload_config(self, config: Config) -> None:
        """Swap in the re-read keys; requests already admitted keep their principal."""
        settings = decode_section(config.sections.get(self.config_section), AuthConfig, self.config_section, config.path)
        table = KeyTable.build(settings, config.secrets(), config.path)
        for secret in config.secrets():
            register_secret(secret)
        if (settings.rate_limit_backend, settings.redis_url, settings.redis_prefix) != self.backend:
            log.warning("rate_limit_backend, redis_url and redis_prefix take effect on restart, not on reload")
        self.table = table  # one assignment: in-flight requests keep the records they already hold
        self.limiter.forget_except({record.principal.key_id for record in table.clients.values()})
        log.info("auth keys reloaded", client_keys=len(table.clients), admin_keys=len(table.admins))

    @hookimpl
    def authenticate(self, flow: Flow) -> Principal:
        """The principal of the one bearer key presented, or a 401 that never echoes the key."""
        presented = flow.headers.getall("Authorization", ())
        if not presented:
            raise _invalid_key(_MISSING)
        if len(presented) > 1:
            raise _invalid_key("Send exactly one Authorization header.")
        scheme, _, token = presented[0].partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _invalid_key("The Authorization header must be `Bearer YOUR_KEY`." if scheme.lower() != "bearer"
                               else _MISSING)
        digest = hash_key(token)
        table = self.table
        if digest in table.upstream_digests:
            # The real key is out in the wild if a client has it: say so to the operators.
            log.warning("a client presented the upstream api_key; rotate it", client_ip=flow.client_ip, path=flow.path)
            raise _invalid_key()
        if _is_admin_path(flow.path):
            record = table.admins.get(digest) or table.clients.get(digest)
        else:
            record = table.clients.get(digest)
            if record is None and digest in table.admins:
                raise _invalid_key("Admin keys are valid only on /admin routes; use a client key for /v1.")
        if record is None or not hmac.compare_digest(record.digest, digest):
            raise _invalid_key()
        if record.expires_at is not None and time.time() >= record.expires_at:
            raise _invalid_key("This API key has expired. Ask your gateway administrator for a new one.")
        flow.scratch["auth"] = record
        return record.principal

    @hookimpl
    def check_request(self, flow: Flow) -> Awaitable[None] | None:
        """Refuse a model outside the key's globs (403) and requests past its rpm (429)."""
        # Not `async def`: only keys limited through Redis need an await; the dispatcher awaits
        # the coroutine returned for them, and every other request pays for no coroutine.
        principal = flow.principal
        if principal is None:
            return None
        if principal.models is not None:
            _check_model(flow, principal.models)
        record: KeyRecord | None = flow.scratch.get("auth")
        if record is None or record.rpm is None:
            return None
        if self.shared_limiter is not None:
            return self._acquire_shared(principal.key_id, record.rpm, flow.request_id)
        _refuse_if_limited(principal.key_id, record.rpm, self.limiter.acquire(principal.key_id, record.rpm))
        return None

    async def _acquire_shared(self, key_id: str, rpm: int, request_id: str) -> None:
        assert self.shared_limiter is not None
        _refuse_if_limited(key_id, rpm, await self.shared_limiter.acquire(key_id, rpm, request_id))


def _refuse_if_limited(key_id: str, rpm: int, wait_s: float | None) -> None:
    if wait_s is None:
        return
    retry_after = max(1, math.ceil(wait_s))
    raise GatewayError(
        429, f"Rate limit reached for requests on key {key_id!r}: limit {rpm} per minute. "
             f"Please try again in {retry_after}s.",
        code="rate_limit_exceeded",
        headers={"retry-after": str(retry_after), "x-ratelimit-limit-requests": str(rpm),
                 "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": f"{retry_after}s"},
    )


def _check_model(flow: Flow, allowed: tuple[str, ...]) -> None:
    """A model-restricted key must name an allowed model; model-less reads (GET, DELETE) pass."""
    model = flow.model
    if model is None:
        if flow.method in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return
        raise GatewayError(403, f"This key may only use the models {', '.join(allowed)}; name one of them in `model`.",
                           code="model_not_allowed", param="model")
    if not any(fnmatchcase(model, pattern) for pattern in allowed):
        raise GatewayError(403, f"The model `{model[:200]}` is not allowed for this key (allowed: {', '.join(allowed)}).",
                           code="model_not_allowed", param="model")


# ---------------------------------------------------------------- CLI


def _toml_string(value: str) -> str:
    # JSON string escapes are a subset of TOML basic-string escapes.
    return json.dumps(value, ensure_ascii=False)


def key_config_block(key_id: str, tenant: str, digest: str) -> str:
    return (f"[[auth.keys]]\nid = {_toml_string(key_id)}\nkey_sha256 = \"{digest}\"\n"
            f"tenant = {_toml_string(tenant)}\n")


def cmd_keys_new(args: argparse.Namespace) -> int:
    if not args.tenant:
        print("keys new: --tenant must not be empty", file=sys.stderr)
        return 2
    key_id = args.id or f"{args.tenant}-{secrets.token_hex(3)}"
    if key_id.startswith(_ADMIN_PREFIX):
        print(f"keys new: --id must not start with {_ADMIN_PREFIX!r}", file=sys.stderr)
        return 2
    key = new_key()
    print(f"# New gateway key for tenant {args.tenant!r}. Give it to the client now: it is shown once and")
    print("# the config keeps only its hash.")
    print(key)
    print()
    print("# Paste into the [auth] part of config.toml, then reload (kill -HUP <gatekeeper pid>):")
    print(key_config_block(key_id, args.tenant, hash_key(key)), end="")
    return 0


def cmd_keys_hash(_args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        key = getpass.getpass("Key to hash (not echoed): ")
    else:
        key = sys.stdin.read()
    key = key.strip()
    if not key:
        print("keys hash: no key on stdin", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    keys = subparsers.add_parser("keys", help="make and hash gateway client keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="print a fresh random key and its [[auth.keys]] config block")
    new.add_argument("--tenant", required=True, help="tenant the key belongs to (metering, audit, cache scope)")
    new.add_argument("--id", help="stable key id for metering and audit (default: <tenant>-<random>)")
    new.set_defaults(func=cmd_keys_new)
    hash_parser = keys_sub.add_parser("hash", help="print the key_sha256 of a key read from stdin")
    hash_parser.set_defaults(func=cmd_keys_hash)
