"""Rate-limit and quota counters: the protocol every backend implements, and the
in-process backend (the embedded default: no server).

Shaped by what the rate-limit step needs (Kong's `{increment, usage}` lesson): take one
request against a key, answer at once. Both calls are synchronous because the step runs
on the hot path; a backend that must do I/O first (Redis, when its local lease of a key is
spent) returns None, and the step suspends on `prepare()` and asks again.

GCRA (generic cell rate algorithm, as in redis-cell): each key holds one number, the
theoretical arrival time (TAT). With emission interval T = period / count and capacity
`burst`, a request at `now` is admitted when `max(TAT, now) + T - now <= burst * T`, and
then TAT becomes `max(TAT, now) + T`. A refused request changes nothing, so being refused
never costs a client quota (issue 5: no lock-out by retrying). There are no windows, so
no doubling at a window boundary, and it is exact with one float per key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int  # the capacity the client sees (`q` of RateLimit-Policy)
    remaining: int  # requests still admitted right now (`r` of RateLimit)
    reset_after: float  # seconds until the full capacity is back (`t` of RateLimit)
    retry_after: float  # seconds until one more request would pass (0 when allowed)


class StoreUnavailable(Exception):
    """The shared store cannot answer; the step applies `on_store_error`."""


class Counters(Protocol):
    def take(self, key: str, interval: float, burst: int, now: float) -> Decision | None:
        """One request against a GCRA limit. None: call `await prepare(...)` first."""
        ...

    async def prepare(self, key: str, interval: float, burst: int) -> None:
        """Do the I/O `take` needs for `key` (lease tokens, load state); never raises
        for a refusal; raises StoreUnavailable when the store is down."""
        ...

    def count(self, key: str, limit: int, expires_at: float, now: float) -> Decision | None:
        """One request against a quota that resets at `expires_at` (epoch seconds)."""
        ...

    async def prepare_count(self, key: str, limit: int, expires_at: float) -> None: ...

    def sweep(self, now: float) -> None:
        """Forget what has no effect any more (full buckets, past periods)."""
        ...

    async def close(self) -> None: ...


def gcra(tat: float, now: float, interval: float, burst: int) -> tuple[bool, float, Decision]:
    """The GCRA decision for one request: (allowed, new TAT, decision). Shared by the
    memory backend and the Redis backend's local leases so both decide alike."""
    base = tat if tat > now else now
    new_tat = base + interval
    capacity = burst * interval
    if new_tat - now <= capacity + 1e-9:
        remaining = math.floor((capacity - (new_tat - now)) / interval + 1e-9)
        return True, new_tat, Decision(True, burst, remaining, new_tat - now, 0.0)
    retry = new_tat - capacity - now
    return False, tat, Decision(False, burst, 0, base - now, retry)


class MemoryCounters:
    """Counters of this process only: exact, ~1 us a decision (PERF-BASELINE: an
    in-process bucket in a dict costs 0.8 us). Memory is bounded by `sweep`, which drops
    keys whose bucket is full again (they would decide exactly like an absent key)."""

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}
        self._quota: dict[str, tuple[int, float]] = {}  # key -> (count, expires_at)

    def take(self, key: str, interval: float, burst: int, now: float) -> Decision:
        allowed, tat, decision = gcra(self._tat.get(key, 0.0), now, interval, burst)
        if allowed:
            self._tat[key] = tat
        return decision

    async def prepare(self, key: str, interval: float, burst: int) -> None:
        return None

    def count(self, key: str, limit: int, expires_at: float, now: float) -> Decision:
        used, until = self._quota.get(key, (0, expires_at))
        if until <= now:
            used, until = 0, expires_at
        if used >= limit:
            return Decision(False, limit, 0, until - now, until - now)
        self._quota[key] = (used + 1, until)
        return Decision(True, limit, limit - used - 1, until - now, 0.0)

    async def prepare_count(self, key: str, limit: int, expires_at: float) -> None:
        return None

    def sweep(self, now: float) -> None:
        self._tat = {key: tat for key, tat in self._tat.items() if tat > now}
        self._quota = {key: entry for key, entry in self._quota.items() if entry[1] > now}

    async def close(self) -> None:
        return None
