#!/usr/bin/env python3
"""What counting for /metrics costs per request, in a loop (issue 13): the calls
`Pipeline.record` makes when `metrics.enabled` (METRICS.request + USAGE.count) and the
upstream connection's `upstream_duration.observe`, on the pass-through's request (one
operation, GET, 200, allowed, no principal, no reason).

The wrk comparison (`bench/run --only metrics`) measures the same thing in situ, where
the machine's noise is larger than the effect; this loop gives its size without that noise.
In situ, Python code runs ~2.5x slower than in a loop here (bench/RESULTS.md, issue 2: the
per-request working set competes with the kernel's for the caches), so read these figures
as a floor.

Measured in `--repeat` alternating rounds; figures are medians over rounds (us per call),
each minus an empty loop calling a function with the same arguments (the call overhead
that `record` pays anyway is not the metrics' cost). For comparison, the same counter and
histogram as prometheus_client objects with `.labels()` per request (what
observe/metrics.py avoids).

    .venv/bin/python bench/metrics_hotpath.py [--repeat 7] [--number 300000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram

from apishield.observe.metrics import DURATION_BUCKETS, Histogram, Metrics
from apishield.observe.usage import Usage

OPERATION = "GET /item"


def _noop(*args: object) -> None:
    return None


def per_call(fn: Callable[[int], None], number: int) -> float:
    start = time.perf_counter()
    fn(number)
    return (time.perf_counter() - start) / number


def loop_empty(number: int) -> None:
    f = _noop
    for _ in range(number):
        f(OPERATION, "GET", 200, "allowed", 0.0012, None)


def loop_request(number: int) -> None:
    f = Metrics().request
    for _ in range(number):
        f(OPERATION, "GET", 200, "allowed", 0.0012, None)


def loop_usage(number: int) -> None:
    f = Usage().count
    now = time.time
    for _ in range(number):
        f(None, OPERATION, False, now())


def loop_observe1(number: int) -> None:
    f = Histogram().observe
    for _ in range(number):
        f(0.0012)


def loop_empty1(number: int) -> None:
    f = _noop
    for _ in range(number):
        f(0.0012)


def loop_record_block(number: int) -> None:
    """The metrics part of `Pipeline.record` as written there (the label, the call, the
    principal test, the usage count with its `time.time()`)."""
    metrics, usage = Metrics(), Usage()
    now = time.time
    principal: str | None = None
    outcome: str = "allowed"
    for _ in range(number):
        label = OPERATION
        metrics.request(label, "GET", 200, outcome, 0.0012, None)
        usage.count(None if principal is None else principal, label or "unmatched",
                    outcome == "refused", now())


def loop_prometheus_client(number: int) -> None:
    """What metrics.py's docstring compares with: the same counter and histogram as
    prometheus_client objects, `.labels()` on every request."""
    registry = CollectorRegistry()
    counter = PromCounter("requests", "", ["operation", "method", "status", "outcome"],
                          registry=registry)
    histogram = PromHistogram("duration", "", ["operation"], buckets=DURATION_BUCKETS,
                              registry=registry)
    for _ in range(number):
        counter.labels(OPERATION, "GET", 200, "allowed").inc()
        histogram.labels(OPERATION).observe(0.0012)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--number", type=int, default=300_000)
    args = ap.parse_args()
    cases: dict[str, tuple[Callable[[int], None], Callable[[int], None]]] = {
        "METRICS.request (counter + duration histogram)": (loop_request, loop_empty),
        "USAGE.count (with time.time())": (loop_usage, loop_empty),
        "record()'s metrics block (both, as in pipeline.py)": (loop_record_block, loop_empty),
        "upstream_duration.observe": (loop_observe1, loop_empty1),
        "for comparison: prometheus_client Counter + Histogram": (loop_prometheus_client,
                                                                   loop_empty),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeat):
        for name, (fn, base) in cases.items():
            samples[name].append(per_call(fn, args.number) - per_call(base, args.number))
    print(f"us per call, median of {args.repeat} rounds of {args.number:,} calls "
          "(minus an empty call with the same arguments):")
    for name, values in samples.items():
        us = [v * 1e6 for v in values]
        print(f"  {name:<52} {statistics.median(us):6.3f}  "
              f"(min {min(us):.3f}, max {max(us):.3f})")


if __name__ == "__main__":
    main()
