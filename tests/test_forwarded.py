"""The client's address behind a load balancer: ``[server] trusted_proxies`` and X-Forwarded-For."""

from __future__ import annotations

import json

import openai
import pytest

from gatekeeper.config import ConfigError, parse_config
from gatekeeper.forwarded import client_address, parse_networks
from gatekeeper.testing.kit import CLIENT_KEY

LOAD_BALANCERS = parse_networks(["10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(("peer", "forwarded_for", "client"), [
    # A connection from outside the trusted networks is the client, whatever it claims.
    ("203.0.113.7", ["198.51.100.1"], "203.0.113.7"),
    # A trusted load balancer names the client.
    ("10.0.0.5", ["203.0.113.7"], "203.0.113.7"),
    # Two trusted hops: the rightmost untrusted address is the client.
    ("10.0.0.5", ["203.0.113.7, 10.1.2.3"], "203.0.113.7"),
    # What the client sent itself (left of its own address) is never believed.
    ("10.0.0.5", ["1.1.1.1, 203.0.113.7"], "203.0.113.7"),
    # Several header lines read as one list, in order.
    ("10.0.0.5", ["1.1.1.1", "203.0.113.7, 10.1.2.3"], "203.0.113.7"),
    # Not an address: the last trusted hop is as close to the client as can be known.
    ("10.0.0.5", ["203.0.113.7, garbage, 10.1.2.3"], "10.1.2.3"),
    ("10.0.0.5", ["unknown"], "10.0.0.5"),
    # Only trusted hops: the leftmost.
    ("10.0.0.5", ["10.9.9.9, 10.1.2.3"], "10.9.9.9"),
    # IPv6, and IPv4 seen through a dual-stack socket.
    ("fd00::1", ["2001:db8::7"], "2001:db8::7"),
    ("::ffff:10.0.0.5", ["203.0.113.7"], "203.0.113.7"),
    # No header, or no peer (a unix socket): nothing to read.
    ("10.0.0.5", [], "10.0.0.5"),
    (None, ["203.0.113.7"], None),
])
def test_the_client_is_the_rightmost_address_a_trusted_proxy_did_not_add(peer, forwarded_for, client):
    assert client_address(peer, forwarded_for, LOAD_BALANCERS) == client


def test_with_no_trusted_proxies_the_header_is_ignored():
    assert client_address("10.0.0.5", ["203.0.113.7"], []) == "10.0.0.5"


def test_a_trusted_proxy_that_is_not_a_network_is_a_config_error():
    with pytest.raises(ConfigError, match=r"\[server\] trusted_proxies: '10.0.0.0/33' is not an IP address"):
        parse_config({"server": {"trusted_proxies": ["10.0.0.0/8", "10.0.0.0/33"]}})


async def audited_client_ips(gateway_kit, tmp_path, server: dict, forwarded_for: str) -> list[str]:
    """The client_ip of the audit records of one plain and one streamed generation."""
    gateway = await gateway_kit.start({"server": server})
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0,
                                  default_headers={"X-Forwarded-For": forwarded_for}) as client:
        plain = await client.images.with_raw_response.generate(model="gpt-image-1.5", prompt="a fox behind a balancer")
        async with client.images.with_streaming_response.generate(
                model="gpt-image-1.5", prompt="a streamed fox behind a balancer", stream=True, partial_images=1) as streamed:
            assert b"image_generation.completed" in await streamed.read()
    records = [json.loads(line) for line in (tmp_path / "audit" / "gatekeeper-audit.jsonl").read_bytes().splitlines()]
    by_id = {record.get("request_id"): record for record in records}
    return [by_id[response.headers["x-gatekeeper-request-id"]]["client_ip"] for response in (plain, streamed)]


async def test_the_audit_records_the_client_a_trusted_load_balancer_names(gateway_kit, tmp_path):
    # The test's connections come from 127.0.0.1: here, the load balancer.
    assert await audited_client_ips(gateway_kit, tmp_path, {"trusted_proxies": ["127.0.0.1"]},
                                    "1.1.1.1, 203.0.113.7") == ["203.0.113.7", "203.0.113.7"]


async def test_without_trusted_proxies_a_client_cannot_choose_its_audited_address(gateway_kit, tmp_path):
    assert await audited_client_ips(gateway_kit, tmp_path, {}, "203.0.113.7") == ["127.0.0.1", "127.0.0.1"]
