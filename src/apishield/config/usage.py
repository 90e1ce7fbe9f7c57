"""`usage:` (checklist F4): how the per-identity, per-operation usage counts are kept.

The gateway counts in memory on the request path and writes the counts to the state store
(the SQLite file, or Redis when `state` is a Redis URL) every `flush_interval` and at
shutdown, so the request path never waits on a disk or a network. `max_pairs` bounds how
many (identity, operation) pairs one day tells apart (the rest count under identity
`other`): a flood of fresh API keys or token subjects cannot grow memory or the store.
`retention`: days older than this are deleted (SQLite) or expire (Redis).
"""

from __future__ import annotations

from pydantic import Field

from apishield.config.units import Model, Seconds

DAY = 86_400.0


class Usage(Model):
    enabled: bool = True
    flush_interval: Seconds = Field(default=10.0, le=3600.0)
    max_pairs: int = Field(default=10_000, ge=1, le=1_000_000)
    retention: Seconds = Field(default=400 * DAY, ge=DAY)

    @property
    def retention_days(self) -> int:
        """Whole days kept (the day in progress counts as one)."""
        return max(1, int(self.retention // DAY))
