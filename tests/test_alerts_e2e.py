"""Alerts (F3) end to end: a real gateway subprocess, the real test upstream and a real
webhook receiver on 127.0.0.1 (tests/webhook_server.py), one rule kind per test, plus a
webhook that hangs, one that fails then succeeds, and a URL read from a secret.

Counting rules use `window: 1h` where a test asserts exact counts: the sliding estimate
is exact inside one fixed window (windows start at multiples of their length, so a test
straddles a boundary only in the seconds around the hour). Nothing asserts a duration
except with bounds an order of magnitude away from what is measured."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mmdb_writer
import pytest
from netaddr import IPSet

from tests.conftest import RunningGateway, free_port, json_lines, wait_for
from tests.test_logging import assert_schema
from tests.webhook_server import WebhookServer, start_webhooks

CONTRACT = """
openapi: 3.1.0
info: {title: alerts test, version: "1"}
security: [{}, {apiKey: []}]
paths:
  /echo/open:
    get: {operationId: open, responses: {"200": {description: ok}}}
  /echo/keyed:
    get: {operationId: keyed, security: [{apiKey: []}], responses: {"200": {description: ok}}}
  /echo/users/{id}:
    delete:
      operationId: deleteUser
      parameters: [{name: id, in: path, required: true, schema: {type: string}}]
      responses: {"200": {description: ok}}
  /status/{code}:
    get:
      operationId: status
      security: []
      parameters: [{name: code, in: path, required: true, schema: {type: integer}}]
      responses: {"200": {description: ok}, "401": {description: wrong password},
                  "500": {description: failed}}
components:
  securitySchemes:
    apiKey: {type: apiKey, in: header, name: X-Api-Key}
"""

FR, US = "203.0.113.7", "198.51.100.20"  # the test database's countries


@pytest.fixture(scope="module")
def webhooks() -> Iterator[WebhookServer]:
    server = start_webhooks()
    yield server
    server.stop()


@pytest.fixture
def alerting(make_gateway: Any, tmp_path: Path, webhooks: WebhookServer) -> Any:
    """Start a gateway with `alerts` (webhook URLs relative to the receiver) behind a
    trusted proxy (X-Forwarded-For names the client), with its admin listener."""
    contract = tmp_path / "alerts-contract.yaml"
    contract.write_text(CONTRACT)

    def make(alerts: dict[str, Any], **overrides: Any) -> RunningGateway:
        for webhook in alerts.get("webhooks", {}).values():
            if "url" in webhook and webhook["url"].startswith("/"):
                webhook["url"] = webhooks.url + webhook["url"]
        admin = free_port()
        gateway = make_gateway({"alerts": alerts, "trusted_proxies": ["127.0.0.1/32"],
                                "admin": {"port": admin}, **overrides}, contract=contract)
        gateway.admin_url = f"http://127.0.0.1:{admin}"  # type: ignore[attr-defined]
        return gateway

    return make


def client(ip: str) -> dict[str, str]:
    return {"X-Forwarded-For": ip}


def alerts_logged(gateway: RunningGateway, rule: str) -> list[dict[str, Any]]:
    return [line for line in gateway.security_events("alert") if line["rule"] == rule]


def metric(gateway: RunningGateway, name: str, **labels: str) -> float:
    """One sample of the gateway's /metrics (0 when absent)."""
    text = httpx.get(f"{gateway.admin_url}/metrics").text  # type: ignore[attr-defined]
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def new_key(gateway: RunningGateway) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "apishield", "keys", "create", "--name",
         f"user-{time.monotonic_ns()}", "--config", str(gateway.config_path)],
        capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[0].strip()


def forged(key: str, attempt: int) -> str:
    """A well-formed key with `key`'s id and a wrong secret (the last character is one of
    the 16 a canonical key may end with)."""
    return key[:-7] + f"{attempt:06d}A"


def test_failed_auth_burst_by_ip_fires_once_per_cooldown_and_posts_json(alerting, webhooks):
    gateway = alerting({
        "webhooks": {"ops": {"url": "/ok/burst-ip"}},
        "rules": [{"name": "login-burst", "kind": "failed-auth-burst", "by": "ip",
                   "window": "1h", "threshold": 5, "cooldown": "10m", "notify": ["ops"]}]})
    key = new_key(gateway)
    attacker, other = client("198.51.100.66"), client("198.51.100.67")
    for attempt in range(4):
        assert httpx.get(f"{gateway.url}/echo/keyed", headers={
            **attacker, "X-Api-Key": forged(key, attempt)}).status_code == 401
        assert httpx.get(f"{gateway.url}/echo/keyed", headers={
            **other, "X-Api-Key": forged(key, attempt)}).status_code == 401
    assert alerts_logged(gateway, "login-burst") == []  # 4 each: under the threshold
    for attempt in range(4, 12):  # the 5th fires; the cooldown holds the rest back
        httpx.get(f"{gateway.url}/echo/keyed",
                  headers={**attacker, "X-Api-Key": forged(key, attempt)})
    posted = wait_for(lambda: webhooks.bodies("/ok/burst-ip"))
    assert len(posted) == 1
    body = posted[0]
    assert (body["source"], body["rule"], body["kind"], body["key"]) == (
        "apishield", "login-burst", "failed-auth-burst", "198.51.100.66")
    assert body["details"]["count"] == 5 and "198.51.100.66" in body["summary"]
    logged = wait_for(lambda: alerts_logged(gateway, "login-burst"))
    assert [(line["key"], line["alert_kind"], line["webhooks"]) for line in logged] == [
        ("198.51.100.66", "failed-auth-burst", ["ops"])]
    assert metric(gateway, "apishield_alerts_total", rule="login-burst") == 1
    assert wait_for(lambda: metric(gateway, "apishield_alert_deliveries_total",
                                   webhook="ops", outcome="delivered")) == 1
    time.sleep(0.3)
    assert len(webhooks.bodies("/ok/burst-ip")) == 1


def test_failed_auth_burst_by_account_counts_across_addresses(alerting, webhooks):
    gateway = alerting({
        "webhooks": {"ops": {"url": "/ok/burst-account"}},
        "rules": [{"name": "account-burst", "kind": "failed-auth-burst", "by": "account",
                   "window": "1h", "threshold": 6, "notify": ["ops"]}]})
    key = new_key(gateway)
    key_id = key.split("_")[1]
    for attempt in range(6):  # one account, six addresses: by ip none would reach 6
        assert httpx.get(f"{gateway.url}/echo/keyed", headers={
            **client(f"198.51.100.{100 + attempt}"),
            "X-Api-Key": forged(key, attempt)}).status_code == 401
    posted = wait_for(lambda: webhooks.bodies("/ok/burst-account"))
    assert [(body["key"], body["details"]["by"]) for body in posted] == [(key_id, "account")]


def test_logins_the_upstream_refuses_count_as_failed_authentications(alerting, webhooks):
    gateway = alerting({
        "webhooks": {"ops": {"url": "/ok/burst-upstream"}},
        "rules": [{"name": "stuffing", "kind": "failed-auth-burst", "window": "1h",
                   "threshold": 4, "severity": "critical", "notify": ["ops"]}]})
    for _ in range(4):  # a public operation answered 401: a wrong password upstream
        assert httpx.get(f"{gateway.url}/status/401",
                         headers=client("198.51.100.30")).status_code == 401
    [body] = wait_for(lambda: webhooks.bodies("/ok/burst-upstream"))
    assert (body["key"], body["severity"]) == ("198.51.100.30", "critical")
    [line] = alerts_logged(gateway, "stuffing")
    assert line["level"] == "critical"


def test_a_new_ban_alerts_every_configured_webhook_in_its_format(alerting, webhooks):
    gateway = alerting({
        "webhooks": {"ops": {"url": "/ok/ban-json"},
                     "chat": {"url": "/ok/ban-slack", "format": "slack"}},
        "rules": [{"name": "new-ban", "kind": "ban", "notify": ["ops", "chat"]}]},
        rate_limiting={"bans": {"rules": [
            {"name": "stuffing", "on": "authn-failure", "by": "ip", "threshold": 3,
             "window": "1m", "duration": "1m"}]}})
    key = new_key(gateway)
    for attempt in range(3):
        httpx.get(f"{gateway.url}/echo/keyed",
                  headers={**client("198.51.100.90"), "X-Api-Key": forged(key, attempt)})
    assert httpx.get(f"{gateway.url}/echo/open",
                     headers=client("198.51.100.90")).status_code == 403  # banned
    [body] = wait_for(lambda: webhooks.bodies("/ok/ban-json"))
    assert body["key"] == "ip:198.51.100.90"
    assert body["details"]["ban_rule"] == "stuffing"
    [slack] = wait_for(lambda: webhooks.bodies("/ok/ban-slack"))
    assert set(slack) == {"text"}
    assert "new-ban" in slack["text"] and "198.51.100.90" in slack["text"]
    # and into the audit trail (F5), beside the state file, with its chain intact
    trail = gateway.config_path.parent / "apishield-state.db.audit.jsonl"
    fired = wait_for(lambda: [record for record in map(json.loads,
                                                       trail.read_text().splitlines())
                              if record["action"] == "alert-fired"] if trail.exists() else [])
    assert fired[0]["details"]["rule"] == "new-ban"
    assert fired[0]["details"]["subject"] == "ip:198.51.100.90"
    verified = subprocess.run([sys.executable, "-m", "apishield", "audit-log", "verify",
                               str(trail)], capture_output=True, text=True, timeout=60,
                              check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_refusal_spike_by_reason_glob(alerting, webhooks):
    gateway = alerting({
        "webhooks": {"ops": {"url": "/ok/spike"}},
        "rules": [{"name": "key-refusals", "kind": "refusal-spike", "reason": "api-key-*",
                   "window": "1h", "threshold": 10, "notify": ["ops"]}]})
    for index in range(15):  # another reason: not counted
        assert httpx.delete(f"{gateway.url}/echo/users/1/x",
                            headers=client(f"198.51.100.{index}")).status_code in (404, 405)
    assert alerts_logged(gateway, "key-refusals") == []
    for index in range(10):
        assert httpx.get(f"{gateway.url}/echo/keyed", headers={
            **client(f"198.51.100.{index}"), "X-Api-Key": "junk"}).status_code == 401
    [body] = wait_for(lambda: webhooks.bodies("/ok/spike"))
    assert (body["key"], body["details"]["count"]) == ("api-key-malformed", 10)


def test_error_ratio_with_an_upstream_that_answers_500(alerting, webhooks):
    gateway = alerting({
        "webhooks": {"ops": {"url": "/ok/errors"}},
        "rules": [{"name": "errors", "kind": "error-ratio", "window": "1h",
                   "threshold": 0.25, "min_requests": 20, "notify": ["ops"]}]})
    for _ in range(20):  # healthy traffic first
        assert httpx.get(f"{gateway.url}/status/200").status_code == 200
    for _ in range(6):  # 6 of 26: 23%, under the threshold
        assert httpx.get(f"{gateway.url}/status/500").status_code == 500
    time.sleep(0.3)
    assert alerts_logged(gateway, "errors") == []
    assert httpx.get(f"{gateway.url}/status/500").status_code == 500  # 7 of 27: 26%
    [body] = wait_for(lambda: webhooks.bodies("/ok/errors"))
    assert (body["details"]["errors"], body["details"]["requests"]) == (7, 27)


def test_identity_far_above_its_own_baseline(alerting, webhooks):
    window = 2.0
    gateway = alerting({
        "webhooks": {"ops": {"url": "/ok/hog"}},
        "rules": [{"name": "hog", "kind": "identity-baseline", "window": window,
                   "factor": 5, "min_requests": 30, "notify": ["ops"]}]})
    quiet, busy = new_key(gateway), new_key(gateway)
    with httpx.Client(base_url=gateway.url) as http:
        for key in (quiet, busy):  # a first window: the baseline of each key is 2
            for _ in range(2):
                assert http.get("/echo/keyed", headers={"X-Api-Key": key}).status_code == 200
        for attempt in range(3):  # the burst inside one window (the clocks are shared)
            time.sleep(window - time.time() % window + 0.05)
            for _ in range(2):
                http.get("/echo/keyed", headers={"X-Api-Key": quiet})
            for _ in range(40):
                http.get("/echo/keyed", headers={"X-Api-Key": busy})
            if wait_for(lambda: webhooks.bodies("/ok/hog"), timeout=1):
                break
    posted = webhooks.bodies("/ok/hog")
    assert posted, f"no alert after {attempt + 1} bursts"
    busy_id = busy.split("_")[1]
    assert {body["key"] for body in posted} == {busy_id}  # the quiet key never fires
    assert posted[0]["details"]["count"] >= 30


def country_database(path: Path) -> Path:
    writer = mmdb_writer.MMDBWriter(ip_version=6, database_type="GeoLite2-Country",
                                    ipv4_compatible=True)
    writer.insert_network(IPSet(["203.0.113.0/24"]), {"country": {"iso_code": "FR"}})
    writer.insert_network(IPSet(["198.51.100.0/24"]), {"country": {"iso_code": "US"}})
    writer.to_db_file(str(path))
    return path


def test_country_outside_the_allowed_set_for_an_operation(alerting, webhooks, tmp_path):
    country_database(tmp_path / "countries.mmdb")
    gateway = alerting({
        "webhooks": {"ops": {"url": "/ok/geo"}},
        "geoip": {"database": str(tmp_path / "countries.mmdb")},
        "rules": [{"name": "geo", "kind": "country", "allow": ["FR"],
                   "operations": ["deleteUser"], "notify": ["ops"]}]})
    assert httpx.delete(f"{gateway.url}/echo/users/7", headers=client(FR)).status_code == 200
    assert httpx.get(f"{gateway.url}/echo/open", headers=client(US)).status_code == 200
    assert httpx.delete(f"{gateway.url}/echo/users/7").status_code == 200  # 127.0.0.1: none
    time.sleep(0.3)
    assert alerts_logged(gateway, "geo") == []
    assert httpx.delete(f"{gateway.url}/echo/users/7", headers=client(US)).status_code == 200
    [body] = wait_for(lambda: webhooks.bodies("/ok/geo"))
    assert body["details"]["country"] == "US" and body["details"]["client_ip"] == US
    assert body["details"]["operation"] == "deleteUser"


def test_a_hanging_webhook_slows_no_request_nor_the_other_webhook(alerting, webhooks):
    gateway = alerting({
        "webhooks": {"stuck": {"url": "/hang/1", "timeout": "20s", "retries": 0},
                     "ops": {"url": "/ok/beside-hang"}},
        "queue_size": 5,
        "rules": [{"name": "every-failure", "kind": "failed-auth-burst", "threshold": 1,
                   "rate_limit": "1000/m", "notify": ["stuck", "ops"]}]})
    started = time.monotonic()
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        codes = [http.get("/echo/keyed", headers={**client(f"198.51.100.{index}"),
                                                  "X-Api-Key": "junk"}).status_code
                 for index in range(50)]
    elapsed = time.monotonic() - started
    assert codes == [401] * 50
    # one POST hangs for 20 s; had a request waited for it, 50 requests took 1000 s
    assert elapsed < 15, elapsed
    # the other webhook is served meanwhile: everything its own small queue held
    def beside() -> tuple[int, float]:
        return (len(webhooks.bodies("/ok/beside-hang")), metric(
            gateway, "apishield_alert_deliveries_total", webhook="ops", outcome="dropped"))

    delivered, dropped = wait_for(lambda: sum(beside()) == 50 and beside())
    assert delivered >= 6 and delivered + dropped == 50
    assert len(webhooks.bodies("/hang/1")) == 1  # the one in flight, the rest queued
    # 1 in flight + 5 queued; the other 44 dropped and counted
    assert 44 <= metric(gateway, "apishield_alert_deliveries_total", webhook="stuck",
                        outcome="dropped") <= 45
    assert metric(gateway, "apishield_alerts_total", rule="every-failure") == 50
    assert gateway.stop() == 0  # stops promptly with a POST still hanging


def test_a_failing_webhook_is_retried_with_backoff_then_delivered(alerting, webhooks):
    gateway = alerting({
        "webhooks": {"flaky": {"url": "/flaky/2/a", "backoff": "50ms", "retries": 3}},
        "rules": [{"name": "spike", "kind": "refusal-spike", "threshold": 1,
                   "notify": ["flaky"]}]})
    assert httpx.get(f"{gateway.url}/nowhere").status_code == 404
    assert wait_for(lambda: metric(gateway, "apishield_alert_deliveries_total",
                                   webhook="flaky", outcome="delivered")) == 1
    posted = webhooks.bodies("/flaky/2/a")
    assert len(posted) == 3 and all(body["rule"] == "spike" for body in posted)
    assert metric(gateway, "apishield_alert_deliveries_total", webhook="flaky",
                  outcome="retried") == 2
    failures = gateway.security_events("alert-delivery-failed")
    assert [(line["webhook"], line["attempt"], line["error"], line["final"])
            for line in failures] == [("flaky", 1, "http-500", False),
                                      ("flaky", 2, "http-500", False)]


def test_a_webhook_that_keeps_failing_gives_up_after_its_retries(alerting, webhooks):
    gateway = alerting({
        "webhooks": {"down": {"url": "/flaky/99/b", "backoff": "10ms", "retries": 2}},
        "rules": [{"name": "spike", "kind": "refusal-spike", "threshold": 1,
                   "notify": ["down"]}]})
    assert httpx.get(f"{gateway.url}/nowhere").status_code == 404
    assert wait_for(lambda: metric(gateway, "apishield_alert_deliveries_total",
                                   webhook="down", outcome="failed")) == 1
    assert len(webhooks.bodies("/flaky/99/b")) == 3
    assert [line["final"] for line in gateway.security_events("alert-delivery-failed")] == [
        False, False, True]
    assert gateway.stop() == 0
    lines = json_lines(gateway.stderr())
    assert {"alert", "alert-delivery-failed"} <= {line.get("event") for line in lines}
    assert_schema(lines)  # the alert lines are the ones docs/logging.md documents


def test_a_webhook_url_from_a_secret_is_used_and_never_logged(alerting, webhooks,
                                                              monkeypatch):
    secret_path = "/ok/secret-T0123/B456/xyzzy-token"
    monkeypatch.setenv("APISHIELD_TEST_WEBHOOK_URL", webhooks.url + secret_path)
    gateway = alerting({
        "webhooks": {"chat": {"url_secret": {"env": "APISHIELD_TEST_WEBHOOK_URL"},
                              "format": "slack"},
                     "dead": {"url": f"http://127.0.0.1:{free_port()}/xyzzy-dead",
                              "backoff": "10ms", "retries": 0}},
        "rules": [{"name": "spike", "kind": "refusal-spike", "threshold": 1,
                   "notify": ["chat", "dead"]}]})
    assert httpx.get(f"{gateway.url}/nowhere").status_code == 404
    [slack] = wait_for(lambda: webhooks.bodies(secret_path))
    assert "spike" in slack["text"]
    [failure] = wait_for(lambda: gateway.security_events("alert-delivery-failed"))
    assert (failure["webhook"], failure["error"]) == ("dead", "unreachable")
    config = httpx.get(f"{gateway.admin_url}/config").text  # type: ignore[attr-defined]
    assert gateway.stop() == 0
    assert "xyzzy" not in gateway.stderr()  # neither URL: the webhooks are named
    assert "xyzzy-token" not in config
