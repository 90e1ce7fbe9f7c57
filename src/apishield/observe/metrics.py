"""Prometheus metrics (checklist F2, F4 raw counts): counted on the hot path with plain
integer increments, rendered only at scrape time.

Why not `prometheus_client`'s Counter/Histogram objects on the request path: each `.labels()`
call builds a label tuple, takes a lock and looks up a child; per request that is several
times the cost of the dict increments below (bench/RESULTS.md, issue 13). So requests only
bump entries of plain dicts and preallocated histogram slots, and `MetricsCollector` turns
them into metric families through prometheus_client's custom-collector API when Prometheus
scrapes: the exposition format is written by the library, not by hand.

One `Metrics` per process (`METRICS`), as prometheus_client's own default registry: the
upstream pool, the JWKS cache and the state stores count into it without a reference being
threaded through every constructor, and the counts survive a config reload (a counter
that went back to zero would read as a restart). Labels are bounded by construction: route
operations come from the contract, methods outside the standard set count as `OTHER`, and
every table that could grow with input stops at `MAX_SERIES` keys and counts the rest
under `other`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Literal, TypeVar

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry


@dataclass(frozen=True)
class MetricSpec:
    """What a metric family is: its type, its help text and its label names."""

    kind: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...] = ()


# Every metric apishield exports, by its name in the exposition format. Stable: dashboards
# and alerts are written against these (docs/metrics.md documents each one).
METRIC_SPECS: dict[str, MetricSpec] = {
    "apishield_requests_total": MetricSpec(
        "counter", "Requests by operation, method, status and outcome "
        "(allowed, refused, shadowed, error).", ("operation", "method", "status", "outcome")),
    "apishield_request_duration_seconds": MetricSpec(
        "histogram", "Time from the request's first byte to its response, by operation.",
        ("operation",)),
    "apishield_refusals_total": MetricSpec(
        "counter", "Requests refused (or shadowed in log-only mode) by reason code.",
        ("reason",)),
    "apishield_auth_attempts_total": MetricSpec(
        "counter", "Credential checks by security scheme, outcome (success, failure) and "
        "reason.", ("scheme", "outcome", "reason")),
    "apishield_rate_limited_total": MetricSpec(
        "counter", "Requests refused with 429 by the limit that refused them.", ("limit",)),
    "apishield_bans_active": MetricSpec(
        "gauge", "Bans in force now (IP addresses and subjects)."),
    "apishield_upstream_errors_total": MetricSpec(
        "counter", "Failed exchanges with the upstream by kind (connect, timeout, reset, "
        "protocol, pool-full, client-share).", ("kind",)),
    "apishield_upstream_duration_seconds": MetricSpec(
        "histogram", "Time from sending a request upstream to its response head."),
    "apishield_jwks_refresh_total": MetricSpec(
        "counter", "JWKS fetches by issuer and outcome (success, failure).",
        ("issuer", "outcome")),
    "apishield_state_errors_total": MetricSpec(
        "counter", "Requests that found the shared state store (Redis) unavailable."),
    "apishield_usage_flush_errors_total": MetricSpec(
        "counter", "Usage flushes that could not write to the state store (the counts are "
        "kept and retried by the next flush)."),
    "apishield_config_reloads_total": MetricSpec(
        "counter", "Config reloads by outcome (succeeded, failed, unchanged).", ("outcome",)),
    "apishield_alerts_total": MetricSpec(
        "counter", "Alerts fired by rule (after the cooldown's deduplication).", ("rule",)),
    "apishield_alert_deliveries_total": MetricSpec(
        "counter", "Alert deliveries by webhook and outcome (delivered, retried, failed, "
        "dropped, rate-limited).", ("webhook", "outcome")),
    "apishield_audit_log_records_total": MetricSpec(
        "counter", "Records this process appended to the audit trail."),
    "apishield_audit_log_errors_total": MetricSpec(
        "counter", "Audit-trail records this process could not write (or dropped)."),
    "apishield_worker_restarts_total": MetricSpec(
        "counter", "Worker processes of `serve --workers N` started again after they exited "
        "(counted by the supervisor; 0 for a lone gateway)."),
    "apishield_worker_figures_late_total": MetricSpec(
        "counter", "Workers of `serve --workers N` whose figures an admin API answer could "
        "not have fresh (no answer within 1 s, or no sum from the supervisor): their last "
        "figures stood in."),
    "apishield_build_info": MetricSpec(
        "gauge", "Always 1; the version of apishield that runs.", ("version",)),
}

# Seconds. Fixed so that dashboards can compare across deployments; from half a
# millisecond (a refusal) to the default upstream read timeout.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)

STANDARD_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
UNMATCHED = "unmatched"  # the operation label of a request no route matched
OTHER = "other"  # the label of what a full table no longer tells apart
MAX_SERIES = 2000  # keys per table: a bound on memory and on the scrape's size


class Histogram:
    """Fixed-bucket histogram: one list slot per bucket (not cumulative), a sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: the first bound >= seconds, as Prometheus's `le` (less or equal)
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*map(str, DURATION_BUCKETS), "+Inf"), self.counts,
                                strict=True):
            total += count
            out.append((bound, total))
        return out


class Metrics:
    """The counts themselves. Every method is a few dict operations: safe on the hot path."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int, str], int] = {}
        self.durations: dict[str, Histogram] = {}
        self.refusals: dict[str, int] = {}
        self.auth_attempts: dict[tuple[str, str, str], int] = {}
        self.rate_limited: dict[str, int] = {}
        self.upstream_errors: dict[str, int] = {}
        self.upstream_duration = Histogram()
        self.jwks_refreshes: dict[tuple[str, str], int] = {}
        self.state_errors = 0
        self.usage_flush_errors = 0
        self.config_reloads: dict[str, int] = {}
        self.alerts: dict[str, int] = {}
        self.alert_deliveries: dict[tuple[str, str], int] = {}
        self.audit_records = 0
        self.audit_errors = 0
        self.worker_restarts = 0  # the supervisor's count, copied in by a worker
        self.figures_late = 0  # counted by worker 0 (observe/figures_channel.py)

    def request(self, operation: str | None, method: str, status: int, outcome: str,
                seconds: float, reason: str | None) -> None:
        """One finished request (the front ends call it once per request, via the pipeline)."""
        label = operation if operation is not None else UNMATCHED
        if method not in STANDARD_METHODS:
            method = "OTHER"
        key = (label, method, status, outcome)
        # try/except rather than `in` + `+=`: one hash of the 4-tuple less per request. A new
        # key raises (once, or each time once the table is full and it counts as `other`):
        # rare, the labels being bounded
        try:
            self.requests[key] += 1
        except KeyError:
            _add(self.requests, key, (label, method, status if status < 1000 else 0, OTHER))
        try:
            histogram = self.durations[label]
        except KeyError:
            histogram = self.durations[label] = Histogram()
        # Histogram.observe inlined: a Python call less on every request
        histogram.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        histogram.sum += seconds
        if reason is not None and outcome != "allowed":
            refusals = self.refusals
            if reason in refusals:
                refusals[reason] += 1
            else:
                _add(refusals, reason, OTHER)
            # the reason codes say which limit refused and what failed upstream
            if status == 429:
                self.rate_limit(reason.removeprefix("rate-limit:"))
            elif reason.startswith("upstream-"):
                self.upstream_error(reason.removeprefix("upstream-"))

    def auth_attempt(self, scheme: str, outcome: str, reason: str) -> None:
        key = (scheme, outcome, reason)
        attempts = self.auth_attempts
        if key in attempts:
            attempts[key] += 1
        else:
            _add(attempts, key, (scheme, outcome, OTHER))

    def rate_limit(self, limit: str) -> None:
        table = self.rate_limited
        if limit in table:
            table[limit] += 1
        else:
            _add(table, limit, OTHER)

    def upstream_error(self, kind: str) -> None:
        table = self.upstream_errors
        table[kind] = table.get(kind, 0) + 1  # kinds are the gateway's own few words

    def jwks_refresh(self, issuer: str, outcome: str) -> None:
        key = (issuer, outcome)
        table = self.jwks_refreshes
        if key in table:
            table[key] += 1
        else:
            _add(table, key, (OTHER, outcome))

    def state_error(self) -> None:
        self.state_errors += 1

    def usage_flush_error(self) -> None:
        self.usage_flush_errors += 1

    def config_reload(self, outcome: str) -> None:
        self.config_reloads[outcome] = self.config_reloads.get(outcome, 0) + 1

    def alert(self, rule: str) -> None:
        table = self.alerts  # rule names come from the config: bounded anyway
        if rule in table:
            table[rule] += 1
        else:
            _add(table, rule, OTHER)

    def alert_delivery(self, webhook: str, outcome: str) -> None:
        key = (webhook, outcome)
        table = self.alert_deliveries
        if key in table:
            table[key] += 1
        else:
            _add(table, key, (OTHER, outcome))

    def audit_record(self) -> None:
        self.audit_records += 1

    def audit_error(self) -> None:
        self.audit_errors += 1


K = TypeVar("K")


def _add(table: dict[K, int], key: K, overflow: K) -> None:
    """Count a key seen for the first time, or under `overflow` once the table is full."""
    if len(table) >= MAX_SERIES:
        key = overflow
    table[key] = table.get(key, 0) + 1


METRICS = Metrics()

Gauges = Callable[[], dict[str, float]]


class MetricsCollector(Collector):
    """Renders `Metrics` (and gauges read at scrape time, such as the bans in force) as
    Prometheus metric families. Scrapes are rare; the copies taken here keep a request that
    runs between two lines from changing a table while it is read."""

    def __init__(self, metrics: Metrics = METRICS, gauges: Gauges | None = None) -> None:
        self.metrics = metrics
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        yield _counter("apishield_requests_total",
                       [((k[0], k[1], str(k[2]), k[3]), v) for k, v in m.requests.items()])
        durations = HistogramMetricFamily(
            "apishield_request_duration_seconds",
            METRICS_HELP["apishield_request_duration_seconds"], labels=["operation"])
        for operation, histogram in list(m.durations.items()):
            durations.add_metric([operation], histogram.cumulative(), histogram.sum)
        yield durations
        yield _counter("apishield_refusals_total", [((k,), v) for k, v in m.refusals.items()])
        yield _counter("apishield_auth_attempts_total", m.auth_attempts.items())
        yield _counter("apishield_rate_limited_total",
                       [((k,), v) for k, v in m.rate_limited.items()])
        gauges = self.gauges() if self.gauges is not None else {}
        bans = GaugeMetricFamily("apishield_bans_active",
                                 METRICS_HELP["apishield_bans_active"])
        if "apishield_bans_active" in gauges:
            bans.add_metric([], gauges["apishield_bans_active"])
        yield bans
        yield _counter("apishield_upstream_errors_total",
                       [((k,), v) for k, v in m.upstream_errors.items()])
        upstream = HistogramMetricFamily(
            "apishield_upstream_duration_seconds",
            METRICS_HELP["apishield_upstream_duration_seconds"])
        upstream.add_metric([], m.upstream_duration.cumulative(), m.upstream_duration.sum)
        yield upstream
        yield _counter("apishield_jwks_refresh_total", m.jwks_refreshes.items())
        yield _counter("apishield_state_errors_total", [((), m.state_errors)])
        yield _counter("apishield_usage_flush_errors_total", [((), m.usage_flush_errors)])
        yield _counter("apishield_config_reloads_total",
                       [((k,), v) for k, v in m.config_reloads.items()])
        yield _counter("apishield_alerts_total", [((k,), v) for k, v in m.alerts.items()])
        yield _counter("apishield_alert_deliveries_total", m.alert_deliveries.items())
        yield _counter("apishield_audit_log_records_total", [((), m.audit_records)])
        yield _counter("apishield_audit_log_errors_total", [((), m.audit_errors)])
        yield _counter("apishield_worker_restarts_total", [((), m.worker_restarts)])
        yield _counter("apishield_worker_figures_late_total", [((), m.figures_late)])
        info = GaugeMetricFamily("apishield_build_info", METRICS_HELP["apishield_build_info"],
                                 labels=["version"])
        info.add_metric([_version()], 1)
        yield info


METRICS_HELP = {name: spec.help for name, spec in METRIC_SPECS.items()}


def _counter(name: str, samples: Iterable[tuple[tuple[str, ...], int]]) -> CounterMetricFamily:
    spec = METRIC_SPECS[name]
    # prometheus_client appends `_total` itself to a counter's samples
    family = CounterMetricFamily(name.removesuffix("_total"), spec.help,
                                 labels=list(spec.labels))
    for labels, value in list(samples):
        family.add_metric(list(labels), value)
    return family


def _version() -> str:
    # the installed distribution's version (not `apishield.__version__`: this layer must
    # not import the package root, which imports the front ends)
    try:
        return version("apishield")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree, not installed
        return "unknown"


def registry(metrics: Metrics = METRICS, gauges: Gauges | None = None) -> CollectorRegistry:
    """A registry holding apishield's collector only (not the process/GC collectors of the
    default registry: the admin listener serves exactly the documented metrics)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(MetricsCollector(metrics, gauges))
    return reg
