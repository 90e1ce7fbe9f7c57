"""bench/harness.py's issue-18 groups, without nginx or wrk.

The harness writes the gateway configs of `bench/run --full` / `--only redis_full` itself
(stdlib only, its own YAML emitter), so a change to the config models could break the
benchmark long after the suite passed. Here: every config it writes for the full pipeline
is one `apishield check` accepts and that means what the harness says (a per-identity
limit, the JWT issuer, the admin listener, Redis state with a pepper), and the figures it
reports (ratio_full, workers_scaling, the Redis ratio) are medians of per-round ratios.
The measurements themselves are `bench/run --full --quick` (bench/README.md).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from apishield.config.loading import load_config

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "bench" / "harness.py"


@pytest.fixture(scope="module")
def harness() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("bench_harness", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_harness"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_harness", None)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory, harness: ModuleType) -> Path:
    """The JWK Set and the cache-hit token, made by bench/auth_tokens.py as the harness
    does (no miss lists)."""
    d = tmp_path_factory.mktemp("tokens")
    subprocess.run([sys.executable, str(REPO / "bench" / "auth_tokens.py"), "--dir", str(d),
                    "--issuer", harness.AUTH_ISSUER, "--audience", harness.AUTH_AUDIENCE,
                    "--algorithms", ""], check=True, capture_output=True, timeout=120)
    return d


def write_full(harness: ModuleType, d: Path, tokens: Path, extra: dict[str, Any]) -> Path:
    config_path, _ = harness.write_apishield_config(d, "full", harness.full_contract(), 18080,
                                                    18081, None, extra)
    (d / "jwks.json").write_bytes((tokens / "jwks.json").read_bytes())
    if "state" in extra:
        harness.write_pepper(d)
    return Path(config_path)


def check(config_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "apishield", "check", "--config",
                          str(config_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_full_config_is_the_full_pipeline(harness: ModuleType, tokens: Path,
                                          tmp_path: Path) -> None:
    config_path = write_full(harness, tmp_path / "full", tokens, harness.full_config(19090))
    check(config_path)
    config = load_config(config_path)
    (limit,) = config.rate_limiting.limits
    assert (limit.name, tuple(limit.key)) == ("per-identity", ("identity",))
    assert config.admin is not None and config.admin.port == 19090
    assert config.metrics.enabled
    assert list(config.auth.issuers) == ["bench"]
    assert config.access_log.path is not None and config.access_log.path.endswith("access.log")
    contract = harness.full_contract()
    post = contract["paths"]["/item"]["post"]
    assert contract["security"] == [{"bearer": []}]
    assert "x-apishield" not in post  # the injection scan stays on (the default)
    declared = post["responses"]["200"]["content"]["application/json"]["schema"]["properties"]
    assert set(declared) == set(harness.FULL_FILTERED_BODY)
    upstream = harness.json.loads(harness.UPSTREAM_BODY)
    assert set(declared) < set(upstream)  # some of the upstream's properties: filtered
    assert {k: upstream[k] for k in declared} == harness.FULL_FILTERED_BODY


@pytest.mark.parametrize("limit", [None, "admission"])
def test_redis_configs_share_state(harness: ModuleType, tokens: Path, tmp_path: Path,
                                   limit: str | None) -> None:
    chosen = harness.ADMISSION_LIMIT if limit else None
    extra = harness.full_config(19091, "redis://127.0.0.1:6399/0", chosen)
    config_path = write_full(harness, tmp_path / "redis", tokens, extra)
    check(config_path)
    config = load_config(config_path)
    assert str(config.state).startswith("redis://127.0.0.1:6399")
    (got,) = config.rate_limiting.limits
    assert got.name == (limit or "per-identity")


def run_of(rps: float, cpu_us: float, p99: float = 10.0) -> dict[str, Any]:
    return {"rps": rps, "proxy_cpu_us_per_request": cpu_us, "latency_ms": {"p99": p99},
            "non2xx": 0, "socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0},
            "errors": 0}


def test_reported_figures_are_medians_of_per_round_ratios(harness: ModuleType) -> None:
    rounds = [
        {"round": 1, "results": {"nginx_proxy_post": run_of(10_000, 30, 4.0),
                                 "apishield_full": run_of(1_000, 500, 40.0),
                                 "apishield_full_redis": run_of(900, 560),
                                 "apishield_passthrough_w1": run_of(3_000, 150),
                                 "apishield_passthrough_w2": run_of(6_000, 150),
                                 "nginx_proxy_w2": run_of(20_000, 25)}},
        {"round": 2, "results": {"nginx_proxy_post": run_of(8_000, 30, 5.0),
                                 "apishield_full": run_of(2_000, 400, 5.0),
                                 "apishield_full_redis": run_of(1_900, 400),
                                 "apishield_passthrough_w1": run_of(3_000, 150),
                                 "apishield_passthrough_w2": run_of(3_300, 180),
                                 "nginx_proxy_w2": run_of(20_000, 25)}},
        {"round": 3, "results": {"nginx_proxy_post": run_of(10_000, 30, 5.0),
                                 "apishield_full": run_of(3_000, 300, 20.0),
                                 "apishield_full_redis": run_of(1_500, 600),
                                 "apishield_passthrough_w1": run_of(3_000, 150),
                                 "apishield_passthrough_w2": run_of(4_500, 160),
                                 "nginx_proxy_w2": run_of(20_000, 25)}},
    ]
    targets = [t for r in rounds[:1] for t in r["results"]]
    summary = harness.summarize(rounds, targets)
    ratios = {"apishield_full": harness.median(
        harness.ratio_series(rounds, "apishield_full", "nginx_proxy_post"))}
    # per round 0.1, 0.25, 0.3: the median ratio, not the ratio of the medians (0.2)
    assert ratios["apishield_full"] == 0.25

    class Args:
        connections = 50
        workers_pinning = "unpinned: 2 CPUs"
        full_tokens_report = None
        redis_info = None

    full = harness.full_block(rounds, targets, summary, ratios, Args)
    assert full["ratio"] == 0.25 and full["goals"]["ratio_full"]["met"] is False
    assert full["p99_vs_nginx"] == 4.0  # per round 10, 1, 4
    assert full["goals"]["p99_full_vs_nginx"]["met"] is False

    workers = harness.workers_block(rounds, targets, summary, Args)
    assert workers["ratio_w2_w1"] == 1.5  # per round 2.0, 1.1, 1.5
    assert workers["cpu_per_request_w2_w1"] == pytest.approx(1.0667, abs=1e-4)
    assert workers["cpu_per_request_flat"] is False  # 180/150, 160/150: grows past 5%
    assert workers["shares_cores_with_load"] and "floor" in workers["note"]

    redis = harness.redis_full_block(rounds, targets, summary, {}, Args)
    assert redis["ratio_vs_embedded"] == 0.9  # per round 0.9, 0.95, 0.5
    assert redis["goal"]["met"] is True
    assert redis["cpu_ratio_vs_embedded"] == pytest.approx(0.8929, abs=1e-4)


def test_each_response_schema_declares_what_its_target_says(harness: ModuleType) -> None:
    """`get_filter_full` (and bench/middleware) declare every property of the upstream body,
    nothing is cut; `apishield_full` declares 5 of the 9. One module-level name once held
    both: the later definition silently turned get_filter_full into a filtering target."""
    import json

    upstream = set(json.loads(harness.UPSTREAM_BODY))
    full = harness.validation_contract("get_filter_full")
    declared = full["paths"]["/item"]["get"]["responses"]["200"]["content"][
        "application/json"]["schema"]["properties"]
    assert set(declared) == upstream
    pipeline = harness.full_contract()["paths"]["/item"]["post"]["responses"]["200"][
        "content"]["application/json"]["schema"]["properties"]
    assert set(pipeline) == set(harness.FULL_FILTERED_BODY) and len(pipeline) == 5


def test_middleware_wheel_must_be_a_wheel_file(tmp_path: Path) -> None:
    """`bench/middleware --wheel` (the compiled build under uvicorn) refuses anything but a
    wheel file at once, before a venv is built or a target started."""
    not_a_wheel = tmp_path / "apishield.tar.gz"
    not_a_wheel.write_bytes(b"")
    for given in (not_a_wheel, tmp_path / "missing.whl"):
        result = subprocess.run(
            [sys.executable, str(REPO / "bench" / "middleware_harness.py"), "--wheel",
             str(given), "--check-only", "--venv", str(tmp_path / "venv")],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert f"--wheel {given}: not a wheel file" in result.stderr
    assert not (tmp_path / "venv").exists()
