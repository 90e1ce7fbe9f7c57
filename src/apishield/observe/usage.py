"""Usage per identity and operation (checklist F4), in memory, bounded.

Who calls what, how often, how often refused: the raw counts an operator needs to see a
key that went wild or a client that only probes. Per request one dict entry is bumped; at
most `MAX_PAIRS` (identity, operation) pairs are told apart, past that new identities
count under `other`, so a flood of fresh keys or subjects cannot grow memory.

Two views, both per process (they survive a config reload, like METRICS):
- `Usage` (`USAGE`): requests and refusals in two one-hour intervals (the current one and
  the last), what `GET /usage` shows without parameters;
- `DailyUsage` (`DAILY`): requests, refusals, bytes in and out per UTC day, waiting to be
  added to the state store by `usage_flush` (history lives there, not here).
"""

from __future__ import annotations

import time
from typing import Any

from apishield.state.usage import ANONYMOUS, OTHER, Batch, day_of

__all__ = ["ANONYMOUS", "DAILY", "MAX_PAIRS", "OTHER", "USAGE", "DailyUsage", "Usage"]

INTERVAL = 3600.0  # seconds
MAX_PAIRS = 10_000
DAY = 86_400.0


class Usage:
    def __init__(self, interval: float = INTERVAL, max_pairs: int = MAX_PAIRS,
                 now: float | None = None) -> None:
        self.interval = interval
        self.max_pairs = max_pairs
        self.started = self._start_of(time.time() if now is None else now)
        # (identity, operation) -> [requests, refusals]
        self.current: dict[tuple[str, str], list[int]] = {}
        self.previous: dict[tuple[str, str], list[int]] = {}
        self.previous_started: float | None = None

    def _start_of(self, now: float) -> float:
        return now - now % self.interval

    def count(self, identity: str | None, operation: str, refused: bool, now: float) -> None:
        if now - self.started >= self.interval:
            self._roll(now)
        key = (identity or ANONYMOUS, operation)
        counts = self.current.get(key)
        if counts is None:
            if len(self.current) >= self.max_pairs:
                key = (OTHER, operation)
            counts = self.current.setdefault(key, [0, 0])
        counts[0] += 1
        if refused:
            counts[1] += 1

    def _roll(self, now: float) -> None:
        start = self._start_of(now)
        if start - self.started >= 2 * self.interval:  # idle for a whole interval
            self.previous, self.previous_started = {}, start - self.interval
        else:
            self.previous, self.previous_started = self.current, self.started
        self.current = {}
        self.started = start

    def report(self, top: int, now: float | None = None) -> dict[str, Any]:
        """The busiest `top` pairs of each interval, and what the rest adds up to."""
        now = time.time() if now is None else now
        if now - self.started >= self.interval:
            self._roll(now)
        return {
            "interval_seconds": self.interval,
            "current": _interval(self.current, self.started, top),
            "previous": (None if self.previous_started is None
                         else _interval(self.previous, self.previous_started, top)),
        }


def _interval(counts: dict[tuple[str, str], list[int]], started: float,
              top: int) -> dict[str, Any]:
    ranked = sorted(counts.items(), key=lambda item: (-item[1][0], item[0]))
    shown = ranked[:top]
    rest = ranked[top:]
    return {
        "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "pairs": len(counts),
        "top": [{"identity": identity, "operation": operation, "requests": c[0],
                 "refusals": c[1]} for (identity, operation), c in shown],
        "rest": {"requests": sum(c[0] for _, c in rest),
                 "refusals": sum(c[1] for _, c in rest)},
    }


class DailyUsage:
    """Counts per (UTC day, identity, operation) not yet in the store: `take()` hands them
    to a flush and starts afresh; `restore()` puts back what a failed flush did not store,
    so the next flush retries it and nothing is lost or counted twice. At most `max_pairs`
    pairs are told apart per day in this process (the store bounds the sum of all
    processes the same way)."""

    def __init__(self, max_pairs: int = MAX_PAIRS) -> None:
        self.max_pairs = max_pairs
        # (day, identity, operation) -> [requests, refusals, bytes in, bytes out]
        self.pending: Batch = {}
        self._day = ""
        self._day_start = 0.0
        self._day_end = 0.0
        self._pairs: set[tuple[str, str]] = set()  # told apart today (bounded)

    def count(self, identity: str | None, operation: str, refused: bool, bytes_in: int,
              bytes_out: int, now: float) -> None:
        if not self._day_start <= now < self._day_end:
            self._new_day(now)
        identity = identity or ANONYMOUS
        # a key already pending today is a pair already told apart (or already `other`):
        # one lookup, no pair bookkeeping, on nearly every request
        counts = self.pending.get((self._day, identity, operation))
        if counts is None:
            counts = self._new_key(identity, operation)
        counts[0] += 1
        if refused:
            counts[1] += 1
        counts[2] += bytes_in
        counts[3] += bytes_out

    def _new_key(self, identity: str, operation: str) -> list[int]:
        """The counts of a key not pending yet: a pair not told apart today is, while
        there is room (`max_pairs`); past that it counts as `other`."""
        pair = (identity, operation)
        if pair not in self._pairs:
            if len(self._pairs) >= self.max_pairs:
                identity = OTHER
            else:
                self._pairs.add(pair)
        key = (self._day, identity, operation)
        counts = self.pending.get(key)
        if counts is None:
            counts = self.pending[key] = [0, 0, 0, 0]
        return counts

    def _new_day(self, now: float) -> None:
        start = now - now % DAY
        self._day, self._day_start, self._day_end = day_of(start), start, start + DAY
        self._pairs = set()

    def take(self) -> Batch:
        """What was counted since the last `take()`; the caller must store it or
        `restore()` it."""
        batch, self.pending = self.pending, {}
        return batch

    def restore(self, batch: Batch) -> None:
        """Add back counts a flush could not store (they were bounded when counted)."""
        for key, counts in batch.items():
            mine = self.pending.get(key)
            if mine is None:
                self.pending[key] = counts
            else:
                for index, value in enumerate(counts):
                    mine[index] += value


USAGE = Usage()  # per process, like METRICS: it survives a config reload
DAILY = DailyUsage()  # likewise: a reload neither loses nor repeats what is pending
