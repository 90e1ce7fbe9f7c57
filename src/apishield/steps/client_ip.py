"""Who is the client? The peer address, unless the peer is a configured trusted proxy.

`X-Forwarded-For` is attacker-controlled unless the peer that sent it is one of ours, so it
is ignored from anyone else (fastapi-guard CVE-2025-46814 trusted it from everyone). When
the peer is trusted, the chain is walked right to left and the first address that is not a
trusted proxy is the client: the leftmost entry is whatever the client chose to write.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from apishield.exchange import Exchange

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientIpStep:
    name = "client_ip"

    def __init__(self, trusted: tuple[IpNetwork, ...]) -> None:
        self._trusted = trusted
        self.is_trusted = lru_cache(maxsize=4096)(self._check)

    def _check(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in network for network in self._trusted)

    def on_head(self, exchange: Exchange) -> None:
        request = exchange
        if not self.is_trusted(request.peer_ip):
            return  # Exchange defaults: client = peer, X-Forwarded-For = peer
        exchange.trusted_peer = True
        chain: list[str] = []
        for name, value in request.headers:
            if name == b"x-forwarded-for":
                chain.extend(part.strip() for part in value.decode("latin-1").split(","))
        client = request.peer_ip
        for address in reversed(chain):
            if not _valid_ip(address):
                break
            client = address
            if not self.is_trusted(address):
                break
        exchange.client_ip = client
        exchange.forwarded_for = ", ".join([*chain, request.peer_ip])


@lru_cache(maxsize=4096)
def _valid_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def build(trusted_proxies: tuple[str, ...]) -> ClientIpStep | None:
    if not trusted_proxies:
        return None
    return ClientIpStep(tuple(ipaddress.ip_network(c, strict=False) for c in trusted_proxies))
