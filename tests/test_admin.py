"""The admin listener of a real gateway: health, readiness, metrics, config, the token.

Metrics are read back through `prometheus_client`'s own parser, so a malformed exposition
fails here the way it would fail a Prometheus scrape.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from apishield.config import config_from_dict
from apishield.observe.metrics import METRIC_SPECS
from tests.conftest import DATA, free_port

TOKEN = "admin-token-for-tests-0123456789"


def scrape(base: str, headers: dict[str, str] | None = None) -> dict[str, list[Any]]:
    """Every sample of /metrics by sample name."""
    response = httpx.get(f"{base}/metrics", headers=headers or {}, timeout=5)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    found = [s.value for s in samples.get(name, [])
             if all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(found)


@pytest.fixture
def admin_gateway(make_gateway: Any) -> tuple[Any, str]:
    port = free_port()
    gateway = make_gateway({"admin": {"host": "127.0.0.1", "port": port}})
    return gateway, f"http://127.0.0.1:{port}"


def test_health_and_readiness(admin_gateway: tuple[Any, str]) -> None:
    _, admin = admin_gateway
    assert httpx.get(f"{admin}/healthz").json() == {"status": "alive"}
    # no request went through yet: readiness connects to the upstream itself
    ready = httpx.get(f"{admin}/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready"}
    assert ready.headers["cache-control"] == "no-store"


def test_readiness_names_an_unreachable_upstream(make_gateway: Any) -> None:
    port = free_port()
    dead = free_port()  # nothing listens there
    make_gateway({"admin": {"port": port}}, upstream=f"http://127.0.0.1:{dead}")
    response = httpx.get(f"http://127.0.0.1:{port}/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not-ready"
    assert len(body["failing"]) == 1
    assert body["failing"][0].startswith(f"upstream: 127.0.0.1:{dead} was never reached")
    # still alive: liveness is not readiness
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200


def test_metrics_count_requests_by_operation_status_and_outcome(
        admin_gateway: tuple[Any, str]) -> None:
    gateway, admin = admin_gateway
    before = scrape(admin)
    for _ in range(3):
        assert httpx.get(f"{gateway.url}/echo").status_code == 200
    assert httpx.get(f"{gateway.url}/nowhere/at/all").status_code == 404
    assert httpx.put(f"{gateway.url}/cache").status_code == 405
    after = scrape(admin)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("apishield_requests_total", operation="echoGet", method="GET",
                 status="200", outcome="allowed") == 3
    # an unmatched path is counted under one label, never under its raw path
    assert delta("apishield_requests_total", operation="unmatched", status="404",
                 outcome="refused") == 1
    assert not any("/nowhere" in str(s.labels) for s in after["apishield_requests_total"])
    assert delta("apishield_refusals_total", reason="method-not-declared") == 1
    assert delta("apishield_request_duration_seconds_count", operation="echoGet") == 3
    assert delta("apishield_request_duration_seconds_bucket", operation="echoGet",
                 le="+Inf") == 3
    assert delta("apishield_upstream_duration_seconds_count") == 3
    assert value(after, "apishield_build_info") == 1
    # every family apishield documents is there, and nothing else
    names = {sample.name for samples in after.values() for sample in samples}
    for name, spec in METRIC_SPECS.items():
        if spec.kind == "histogram":
            assert f"{name}_count" in names, name
    assert all(name.startswith("apishield_") for name in names)


def test_metrics_of_the_upstream_and_rate_limits(make_gateway: Any) -> None:
    port = free_port()
    gateway = make_gateway({
        "admin": {"port": port},
        "rate_limiting": {"limits": [{"name": "tight", "rate": "2/m", "key": ["ip"],
                                             "operations": ["echoGet"]}]},
    })
    admin = f"http://127.0.0.1:{port}"
    statuses = [httpx.get(f"{gateway.url}/echo").status_code for _ in range(4)]
    assert statuses == [200, 200, 429, 429]
    assert httpx.get(f"{gateway.url}/error").status_code == 500  # masked upstream 5xx
    samples = scrape(admin)
    assert value(samples, "apishield_rate_limited_total", limit="tight") == 2
    assert value(samples, "apishield_refusals_total", reason="rate-limit:tight") == 2
    assert value(samples, "apishield_upstream_errors_total", kind="5xx-masked") == 1
    assert value(samples, "apishield_requests_total", operation="error", status="500",
                 outcome="error") == 1


def test_openmetrics_when_asked(admin_gateway: tuple[Any, str]) -> None:
    _, admin = admin_gateway
    response = httpx.get(f"{admin}/metrics",
                         headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


def test_config_is_the_effective_one_without_secrets(
        make_gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APISHIELD_TEST_PEPPER", "pepper-" + "x" * 32)
    port = free_port()
    gateway = make_gateway({"admin": {"port": port},
                            "auth": {"api_keys": {"pepper": {"env": "APISHIELD_TEST_PEPPER"}}},
                            "state": "redis://apishield:hunter2-not-shown@127.0.0.1:1/0"})
    body = httpx.get(f"http://127.0.0.1:{port}/config").json()
    assert body["upstream"]["url"].startswith("http://127.0.0.1:")
    assert body["limits"]["max_body_bytes"] > 0  # defaults filled in
    assert "hunter2" not in str(body)
    assert body["state"] == "redis://<redacted>@127.0.0.1:1/0"
    # a reference to a secret is shown (it says where to look), never a value
    assert body["auth"]["api_keys"]["pepper"] == {"env": "APISHIELD_TEST_PEPPER", "file": None}
    assert "pepper-xxxx" not in str(body)
    assert gateway.process.poll() is None


def test_unknown_paths_and_methods(admin_gateway: tuple[Any, str]) -> None:
    _, admin = admin_gateway
    missing = httpx.get(f"{admin}/nope")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.json()["type"] == "urn:apishield:problem:admin-not-found"
    wrong = httpx.post(f"{admin}/metrics")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "GET"
    assert wrong.json()["type"] == "urn:apishield:problem:admin-method-not-allowed"


def test_token_required_when_configured(make_gateway: Any,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APISHIELD_TEST_ADMIN_TOKEN", TOKEN)
    port = free_port()
    gateway = make_gateway({"admin": {"port": port, "token_env": "APISHIELD_TEST_ADMIN_TOKEN"}})
    admin = f"http://127.0.0.1:{port}"
    for headers in ({}, {"authorization": "Bearer wrong-token"},
                    {"authorization": f"Basic {TOKEN}"}):
        response = httpx.get(f"{admin}/metrics", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == 'Bearer realm="apishield-admin"'
        assert response.json()["type"] == "urn:apishield:problem:admin-unauthorized"
        assert httpx.get(f"{admin}/config", headers=headers).status_code == 401
    # liveness needs no token; everything else does
    assert httpx.get(f"{admin}/healthz").status_code == 200
    scrape(admin, {"authorization": f"Bearer {TOKEN}"})
    assert httpx.get(f"{admin}/readyz",
                     headers={"authorization": f"bearer {TOKEN}"}).status_code == 200
    stderr = gateway.stderr()
    assert "admin API: bad token from 127.0.0.1 on /metrics" in stderr
    assert TOKEN not in stderr and "wrong-token" not in stderr


def test_a_missing_or_short_token_stops_the_start(tmp_path: Any, upstream_url: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from apishield.config import ConfigError
    from apishield.gateway import build_gateway

    monkeypatch.delenv("APISHIELD_UNSET_TOKEN", raising=False)
    monkeypatch.setenv("APISHIELD_SHORT_TOKEN", "short")
    for env, message in (("APISHIELD_UNSET_TOKEN", "is empty or unset"),
                         ("APISHIELD_SHORT_TOKEN", "holds a token of 5 characters")):
        config = config_from_dict({
            "contract": "contract.yaml", "upstream": {"url": upstream_url},
            "admin": {"host": "0.0.0.0", "token_env": env}}, source_dir=DATA)
        with pytest.raises(ConfigError) as caught:
            build_gateway(config)
        assert len(caught.value.problems) == 1
        assert caught.value.problems[0].startswith(
            f"admin.token_env: environment variable {env} {message}")


def test_a_public_admin_address_needs_a_token() -> None:
    from apishield.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        config_from_dict({"contract": "c.yaml", "admin": {"host": "0.0.0.0"}}, source_dir=".")
    assert caught.value.problems == [
        "admin: host 0.0.0.0 is reachable from other hosts, so the admin API needs a bearer "
        "token: set token_env (an environment variable's name) or token_file, or listen on "
        "127.0.0.1"]


def test_malformed_and_oversized_requests_are_refused(
        admin_gateway: tuple[Any, str]) -> None:
    _, admin = admin_gateway
    port = int(admin.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")
    # keep-alive: two requests on one connection
    with httpx.Client() as client:
        assert client.get(f"{admin}/healthz").status_code == 200
        assert client.get(f"{admin}/readyz").status_code == 200


def test_check_warns_of_an_admin_api_on_the_network(tmp_path: Any) -> None:
    for name in ("contract.yaml", "paths.yaml"):
        shutil.copy(DATA / name, tmp_path / name)
    config = tmp_path / "apishield.yaml"
    config.write_text("contract: contract.yaml\nupstream: {url: 'http://127.0.0.1:9'}\n"
                      "admin: {host: 0.0.0.0, token_env: APISHIELD_TEST_CHECK_TOKEN}\n")
    result = subprocess.run(
        [sys.executable, "-m", "apishield", "check", "--config", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "APISHIELD_TEST_CHECK_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert ("warning: admin.host: 0.0.0.0 serves the admin API over plain HTTP to other "
            "hosts") in result.stderr
    assert TOKEN not in result.stderr


def test_post_reload_applies_the_file_and_counts_the_outcome(make_gateway: Any) -> None:
    import yaml

    port = free_port()
    gateway = make_gateway({"admin": {"port": port}})
    admin = f"http://127.0.0.1:{port}"
    unchanged = httpx.post(f"{admin}/reload")
    assert unchanged.status_code == 200
    assert unchanged.json()["outcome"] == "unchanged"
    config = yaml.safe_load(gateway.config_path.read_text())
    config["limits"] = {"max_body_bytes": 10}
    gateway.config_path.write_text(yaml.safe_dump(config))
    done = httpx.post(f"{admin}/reload").json()
    assert done["outcome"] == "succeeded" and done["trigger"] == "admin"
    assert done["changed"] == ["limits"]
    assert len(done["config_hash"]) == 64
    assert httpx.post(f"{gateway.url}/echo", content=b"x" * 11,
                      headers={"content-type": "application/json"}).status_code == 413
    assert httpx.get(f"{admin}/config").json()["limits"]["max_body_bytes"] == 10
    gateway.config_path.write_text("contract: [not a path\n")
    failed = httpx.post(f"{admin}/reload")
    assert failed.status_code == 422
    assert failed.json()["outcome"] == "failed"
    assert "invalid YAML" in failed.json()["problems"][0]
    samples = scrape(admin)
    for outcome in ("unchanged", "succeeded", "failed"):
        assert value(samples, "apishield_config_reloads_total", outcome=outcome) == 1
    assert httpx.get(f"{gateway.url}/echo").status_code == 200  # still serving
