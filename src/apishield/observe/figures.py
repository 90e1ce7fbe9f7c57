"""One process's figures as a plain document, and the sum of several (`serve --workers N`).

Why: under `apishield serve --workers N` every worker counts its own requests in its own
`METRICS`, `USAGE`, `REFUSERS` and `ALERT_FEED` (plain dict increments on the request
path, as in a lone gateway), but only worker 0 serves the admin API. When it answers
`/metrics`, `/usage` or the dashboard it needs every worker's figures added up. This
module is the data half of that: `take()` copies this process's figures into a
JSON-ready document (orjson frames between the workers and the supervisor), `add()`
sums documents, and `view()` turns a document back into the objects the admin API reads.
The channel that carries the documents is `observe/figures_channel.py`.

How the figures add up:
- counters and histograms: summed key by key (histograms bucket by bucket, their sums
  too); a table may hold more than `MAX_SERIES` keys once summed (at most N times as
  many: each worker bounds its own);
- `apishield_worker_restarts_total`: the supervisor's one count, which every worker
  copies: the largest, never a sum;
- usage per identity and operation (`GET /usage`): the hourly intervals start on the
  hour in every process, so intervals with the same start are summed; an interval that
  is older than the newest document's previous one is over and dropped;
- the most refused clients: summed per address from each worker's top `REFUSERS_SENT`
  (a lower bound, as each worker's table already is);
- alerts: `fired` summed, the newest `ALERTS_SENT` of all kept.

Nothing here runs on the request path: `take()` runs when the supervisor asks for the
figures (a scrape, the dashboard's poll or its 2 s sampler), `add()` and `view()` in the
supervisor and in worker 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from apishield.observe.alert_feed import ALERT_FEED, AlertFeed, FiredAlert
from apishield.observe.metrics import METRICS, Histogram, Metrics
from apishield.observe.refusers import REFUSERS, Refuser, Refusers
from apishield.observe.usage import USAGE, Usage

Document = dict[str, Any]

# Metrics' tables of counts keyed by a label tuple (or a label), and its scalar counts
TABLES = ("requests", "refusals", "auth_attempts", "rate_limited", "upstream_errors",
          "jwks_refreshes", "config_reloads", "alerts", "alert_deliveries")
SCALARS = ("state_errors", "usage_flush_errors", "audit_records", "audit_errors",
           "figures_late")
REFUSERS_SENT = 100  # per worker: the dashboard shows the top 10 of their sum
ALERTS_SENT = 20  # the dashboard shows the newest 20


@dataclass(slots=True)
class View:
    """What the admin API reads: one process's own objects, or the sum of every
    worker's (then built anew for each answer and never counted into)."""

    metrics: Metrics
    usage: Usage
    refusers: Refusers
    alerts: AlertFeed


def local() -> View:
    """This process's own figures (a lone gateway, the middleware)."""
    return View(METRICS, USAGE, REFUSERS, ALERT_FEED)


def take(source: View | None = None) -> Document:
    """A copy of `source`'s figures (this process's by default) as a JSON-ready document.
    `list(...)` before each walk: a request's increments never change a table mid-copy
    (this runs on the event loop, between requests, so it cannot anyway)."""
    source = source or local()
    m = source.metrics
    usage = source.usage
    now = time.time()
    if now - usage.started >= usage.interval:  # an idle worker's hour is over: roll it
        usage.report(0, now)
    return {
        "metrics": {
            **{name: [[*_key(key), count] for key, count in list(getattr(m, name).items())]
               for name in TABLES},
            **{name: int(getattr(m, name)) for name in SCALARS},
            "durations": [[operation, list(h.counts), h.sum]
                          for operation, h in list(m.durations.items())],
            "upstream_duration": [list(m.upstream_duration.counts), m.upstream_duration.sum],
            "worker_restarts": m.worker_restarts,
        },
        "usage": {
            "interval": usage.interval,
            "started": usage.started,
            "current": [[*pair, *counts] for pair, counts in list(usage.current.items())],
            "previous_started": usage.previous_started,
            "previous": [[*pair, *counts] for pair, counts in list(usage.previous.items())],
        },
        "refusers": [[r.ip, r.refusals, r.last_reason, r.last_at]
                     for r in source.refusers.top(REFUSERS_SENT)],
        "alerts": {"fired": source.alerts.fired,
                   "recent": [alert.as_dict() for alert in source.alerts.recent(ALERTS_SENT)]},
    }


def _key(key: Any) -> list[Any]:
    return list(key) if isinstance(key, tuple) else [key]


def add(documents: list[Document]) -> Document:
    """The sum of `documents` (see the module docstring for what "sum" means of each)."""
    return take(view(documents))


def view(documents: list[Document]) -> View:
    """The objects the admin API reads, holding the sum of `documents`."""
    metrics = Metrics()
    usages: list[Document] = []
    refusers: dict[str, Refuser] = {}
    feed = AlertFeed()
    recent: list[dict[str, Any]] = []
    for document in documents:
        _add_metrics(metrics, document["metrics"])
        usages.append(document["usage"])
        for ip, count, reason, at in document["refusers"]:
            known = refusers.get(ip)
            if known is None:
                refusers[ip] = Refuser(ip, int(count), reason, float(at))
            else:
                known.refusals += int(count)
                if at > known.last_at:
                    known.last_reason, known.last_at = reason, float(at)
        feed.fired += int(document["alerts"]["fired"])
        recent.extend(document["alerts"]["recent"])
    table = Refusers()
    table._table = refusers  # a sum, built whole, never counted into
    recent.sort(key=lambda alert: alert["at"])
    for alert in recent[-ALERTS_SENT:]:
        feed._alerts.append(FiredAlert(**alert))  # as above
    return View(metrics, _usage(usages), table, feed)


def _add_metrics(into: Metrics, part: Document) -> None:
    for name in TABLES:
        table: dict[Any, int] = getattr(into, name)
        for *labels, count in part[name]:
            key = labels[0] if len(labels) == 1 else tuple(labels)
            table[key] = table.get(key, 0) + int(count)
    for name in SCALARS:
        setattr(into, name, getattr(into, name) + int(part[name]))
    for operation, counts, seconds in part["durations"]:
        histogram = into.durations.get(operation)
        if histogram is None:
            histogram = into.durations[operation] = Histogram()
        _add_histogram(histogram, counts, seconds)
    _add_histogram(into.upstream_duration, *part["upstream_duration"])
    into.worker_restarts = max(into.worker_restarts, int(part["worker_restarts"]))


def _add_histogram(into: Histogram, counts: list[int], seconds: float) -> None:
    if len(counts) != len(into.counts):  # another bucket layout (another version): skip
        return
    for index, count in enumerate(counts):
        into.counts[index] += int(count)
    into.sum += float(seconds)


def _usage(parts: list[Document]) -> Usage:
    """The hourly usage of every part: intervals of the same start summed; the newest
    start is the current interval, the one an interval before it the previous."""
    if not parts:
        return Usage()
    interval = float(parts[0]["interval"])
    started = max(float(part["started"]) for part in parts)
    usage = Usage(interval, now=started)
    usage.previous_started = None
    for part in parts:
        for start, rows in ((part["started"], part["current"]),
                            (part["previous_started"], part["previous"])):
            if start is None:
                continue
            if start == started:
                into = usage.current
            elif start == started - interval:
                into = usage.previous
                usage.previous_started = start
            else:
                continue  # over for longer than the previous interval
            for identity, operation, requests, refusals in rows:
                counts = into.setdefault((identity, operation), [0, 0])
                counts[0] += int(requests)
                counts[1] += int(refusals)
    return usage
