"""The live dashboard on the admin API: a static page, its assets, and the JSON it polls.

    GET /dashboard             the page (HTML): no data in it, so it loads without the token
    GET /dashboard/app.js      its script; GET /dashboard/app.css its style sheet
    GET /dashboard/data        a JSON snapshot (token-protected like every admin endpoint)

No build step, no CDN, no framework: the assets ship in the package (`admin/static/`) and
the page draws its charts as SVG from `/dashboard/data`. The page carries no data and runs
no inline code, so a strict Content-Security-Policy (`default-src 'self'`, nothing inline)
holds; what it shows from requests (client addresses, reasons, operation names: attacker
input) it writes as text nodes only.

Where the numbers come from (under `serve --workers N`, every worker's added up:
`observe/figures.py`): the per-process counters (`observe/metrics.py`), their short
past (`observe/history.py`), the most refused clients (`observe/refusers.py`), the bans in
force (the ban gate's store), the latest alerts (`observe/alert_feed.py`).
"""

from __future__ import annotations

import time
from functools import cache
from importlib.resources import files
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from apishield.observe.figures import View, local
from apishield.observe.history import HISTORY, History, quantile, totals

if TYPE_CHECKING:
    from apishield.pipeline import Pipeline

TOP_REASONS = 20
TOP_REFUSERS = 10
TOP_BANS = 50
TOP_ALERTS = 20
TOP_OPERATIONS = 30

# The page's own policy: its script and style sheet from this origin, its fetches to this
# origin, nothing inline, no frames around it, no form posted anywhere.
PAGE_POLICY = (b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
               b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
               b"frame-ancestors 'none'")
PAGE_HEADERS = [
    (b"content-security-policy", PAGE_POLICY),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]

# path under the admin root -> (file in admin/static, content type)
ASSETS: dict[str, tuple[str, bytes]] = {
    "/dashboard": ("dashboard.html", b"text/html; charset=utf-8"),
    "/dashboard/app.js": ("dashboard.js", b"text/javascript; charset=utf-8"),
    "/dashboard/app.css": ("dashboard.css", b"text/css; charset=utf-8"),
}


@cache
def asset(path: str) -> bytes:
    """The bytes of a static asset, read from the installed package once."""
    name, _ = ASSETS[path]
    return files("apishield.admin").joinpath("static", name).read_bytes()


def snapshot(pipeline: Pipeline | None, history: History = HISTORY,
             now: float | None = None, view: View | None = None) -> dict[str, Any]:
    """Everything the page shows, at `now`; the refusers and alerts of `view` (this
    process's by default; under `serve --workers N`, every worker's added up, whose
    metrics `history` then reads too)."""
    now = time.time() if now is None else now
    view = view or local()
    history.tick(now)  # the middleware has no sampler task: its past is its polls
    samples = list(history.samples)
    series = [{"at": later.at,
               "requests": _rate(later.requests - earlier.requests, later.at - earlier.at),
               "refused": _rate(later.refused - earlier.refused, later.at - earlier.at),
               "errors": _rate(later.errors - earlier.errors, later.at - earlier.at)}
              for earlier, later in pairwise(samples)]
    recent: dict[str, int] = {}
    for sample in samples[1:]:
        for reason, moved in sample.reasons.items():
            recent[reason] = recent.get(reason, 0) + moved
    by_reason = sorted(dict(history.metrics.refusals).items(),
                       key=lambda item: (-item[1], item[0]))
    requests, refused, errors = totals(history.metrics)  # now, not at the last sample
    return {
        "now": now,
        # `metrics.enabled: false` stops the counting everything here is read from
        "counting": pipeline is None or pipeline.metrics is not None,
        "interval": history.interval,
        "totals": {"requests": requests, "refused": refused, "errors": errors},
        "rate": series,
        "refusals": [{"reason": reason, "total": total, "recent": recent.get(reason, 0)}
                     for reason, total in by_reason[:TOP_REASONS]],
        "recent_since": samples[0].at,
        "refusers": [entry.as_dict() for entry in view.refusers.top(TOP_REFUSERS)],
        "bans": _bans(pipeline, now),
        "alerts": {"fired": view.alerts.fired,
                   "recent": [alert.as_dict() for alert in view.alerts.recent(TOP_ALERTS)]},
        "latency": _latency(history),
    }


def _rate(delta: int, seconds: float) -> float:
    return round(delta / seconds, 3) if seconds > 0 else 0.0


def _bans(pipeline: Pipeline | None, now: float) -> dict[str, Any]:
    store = pipeline.bans.store if pipeline is not None else None
    records = store.list(now) if store is not None else []
    records.sort(key=lambda record: record.until)
    return {"active": len(records),
            "list": [{"kind": r.kind, "value": r.value, "rule": r.rule, "reason": r.reason,
                      "until": r.until, "offense": r.offense} for r in records[:TOP_BANS]]}


def _latency(history: History) -> dict[str, Any]:
    """Per operation, over the time since the oldest histogram copy: count, mean and
    quantiles in milliseconds (None where nothing was observed)."""
    since = history.latency_since()
    rows: list[dict[str, Any]] = []
    for operation, histogram in list(history.metrics.durations.items()):
        counts = list(histogram.counts)
        total_seconds = histogram.sum
        if since is not None and operation in since.histograms:
            counts = [now - then for now, then in
                      zip(counts, since.histograms[operation], strict=True)]
            total_seconds -= since.sums[operation]
        count = sum(counts)
        if count == 0:
            continue
        rows.append({"operation": operation, "count": count,
                     "mean_ms": round(total_seconds / count * 1000, 3),
                     **{f"p{q}_ms": _ms(quantile(counts, q / 100)) for q in (50, 95, 99)}})
    rows.sort(key=lambda row: (-row["count"], row["operation"]))
    return {"since": since.at if since is not None else None,
            "operations": rows[:TOP_OPERATIONS]}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
