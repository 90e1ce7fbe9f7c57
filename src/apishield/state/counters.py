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

import logging
import math
import time
from typing import Protocol

from apishield.observe.metrics import METRICS

logger = logging.getLogger("apishield.state")

SUMMARY_EVERY = 5.0  # seconds between the counts an outage of the store logs


class Decision:
    """One limit's answer for one request (never changed once made). A plain class, not a
    dataclass: in the compiled build a dataclass keeps its generated, interpreted
    `__init__`, one interpreted call per request (issue 18)."""

    __slots__ = ("allowed", "limit", "remaining", "reset_after", "retry_after")

    def __init__(self, allowed: bool, limit: int, remaining: int, reset_after: float,
                 retry_after: float) -> None:
        self.allowed = allowed
        self.limit = limit  # the capacity the client sees (`q` of RateLimit-Policy)
        self.remaining = remaining  # requests still admitted right now (`r` of RateLimit)
        self.reset_after = reset_after  # seconds until the full capacity is back (`t`)
        self.retry_after = retry_after  # seconds until one more would pass (0: allowed)

    def __repr__(self) -> str:
        return (f"Decision(allowed={self.allowed}, limit={self.limit}, remaining="
                f"{self.remaining}, reset_after={self.reset_after}, "
                f"retry_after={self.retry_after})")


class StoreUnavailable(Exception):
    """The shared store cannot answer; the step applies `on_store_error`."""


class StoreOutage:
    """An outage of the shared counters store, logged as one event, not once a request
    (that was 1,508 lines in 10 s): a line when it starts, with the reason; while it lasts,
    at most one line every `every` seconds with the count of requests `on_store_error`
    decided; a line when the store answers again, with the duration and the totals.

    The backend calls `down` on a failed round trip and `up` on a good one; the rate-limit
    step calls `request` for each request it decided without the store (which also opens
    an outage the backend did not report) and sets `policy`, the text of what happens to
    those requests. Counts and summaries come with requests: an idle gateway logs nothing
    until its next request or the recovery. Messages never hold a password: `where` is a
    redacted URL and the backend masks the reason.
    """

    def __init__(self, where: str = "rate-limit store", every: float = SUMMARY_EVERY) -> None:
        self.where = where
        self.every = every
        self.policy = "refused with 503 (on_store_error: deny)"
        self.since: float | None = None  # monotonic start of the outage in progress
        self.reason = ""
        self.affected = 0  # requests decided without the store in this outage
        self._summary_at = 0.0
        self._summarized = 0  # `affected` at the last summary

    @property
    def ongoing(self) -> bool:
        return self.since is not None

    def down(self, reason: str) -> None:
        if self.since is not None:
            self.reason = reason
            return
        now = time.monotonic()
        self.since = self._summary_at = now
        self.reason = reason
        self.affected = self._summarized = 0
        logger.warning("rate-limit store %s is unavailable (%s): requests under a rate limit "
                       "or quota are %s until it answers; a count follows every %g s",
                       self.where, reason, self.policy, self.every)

    def request(self) -> None:
        """One request decided by `on_store_error` (refused or let through)."""
        METRICS.state_error()
        if self.since is None:
            self.down("no answer from the store")
        self.affected += 1
        now = time.monotonic()
        if now - self._summary_at >= self.every:
            assert self.since is not None
            logger.warning("rate-limit store %s still unavailable after %.0f s (%s): %d "
                           "request(s) %s in the last %.1f s, %d since it went down",
                           self.where, now - self.since, self.reason,
                           self.affected - self._summarized, self.policy,
                           now - self._summary_at, self.affected)
            self._summary_at = now
            self._summarized = self.affected

    def up(self) -> None:
        if self.since is None:
            return
        duration = time.monotonic() - self.since
        logger.warning("rate-limit store %s is reachable again after %.1f s: %d request(s) "
                       "%s during the outage; limits whose counters Redis lost (a restart "
                       "without persistence) start full again", self.where, duration,
                       self.affected, self.policy)
        self.since = None
        self.affected = self._summarized = 0


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
