"""Usage per identity and operation (checklist F4), in memory, bounded.

Who calls what, how often, how often refused: the raw counts an operator needs to see a
key that went wild or a client that only probes. Per request one dict entry is bumped; at
most `MAX_PAIRS` (identity, operation) pairs are told apart in an interval, past that new
identities count under `other`, so a flood of fresh keys or subjects cannot grow memory.
Two intervals are kept (the current one and the last): enough for "what happened in the
last hour"; history and persistence belong to the state store (the alerts issue).
"""

from __future__ import annotations

import time
from typing import Any

INTERVAL = 3600.0  # seconds
MAX_PAIRS = 10_000
OTHER = "other"
ANONYMOUS = "anonymous"


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


USAGE = Usage()  # per process, like METRICS: it survives a config reload
