"""Send chosen tenants to an upstream of their own (their own contract, key or region).

    [plugins]
    modules = ["examples.tenant_router.tenant_router"]

    [upstreams.eu]                       # the tenant's own upstream
    base_url = "https://eu.example-openai-proxy.internal/v1"
    api_key = "${EU_OPENAI_API_KEY}"
    models = []                          # serves no model by itself: only the tenants routed here
    priority = -1                        # and comes last for model-less requests (GET /v1/models)

    [tenant_router.tenants]
    eu-bank = "eu"                       # tenant -> [upstreams.NAME]

It sets `flow.upstream_name`, which the built-in forwarder honours. It does so in
`check_request`, before the cache and the upstream: where a tenant's requests go is policy,
decided once for the flow, so every later stage sees the same choice.
"""

from __future__ import annotations

import msgspec

from gatekeeper import hookimpl
from gatekeeper.config import Config as GatewayConfig
from gatekeeper.config import ConfigError
from gatekeeper.flow import Flow

__all__ = ["Plugin", "RouterConfig"]


class RouterConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The ``[tenant_router]`` section."""

    tenants: dict[str, str] = {}  # tenant -> name of an upstream in [upstreams.NAME]


class Plugin:
    name = "tenant_router"
    config_section = "tenant_router"
    Config = RouterConfig

    def __init__(self, config: GatewayConfig, settings: RouterConfig) -> None:
        known = config.all_upstreams()
        for tenant, upstream in settings.tenants.items():
            if upstream not in known:
                raise ConfigError(f"{config.path}: [tenant_router] tenants.{tenant} names upstream {upstream!r}, "
                                  f"but no [upstreams.{upstream}] is configured (known: {', '.join(sorted(known))})")
        self.routes = dict(settings.tenants)

    def describe(self) -> str:
        return "routes " + (", ".join(f"{t}->{u}" for t, u in self.routes.items()) or "no tenants")

    @hookimpl
    def check_request(self, flow: Flow) -> None:
        tenant = flow.tenant
        if tenant is not None and tenant in self.routes:
            flow.upstream_name = self.routes[tenant]
