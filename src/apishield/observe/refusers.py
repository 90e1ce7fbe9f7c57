"""The clients refused most often, for the admin dashboard's "top refused clients" panel.

Why not a metric: a client address is unbounded input, and a Prometheus label per address
would let any scanner grow every scrape (metrics.py keeps its labels bounded by
construction). This table is read only by the dashboard, per process, and fed only on a
refusal (`Pipeline.record`), so an allowed request pays nothing for it.

Bounded memory under a flood of fresh addresses (IPv6, spoofed peers behind a trusted
proxy): past `2 * keep` entries the table keeps its `keep` most refused addresses and
drops the rest at once. Sorting once every `keep` new addresses is O(log keep) per
address amortized, where a strict space-saving counter would scan for its minimum on
every new address. The price: an address dropped and seen again restarts from zero, so
a count is a lower bound; an address refused often enough to matter stays in the table.
"""

from __future__ import annotations

from dataclasses import dataclass

KEEP = 500  # addresses kept after a prune; the table holds at most twice as many


@dataclass(slots=True)
class Refuser:
    """One client address: how often refused, and the latest refusal's reason and time."""

    ip: str
    refusals: int
    last_reason: str
    last_at: float

    def as_dict(self) -> dict[str, str | int | float]:
        return {"ip": self.ip, "refusals": self.refusals, "last_reason": self.last_reason,
                "last_at": self.last_at}


class Refusers:
    def __init__(self, keep: int = KEEP) -> None:
        self.keep = keep
        self._table: dict[str, Refuser] = {}
        self.pruned = 0  # addresses dropped by prunes, for the dashboard's footnote

    def count(self, ip: str | None, reason: str | None, now: float) -> None:
        """One refused request from `ip` (None: the front end did not know the peer)."""
        key = ip or "unknown"
        entry = self._table.get(key)
        if entry is None:
            if len(self._table) >= 2 * self.keep:
                self._prune()
            self._table[key] = Refuser(key, 1, reason or "", now)
            return
        entry.refusals += 1
        entry.last_reason = reason or ""
        entry.last_at = now

    def _prune(self) -> None:
        kept = sorted(self._table.values(), key=lambda r: (r.refusals, r.last_at),
                      reverse=True)[:self.keep]
        self.pruned += len(self._table) - len(kept)
        self._table = {entry.ip: entry for entry in kept}

    def top(self, n: int) -> list[Refuser]:
        """The `n` most refused addresses, most refused first (the latest first on a tie)."""
        entries = list(self._table.values())
        entries.sort(key=lambda r: (r.refusals, r.last_at), reverse=True)
        return entries[:n]

    def __len__(self) -> int:
        return len(self._table)


# One per process, as METRICS: it survives a config reload.
REFUSERS = Refusers()
