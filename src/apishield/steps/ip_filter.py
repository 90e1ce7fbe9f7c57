"""Who may call at all (checklist D5, A9): static CIDR allow/deny lists and temporary bans.

Runs right after `client_ip` (so the address is the real client, never a spoofed
`X-Forwarded-For`) and before anything else: a banned or denied client learns nothing, not
even which paths exist. Per-operation lists (`x-apishield.ip`) apply in addition to the
global ones (both must admit the client) and are checked once the route is known
(`operation_ip`): e.g. an admin operation open to the office network only.

Decisions are memoized per address (bounded): a client's next request costs a dict lookup.
Bans change at run time, so they are looked up in the ban store's in-memory mirror on
every request instead (also a dict lookup).
"""

from __future__ import annotations

import ipaddress
import math
import time
from functools import lru_cache
from typing import TYPE_CHECKING

from apishield.config import IpLists
from apishield.contract.loader import Contract
from apishield.exchange import Exchange
from apishield.problems import ClientBanned, IpDenied

if TYPE_CHECKING:
    from apishield.abuse.gate import BanGate

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Lists:
    def __init__(self, lists: IpLists) -> None:
        self.allow = tuple(ipaddress.ip_network(c, strict=False) for c in lists.allow)
        self.deny = tuple(ipaddress.ip_network(c, strict=False) for c in lists.deny)
        self.admits = lru_cache(maxsize=8192)(self._admits)

    def _admits(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return not self.allow  # not an address (a unix socket peer): only if open
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:203.0.113.7 is 203.0.113.7 (no list bypass)
        if any(ip in network for network in self.deny):
            return False
        return not self.allow or any(ip in network for network in self.allow)

    @property
    def empty(self) -> bool:
        return not (self.allow or self.deny)


def retry_after(until: float) -> list[tuple[bytes, bytes]]:
    return [(b"retry-after", b"%d" % max(1, math.ceil(until - time.time())))]


class IpFilterStep:
    name = "ip_filter"

    def __init__(self, lists: IpLists, bans: BanGate | None) -> None:
        self.lists = _Lists(lists)
        self.bans = bans

    def on_head(self, exchange: Exchange) -> None:
        address = exchange.client_ip
        if not self.lists.empty and not self.lists.admits(address):
            raise IpDenied("ip-not-allowed")
        if self.bans is not None:
            ban = self.bans.check(address, None, time.time())
            if ban is not None:
                raise ClientBanned(f"banned:{ban.rule}", headers=retry_after(ban.until))


class OperationIpStep:
    """Per-operation lists, on top of the global ones."""

    name = "operation_ip"

    def __init__(self, contract: Contract) -> None:
        self.lists = {op.pointer: _Lists(op.policy.ip) for op in contract.operations
                      if op.policy.ip is not None}

    def on_head(self, exchange: Exchange) -> None:
        operation = exchange.operation
        if operation is None:
            return
        lists = self.lists.get(operation.pointer)
        if lists is not None and not lists.admits(exchange.client_ip):
            raise IpDenied("ip-not-allowed-for-operation")
