"""`usage:` (checklist F4): how the per-identity, per-operation usage counts are kept.

The gateway counts in memory on the request path and writes the counts to the state store
(the SQLite file, or Redis when `state` is a Redis URL) every `flush_interval` and at
shutdown, so the request path never waits on a disk or a network. `max_pairs` bounds how
many (identity, operation) pairs one day tells apart (the rest count under identity
`other`): a flood of fresh API keys or token subjects cannot grow memory or the store.
`retention`: days older than this are deleted (SQLite) or expire (Redis).
"""

from __future__ import annotations

from pydantic import Field, field_validator

from apishield.config.units import Model, Seconds

DAY = 86_400.0
MAX_FLUSH_INTERVAL = 3600.0


class Usage(Model):
    enabled: bool = True
    flush_interval: Seconds = 10.0
    max_pairs: int = Field(default=10_000, ge=1, le=1_000_000)
    retention: Seconds = 400 * DAY

    @field_validator("flush_interval")
    @classmethod
    def _check_interval(cls, value: float) -> float:
        if value > MAX_FLUSH_INTERVAL:
            raise ValueError(f"{value:g}s is longer than 1h: a crash would lose that much "
                             "usage; write e.g. 10s")
        return value

    @field_validator("retention")
    @classmethod
    def _check_retention(cls, value: float) -> float:
        if value < DAY:
            raise ValueError(f"{value:g}s is shorter than a day: usage is kept per UTC "
                             "day; write e.g. 400d")
        return value

    @property
    def retention_days(self) -> int:
        """Whole days kept (the day in progress counts as one)."""
        return max(1, int(self.retention // DAY))
