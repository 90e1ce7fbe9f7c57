"""What a ban store holds and must do (A9, D5), independent of the backend.

The gateway asks "is this address (or account) banned?" on every request, so every read
is answered from an in-memory mirror (`MemoryBanMirror`): a dict lookup, no I/O. The
backends (`sqlite_bans.SqliteBanStore`, `redis_store.RedisBanStore`) keep that mirror in
step with the durable copy: their own writes update it at once, and `refresh()` (called
about once a second by the gateway) reloads it when anyone else (the `apishield bans`
CLI, another gateway instance) wrote.

An IP ban is on one address or, when added with the CLI, on a CIDR network. Exact
addresses are one dict lookup; networks are indexed by (IP version, prefix length), so a
lookup costs one dict probe per distinct prefix length in use, not one per network.
IPv4-mapped IPv6 addresses (`::ffff:203.0.113.7`) count as their IPv4 address, as in
`rate_limiting.ip`, so a dual-stack socket cannot step around a ban.
"""

from __future__ import annotations

import builtins
import ipaddress
from array import array
from dataclasses import dataclass
from typing import Literal, Protocol

BanKind = Literal["ip", "subject"]
KINDS: tuple[BanKind, ...] = ("ip", "subject")
HISTORY_SECONDS = 30 * 86400.0  # bans remembered for escalation (`offenses`)


class BanStoreError(Exception):
    """The durable copy cannot be read or written (disk error, Redis unreachable). The
    in-memory mirror is unaffected: a ban that could not be persisted still applies in
    this process."""


@dataclass(frozen=True, slots=True)
class BanRecord:
    """One ban. `value` is an address, a CIDR network (`203.0.113.0/24`, CLI only) or a
    subject (an account name, for `by: subject` rules)."""

    kind: BanKind
    value: str
    until: float  # epoch seconds; the ban is over at this time
    rule: str  # the rule that fired, or "manual" for `apishield bans add`
    reason: str
    created_at: float
    offense: int  # 1 for a first ban, 2 for the second within HISTORY_SECONDS...

    def active(self, now: float) -> bool:
        return now < self.until


def canonical_value(kind: str, value: str) -> str:
    """The spelling a ban is stored under: IP addresses and networks in their compressed
    form (IPv4-mapped as IPv4, a /32 or /128 as the bare address), subjects unchanged.
    A value that is not an address (a unix-socket peer) is kept as given."""
    if kind not in KINDS:
        raise ValueError(f"unknown ban kind {kind!r}; use ip or subject")
    if kind == "subject":
        return value
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return value
    if network.prefixlen == network.max_prefixlen:
        return str(_unmapped(network.network_address))
    return str(network)


def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The network a stored IP value names, or None for an address (or a non-address
    such as a unix-socket peer, which is only ever matched exactly)."""
    if "/" not in value:
        return None
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None


def _unmapped(ip: ipaddress.IPv4Address | ipaddress.IPv6Address
              ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class MemoryBanMirror:
    """The in-memory view of a ban store: what `banned` answers from.

    Not thread-safe by itself: the live mirror is read and written by one thread (the
    event loop); a backend that reloads on another thread builds a new mirror and swaps
    the reference (an atomic assignment)."""

    def __init__(self) -> None:
        self._ips: dict[str, BanRecord] = {}  # exact addresses and network strings
        self._subjects: dict[str, BanRecord] = {}
        # (IP version, prefix length) -> {network address >> host bits: record}
        self._networks: dict[tuple[int, int], dict[int, BanRecord]] = {}
        # (kind, value) -> creation times of its bans in the last HISTORY_SECONDS
        self._history: dict[tuple[str, str], array[float]] = {}

    @classmethod
    def build(cls, records: list[BanRecord],
              history: dict[tuple[str, str], list[float]]) -> MemoryBanMirror:
        mirror = cls()
        for record in records:
            mirror.put(record)
        for key, times in history.items():
            mirror._history[key] = array("d", sorted(times))
        return mirror

    # -- reads (hot path) ----------------------------------------------------------------

    def banned(self, kind: str, value: str | None, now: float) -> BanRecord | None:
        """The active ban matching `value`, or None. O(1) for an exact match."""
        if not value:
            return None
        if kind == "subject":
            record = self._subjects.get(value)
            return record if record is not None and now < record.until else None
        ips = self._ips
        if not ips:
            return None  # the common case: no IP bans at all
        record = ips.get(value)
        if record is not None and now < record.until:
            return record
        # Another spelling of a banned address (IPv6 case, ::ffff:a.b.c.d) or a network:
        # only then is the address parsed (about 1 us).
        if not self._networks and ":" not in value:
            return None
        return self._parsed(value, now)

    def _parsed(self, value: str, now: float) -> BanRecord | None:
        try:
            ip = _unmapped(ipaddress.ip_address(value))
        except ValueError:
            return None
        spelled = str(ip)
        if spelled != value:
            record = self._ips.get(spelled)
            if record is not None and now < record.until:
                return record
        number = int(ip)
        bits = ip.max_prefixlen
        for (version, prefix), table in self._networks.items():
            if version != ip.version:
                continue
            record = table.get(number >> (bits - prefix))
            if record is not None and now < record.until:
                return record
        return None

    def offenses(self, kind: str, value: str, now: float) -> int:
        times = self._history.get((kind, value))
        if not times:
            return 0
        cutoff = now - HISTORY_SECONDS
        return sum(1 for moment in times if moment > cutoff)

    def active(self, now: float) -> builtins.list[BanRecord]:
        """Every ban in force, oldest first."""
        found = [record for record in (*self._ips.values(), *self._subjects.values())
                 if now < record.until]
        return sorted(found, key=lambda record: (record.created_at, record.kind, record.value))

    def __len__(self) -> int:
        return len(self._ips) + len(self._subjects)

    # -- writes ----------------------------------------------------------------------------

    def put(self, record: BanRecord) -> None:
        """Add or replace the ban on `record.value` (its history is kept separately)."""
        self.remove(record.kind, record.value)
        if record.kind == "subject":
            self._subjects[record.value] = record
            return
        self._ips[record.value] = record
        network = _network(record.value)
        if network is not None:
            bits = network.max_prefixlen
            table = self._networks.setdefault((network.version, network.prefixlen), {})
            table[int(network.network_address) >> (bits - network.prefixlen)] = record

    def remove(self, kind: str, value: str) -> BanRecord | None:
        if kind == "subject":
            return self._subjects.pop(value, None)
        record = self._ips.pop(value, None)
        network = _network(value) if record is not None else None
        if network is not None:
            where = (network.version, network.prefixlen)
            table = self._networks.get(where, {})
            table.pop(int(network.network_address) >> (network.max_prefixlen
                                                        - network.prefixlen), None)
            if not table:
                self._networks.pop(where, None)
        return record

    def remember(self, kind: str, value: str, at: float) -> None:
        """Record that `value` was banned at `at` (for `offenses`)."""
        self._history.setdefault((kind, value), array("d")).append(at)

    def prune(self, now: float) -> int:
        """Forget expired bans and history older than HISTORY_SECONDS; how many bans went.
        Keeps memory bounded in a process that never reloads (nobody else writes)."""
        expired = [record for record in (*self._ips.values(), *self._subjects.values())
                   if now >= record.until]
        for record in expired:
            self.remove(record.kind, record.value)
        cutoff = now - HISTORY_SECONDS
        for key in [key for key, times in self._history.items() if times[-1] <= cutoff]:
            del self._history[key]
        return len(expired)


class BanStore(Protocol):
    """Where bans live. Every method is synchronous and none does network I/O on the
    gateway's hot path: reads come from the mirror, and a backend whose writes would
    block on a network (Redis) queues them for a background thread in the gateway."""

    def banned(self, kind: BanKind, value: str | None, now: float) -> BanRecord | None:
        """The active ban on this address or subject (an IP also matches a banned
        network), from memory."""
        ...

    def ban(self, record: BanRecord) -> None:
        """Add or replace the ban on `record.value`, and count it for `offenses`. Applies
        to this process at once; `BanStoreError` if it could not be made durable (it
        still applies here)."""
        ...

    def lift(self, kind: BanKind, value: str) -> bool:
        """Remove the ban on exactly this value (a network is lifted by its CIDR); False
        if there was none. The offense history is kept: escalation still counts it."""
        ...

    def list(self, now: float) -> builtins.list[BanRecord]:
        """The bans in force, oldest first."""
        ...

    def offenses(self, kind: BanKind, value: str, now: float) -> int:
        """How many bans this value had in the last 30 days (for escalation)."""
        ...

    def refresh(self) -> bool:
        """Bring the mirror up to date with writes made elsewhere (the CLI, another
        gateway); True when it changed. Cheap when nothing changed: the gateway calls it
        about once a second, on its event loop."""
        ...

    def changed(self) -> bool:
        """Whether `refresh()` has something to load (does not consume it)."""
        ...

    def close(self) -> None:
        """Release connections and threads; idempotent."""
        ...
