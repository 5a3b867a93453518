"""The client's address behind load balancers and ingresses: ``[server] trusted_proxies``.

A connection from a trusted network may name the client in ``X-Forwarded-For``: the client is
the rightmost address there that is not itself trusted, as nginx's ``set_real_ip_from`` with
``real_ip_recursive on`` reads it. Each proxy appends the address it was connected from, so the
entries left of the first untrusted one are whatever that client sent, and are never believed.
A connection from anywhere else is the client, whatever its headers say.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

__all__ = ["Network", "client_address", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Sequence[str]) -> list[Network]:
    """CIDR blocks or single addresses ("10.0.0.0/8", "192.0.2.7", "fd00::/8"); ValueError names
    the one that is neither."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"trusted_proxies: {value!r} is not an IP address or network (CIDR)") from None
    return networks


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # "::ffff:10.0.0.5" from a dual-stack socket is 10.0.0.5
    return address


def _trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address | None, trusted: Sequence[Network]) -> bool:
    return address is not None and any(address in network for network in trusted)


def client_address(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str | None:
    """The client's address, given the connection's `peer`, the ``X-Forwarded-For`` header values
    (all of them, in order) and the `trusted` proxy networks."""
    if not forwarded_for or not _trusted(_address(peer or ""), trusted):
        return peer
    client = peer
    for hop in reversed([hop.strip() for value in forwarded_for for hop in value.split(",")]):
        address = _address(hop)
        if address is None:
            return client  # not an address: nothing to the left of it can be believed
        client = str(address)
        if not _trusted(address, trusted):
            return client
    return client  # every hop is a trusted proxy: the leftmost is as close to the client as known
