"""A short past of the metrics, so the admin dashboard's charts have one on first load.

The counters in `metrics.py` only ever grow; a rate is the difference of two readings
over the time between them. `History` takes a reading every `INTERVAL` seconds (the
gateway's admin listener runs `sample_forever`; the middleware, which has no task of its
own, samples when the dashboard asks) and keeps the last `WINDOW` seconds of them in a
ring: a few scalar totals and the refusal reasons that moved since the reading before,
so a sample costs a few integers whatever the number of operations.

Latency per operation needs the histograms, which are larger (one per operation): those
are copied once a minute only, and the dashboard's latency is "now minus the oldest copy
kept", the last few minutes. All of it is read from `METRICS` on the admin side: the
request path does not know this module exists.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from apishield.observe.metrics import DURATION_BUCKETS, METRICS, Metrics

INTERVAL = 2.0  # seconds between samples
WINDOW = 600.0  # seconds of samples kept
LATENCY_EVERY = 60.0  # seconds between histogram copies
LATENCY_COPIES = 5  # copies kept: latency covers the last 4 to 5 minutes


@dataclass(frozen=True, slots=True)
class Sample:
    """The totals at time `at` (epoch seconds), and the refusals by reason since the
    sample before (only the reasons that moved)."""

    at: float
    requests: int
    refused: int
    errors: int
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LatencyCopy:
    at: float
    histograms: dict[str, tuple[int, ...]]  # operation -> per-bucket counts (not cumulative)
    sums: dict[str, float]


class History:
    def __init__(self, metrics: Metrics = METRICS, interval: float = INTERVAL,
                 window: float = WINDOW) -> None:
        self.metrics = metrics
        self.interval = interval
        self.samples: deque[Sample] = deque(maxlen=max(2, int(window / interval) + 1))
        self.latency: deque[LatencyCopy] = deque(maxlen=LATENCY_COPIES)
        self._reasons: dict[str, int] = {}  # the refusal totals at the last sample

    def tick(self, now: float | None = None) -> bool:
        """Take a sample if the last is `interval` old or more (on time drift, a caller
        early by a few milliseconds waits for the next tick). Whether one was taken."""
        now = time.time() if now is None else now
        last = self.samples[-1].at if self.samples else None
        if last is not None and 0 <= now - last < self.interval * 0.9:  # (clock set back: take one)
            return False
        self.samples.append(self._read(now))
        if not self.latency or now - self.latency[-1].at >= LATENCY_EVERY:
            self.latency.append(self._copy_latency(now))
        return True

    def _read(self, now: float) -> Sample:
        requests, refused, errors = totals(self.metrics)
        by_reason = dict(self.metrics.refusals)
        before = self._reasons
        moved = {reason: total - before.get(reason, 0) for reason, total in by_reason.items()
                 if total != before.get(reason, 0)} if self.samples else {}  # first: a base
        self._reasons = by_reason
        return Sample(now, requests, refused, errors, moved)

    def _copy_latency(self, now: float) -> LatencyCopy:
        durations = list(self.metrics.durations.items())
        return LatencyCopy(now, {op: tuple(h.counts) for op, h in durations},
                           {op: h.sum for op, h in durations})

    def latency_since(self) -> LatencyCopy | None:
        """The oldest histogram copy kept (None before the first sample)."""
        return self.latency[0] if self.latency else None


def totals(metrics: Metrics) -> tuple[int, int, int]:
    """Requests, refused requests and errors counted so far."""
    requests = refused = errors = 0
    for key, count in list(metrics.requests.items()):
        requests += count
        if key[3] == "refused":
            refused += count
        elif key[3] == "error":
            errors += count
    return requests, refused, errors


def quantile(counts: list[int] | tuple[int, ...], q: float) -> float | None:
    """The `q` quantile (0..1) in seconds of per-bucket counts over DURATION_BUCKETS,
    interpolated linearly inside its bucket as Prometheus's histogram_quantile does; the
    largest finite bound when it falls in +Inf; None without observations."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index >= len(DURATION_BUCKETS):
                return DURATION_BUCKETS[-1]
            lower = DURATION_BUCKETS[index - 1] if index else 0.0
            upper = DURATION_BUCKETS[index]
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return DURATION_BUCKETS[-1]  # pragma: no cover - rank <= total always lands above


async def sample_forever(history: History,
                         sample: Callable[[], Awaitable[None]] | None = None) -> None:
    """Sample every `history.interval` seconds until cancelled (the admin listener's
    task: its close cancels it). `sample`, when given, takes the sample instead of
    `history.tick()` (worker 0 of `serve --workers N` first adds up every worker's
    figures)."""
    while True:
        if sample is None:
            history.tick()
        else:
            await sample()
        await asyncio.sleep(history.interval)


# One per process, as METRICS, whose past it keeps.
HISTORY = History()
