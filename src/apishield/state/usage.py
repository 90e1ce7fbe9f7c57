"""Usage counts per UTC day, identity and operation (checklist F4): the store protocol the
gateway flushes into and `apishield usage` / `GET /usage` read.

Writes *add* (never set): several gateways flushing their own counts into one store add
up, and a batch retried after a failed flush is added once it gets through. A store keeps
at most `max_pairs` (identity, operation) pairs per day; counts of a pair past the bound
go under identity `other` (with their operation: operations are bounded by the contract).
Days are `YYYY-MM-DD` in UTC; months are derived from days by the readers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, TypedDict

OTHER = "other"
ANONYMOUS = "anonymous"


class UsageStoreError(Exception):
    """The store could not be read or written (the flush keeps its batch and retries)."""


@dataclass(frozen=True, slots=True)
class UsageRow:
    day: str  # YYYY-MM-DD, UTC
    identity: str
    operation: str
    requests: int
    refusals: int
    bytes_in: int
    bytes_out: int


# one flush: (day, identity, operation) -> [requests, refusals, bytes_in, bytes_out]
Batch = dict[tuple[str, str, str], list[int]]


def day_of(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def first_day(now: float, days: int) -> str:
    """The first of the last `days` UTC days, today included."""
    return day_of(now - (days - 1) * 86_400.0)


class UsageStore(Protocol):
    def add(self, batch: Batch, max_pairs: int, retention_days: int) -> None:
        """Add `batch` to what is stored (bounded per day by `max_pairs`), and forget days
        older than `retention_days`. Entries are removed from `batch` as they are stored:
        on UsageStoreError, `batch` holds exactly what was not added (retry it)."""

    def query(self, since_day: str, identity: str | None = None,
              operation: str | None = None) -> list[UsageRow]:
        """The rows of `since_day` and later (optionally one identity and/or operation),
        ordered by day, identity, operation."""

    def close(self) -> None: ...


REPORT_VERSION = 1  # of the JSON `apishield usage --format json` and `GET /usage?since=` give
PERIODS = ("day", "month")
COUNTS = ("requests", "refusals", "bytes_in", "bytes_out")
MAX_SINCE = 3660 * 86_400.0  # how far back a report may reach (ten years: past any retention)


def since_days(seconds: float) -> int:
    """`--since 7d` / `?since=7d` as whole UTC days back, today included (at least 1)."""
    return max(1, -int(-seconds // 86_400))


class UsageReport(TypedDict):
    version: int
    by: str
    since: str
    rows: list[dict[str, str | int]]  # period, identity, operation and the COUNTS
    total: dict[str, int]  # the COUNTS summed


def report(rows: list[UsageRow], by: str, since_day: str) -> UsageReport:
    """The rows summed per period (`day`, or `month`: `YYYY-MM`, derived from the days),
    identity and operation, with their total: what the CLI and the admin API print."""
    width = 10 if by == "day" else 7
    sums: dict[tuple[str, str, str], list[int]] = {}
    for row in rows:
        key = (row.day[:width], row.identity, row.operation)
        counts = sums.setdefault(key, [0, 0, 0, 0])
        for index, value in enumerate((row.requests, row.refusals, row.bytes_in,
                                       row.bytes_out)):
            counts[index] += value
    total = [sum(counts[index] for counts in sums.values()) for index in range(4)]
    return {
        "version": REPORT_VERSION,
        "by": by,
        "since": since_day,
        "rows": [{"period": period, "identity": identity, "operation": operation,
                  **dict(zip(COUNTS, counts, strict=True))}
                 for (period, identity, operation), counts in sorted(sums.items())],
        "total": dict(zip(COUNTS, total, strict=True)),
    }
