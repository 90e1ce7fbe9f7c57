"""The Grafana dashboard (deploy/grafana/) asks only for series apishield exports.

A dashboard query that names a metric apishield does not export, or groups by a label the
metric does not have, draws an empty panel and no error anywhere: the operator believes
all is quiet. So every query is parsed with a real PromQL parser (`promql-parser`, the
Rust parser GreptimeDB uses, pinned in the test extras) and checked against the series a
real `/metrics` rendering contains: the metrics of `observe/metrics.py`, each recorded
once and rendered through the same collector and registry the admin listener serves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser as promql
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from apishield.observe.metrics import METRIC_SPECS, Metrics, registry

DEPLOY = Path(__file__).parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "apishield.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"

# Prometheus adds these to every series it scrapes (the target's labels): a query may
# select or group by them on any metric.
TARGET_LABELS = frozenset({"job", "instance"})

# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h",
                  "$instance": ".*"}


def exported_series() -> dict[str, frozenset[str]]:
    """Series name -> label names, from a real exposition of every apishield metric."""
    metrics = Metrics()
    metrics.request("listPets", "GET", 200, "allowed", 0.002, None)
    metrics.request(None, "GET", 404, "refused", 0.0004, "not-found")
    metrics.auth_attempt("bearer", "failure", "expired")
    metrics.rate_limit("per-ip")
    metrics.upstream_error("connect")
    metrics.upstream_duration.observe(0.01)
    metrics.jwks_refresh("corp", "failure")
    metrics.state_error()
    metrics.config_reload("succeeded")
    metrics.alert("login-burst")
    metrics.alert_delivery("ops", "delivered")
    text = generate_latest(registry(metrics, lambda: {"apishield_bans_active": 2.0})).decode()
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in series.items()}


SERIES = exported_series()


def test_the_exposition_has_every_documented_metric():
    """The fixture above must exercise every metric, or the checks below would be blind."""
    expected: dict[str, frozenset[str]] = {}
    for name, spec in METRIC_SPECS.items():
        labels = frozenset(spec.labels)
        if spec.kind == "histogram":
            expected[f"{name}_bucket"] = labels | {"le"}
            expected[f"{name}_sum"] = labels
            expected[f"{name}_count"] = labels
        else:
            expected[name] = labels
    assert SERIES == expected


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def panels(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in data["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside a collapsed row


def targets() -> list[tuple[str, dict[str, str]]]:
    found = [(f"{panel['title']} / {target['refId']}", target)
             for panel in panels(dashboard()) for target in panel.get("targets", [])]
    assert found
    return found


def substituted(expr: str) -> str:
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def selectors(node: object) -> Iterator[promql.VectorSelector]:
    """Every vector selector in a parsed expression."""
    if isinstance(node, promql.VectorSelector):
        yield node
    elif isinstance(node, promql.MatrixSelector):
        yield node.vector_selector
    elif isinstance(node, promql.BinaryExpr):
        yield from selectors(node.lhs)
        yield from selectors(node.rhs)
    elif isinstance(node, promql.AggregateExpr):
        yield from selectors(node.expr)
    elif isinstance(node, promql.Call):
        for arg in node.args:
            yield from selectors(arg)
    elif isinstance(node, promql.ParenExpr | promql.UnaryExpr | promql.SubqueryExpr):
        yield from selectors(node.expr)


def aggregations(node: object) -> Iterator[promql.AggregateExpr]:
    if isinstance(node, promql.AggregateExpr):
        yield node
        yield from aggregations(node.expr)
    elif isinstance(node, promql.BinaryExpr):
        yield from aggregations(node.lhs)
        yield from aggregations(node.rhs)
    elif isinstance(node, promql.Call):
        for arg in node.args:
            yield from aggregations(arg)
    elif isinstance(node, promql.ParenExpr | promql.UnaryExpr | promql.SubqueryExpr):
        yield from aggregations(node.expr)


def output_labels(node: object) -> set[str] | None:
    """The labels a query's result carries, where that is plain to see (None: not)."""
    if isinstance(node, promql.AggregateExpr):
        if node.modifier is not None and node.modifier.type == promql.AggModifierType.By:
            return set(node.modifier.labels)
        return None if node.modifier is not None else set()
    if isinstance(node, promql.Call) and node.func.name == "histogram_quantile":
        inner = output_labels(node.args[1])
        return None if inner is None else inner - {"le"}
    if isinstance(node, promql.BinaryExpr):
        return output_labels(node.lhs)
    if isinstance(node, promql.ParenExpr):
        return output_labels(node.expr)
    return None


def metric_labels(selector: promql.VectorSelector) -> frozenset[str]:
    name = selector.name
    assert name in SERIES, f"{name} is not a series apishield exports ({sorted(SERIES)})"
    return SERIES[name] | TARGET_LABELS


@pytest.mark.parametrize(("where", "target"), targets(), ids=lambda value: str(value)[:60])
def test_every_query_names_exported_series_and_their_labels(where, target):
    expr = promql.parse(substituted(target["expr"]))  # raises on a PromQL syntax error
    found = list(selectors(expr))
    assert found, f"{where}: selects no metric"
    for selector in found:
        labels = metric_labels(selector)
        for matcher in selector.matchers.matchers:
            assert matcher.name in labels, f"{where}: {selector.name} has no label {matcher.name}"
    for aggregation in aggregations(expr):
        if aggregation.modifier is None:
            continue
        for selector in selectors(aggregation.expr):
            missing = set(aggregation.modifier.labels) - metric_labels(selector)
            assert not missing, f"{where}: {selector.name} has no label {sorted(missing)}"
    legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
    labels_out = output_labels(expr)
    if labels_out is not None:
        assert legend <= labels_out, f"{where}: legend names labels the result lacks"


def test_the_checks_above_catch_a_wrong_metric_and_a_wrong_label():
    """The walker really reaches the selectors: a misspelt name or label is caught."""
    wrong_name = promql.parse("sum by (reason) (rate(apishield_refusal_total[1m]))")
    with pytest.raises(AssertionError, match="not a series"):
        [metric_labels(s) for s in selectors(wrong_name)]
    wrong_label = promql.parse(
        "histogram_quantile(0.9, sum by (le, status) "
        "(rate(apishield_request_duration_seconds_bucket[1m])))")
    (aggregation,) = aggregations(wrong_label)
    (selector,) = selectors(aggregation.expr)
    assert "status" not in metric_labels(selector)
    assert "operation" in metric_labels(selector)


def test_every_metric_has_a_panel():
    """An operator sees every metric apishield exports without writing a query."""
    used = {selector.name for _, target in targets()
            for selector in selectors(promql.parse(substituted(target["expr"])))}
    families = {re.sub(r"_(bucket|sum|count)$", "", name) if name not in METRIC_SPECS else name
                for name in used}
    assert families == set(METRIC_SPECS)


def test_panels_the_issue_asks_for_are_there():
    titles = {str(panel["title"]) for panel in panels(dashboard())}
    for wanted in ("Request rate by outcome", "Refusals by reason",
                   "Request latency by operation (p50, p95, p99)", "Upstream errors by kind",
                   "Upstream latency (p50, p95, p99)", "Authentication failures by reason",
                   "Rate-limited by limit", "Bans active", "Config reloads",
                   "JWKS refresh failures", "State store errors", "Build info"):
        assert wanted in titles
    latency = next(p for p in panels(dashboard())
                   if p["title"] == "Request latency by operation (p50, p95, p99)")
    quantiles = {promql.parse(substituted(t["expr"])).args[0].val
                 for t in latency["targets"]}
    assert quantiles == {0.5, 0.95, 0.99}


def test_template_variable_query_names_an_exported_label():
    (variable,) = dashboard()["templating"]["list"]
    match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"])
    assert match is not None
    metric, label = match.groups()
    assert label in SERIES[metric] | TARGET_LABELS


def test_panels_use_the_provisioned_datasource_and_do_not_overlap():
    (source,) = yaml.safe_load(
        (PROVISIONING / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus"
    data = dashboard()
    cells: set[tuple[int, int]] = set()
    ids: set[int] = set()
    for panel in panels(data):
        assert panel["id"] not in ids
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        for holder in (panel, *panel["targets"]):
            assert holder["datasource"] == {"type": "prometheus", "uid": source["uid"]}
