"""Alerts (F3) in process: the window, EWMA and rate-limit arithmetic on a given clock, the
engine's deduplication and outputs, the config's errors, and `apishield check`.
End-to-end behaviour (a gateway, webhooks) is in test_alerts_e2e.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from apishield.config import ConfigError, config_from_dict
from apishield.config.alerts import Alerts
from apishield.observe import events
from apishield.observe.alert_feed import ALERT_FEED, FiredAlert
from apishield.observe.alerts import AlertEngine, Baseline, SlidingCounter, TokenBucket
from apishield.observe.metrics import Metrics
from tests.conftest import DATA


def test_sliding_counter_weighs_the_previous_window_by_its_overlap():
    counter = SlidingCounter(window=10, max_keys=100)
    for second in range(8):  # 8 in the window [0, 10)
        counter.add("a", 1000 + second * 0.1)
    assert counter.add("a", 1009.9) == 9
    # at 1012.5 the sliding window [1002.5, 1012.5) still holds 75% of the last one
    assert counter.add("a", 1012.5) == pytest.approx(9 * 0.75 + 1)
    # two windows later nothing of the old ones is left
    assert counter.add("a", 1035.0) == 1
    assert counter.add("b", 1035.0) == 1  # keys apart


def test_sliding_counter_evicts_the_coldest_key_at_its_bound():
    counter = SlidingCounter(window=60, max_keys=3)
    for key in ("a", "b", "c"):
        counter.add(key, 0)
    counter.add("a", 1)  # a is warm again: b is now the coldest
    counter.add("d", 2)
    assert list(counter.keys) == ["c", "a", "d"]
    assert counter.add("b", 3) == 1  # b starts again from zero
    assert len(counter.keys) == 3


def test_baseline_is_an_ewma_of_closed_windows_decayed_over_idle_ones():
    baseline = Baseline(window=60, max_keys=10, alpha=0.5)
    assert baseline.add("k", 0) == (1, None)  # no full window yet: no baseline
    for _ in range(9):
        count, usual = baseline.add("k", 1)
    assert (count, usual) == (10, None)
    assert baseline.add("k", 60) == (1, 10)  # first closed window: the baseline is it
    for _ in range(29):
        baseline.add("k", 61)
    assert baseline.add("k", 120) == (1, 20.0)  # 10 + 0.5 * (30 - 10)
    # three windows later: the one just closed (1 request), then two idle ones
    count, usual = baseline.add("k", 300)
    assert count == 1 and usual == pytest.approx((20 + 0.5 * (1 - 20)) * 0.5 ** 2)


def test_token_bucket_caps_deliveries_per_period():
    bucket = TokenBucket(2, 60.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]
    assert bucket.take(29.0) is False  # 0.97 of a token
    assert bucket.take(31.0) is True


def engine(rules: list[dict[str, Any]], clock: list[float],
           webhooks: dict[str, Any] | None = None) -> tuple[AlertEngine, Metrics]:
    metrics = Metrics()
    config = Alerts.model_validate({"webhooks": webhooks or {}, "rules": rules})
    return AlertEngine(config, ".", metrics, clock=lambda: clock[0]), metrics


def failure(ip: str, subject: str | None = None) -> dict[str, object]:
    return {"event": "authn-failure", "client_ip": ip, "operation": "op",
            "scheme": "apiKey", "reason": "api-key-mismatch",
            **({"subject": subject} if subject else {})}


def test_one_alert_per_rule_and_key_per_cooldown_and_listeners_see_it():
    clock = [1000.0]
    alerts, metrics = engine([{"name": "burst", "kind": "failed-auth-burst",
                               "threshold": 3, "window": "1m", "cooldown": "5m"}], clock)
    seen: list[FiredAlert] = []
    alerts.listeners.append(seen.append)
    fired_before = ALERT_FEED.fired
    for _ in range(10):
        alerts.event(failure("198.51.100.1"))
    assert [(a.rule, a.key, a.details["count"]) for a in seen] == [("burst", "198.51.100.1", 3)]
    assert ALERT_FEED.fired == fired_before + 1
    assert ALERT_FEED.recent(1)[0] == seen[0]
    assert alerts.states["burst"].suppressed == 7
    clock[0] += 301  # past the cooldown: the burst goes on, it fires again
    for _ in range(3):
        alerts.event(failure("198.51.100.1"))
    assert len(seen) == 2
    assert metrics.alerts == {"burst": 2}


def test_by_account_ignores_failures_of_unknown_accounts():
    clock = [0.0]
    alerts, _ = engine([{"name": "acct", "kind": "failed-auth-burst", "by": "account",
                         "threshold": 2}], clock)
    for index in range(5):
        alerts.event(failure(f"198.51.100.{index}"))  # no subject, no key id
    assert alerts.states["acct"].fired == {}
    alerts.event(failure("198.51.100.1", "alice"))
    alerts.event(failure("198.51.100.2", "alice"))
    assert list(alerts.states["acct"].fired) == ["alice"]


def test_over_its_rate_limit_a_rule_still_logs_but_delivers_nothing(caplog):
    clock = [0.0]
    alerts, metrics = engine(
        [{"name": "every", "kind": "refusal-spike", "threshold": 1, "rate_limit": "2/m",
          "notify": ["ops"]}], clock, webhooks={"ops": {"url": "http://127.0.0.1:9/x"}})
    with caplog.at_level("INFO", logger="apishield.security"):
        for index in range(4):  # four reasons: four keys, four alerts
            alerts.request(403, "refused", f"reason-{index}", "198.51.100.1", None, None)
    logged = [r for r in caplog.records if getattr(r, "apishield_fields", ("",))[0]
              == "security"]
    assert len(logged) == 4
    # not started: the two within the rate limit find no queue and are dropped
    assert metrics.alert_deliveries == {("ops", "dropped"): 2, ("ops", "rate-limited"): 2}


def test_error_ratio_needs_its_minimum_of_requests():
    clock = [0.0]
    alerts, _ = engine([{"name": "errors", "kind": "error-ratio", "threshold": 0.5,
                         "min_requests": 4, "window": "1h"}], clock)
    for status in (500, 500, 500):  # 100%, but three requests
        alerts.request(status, "error", None, "198.51.100.1", None, None)
    assert alerts.states["errors"].fired == {}
    alerts.request(500, "error", None, "198.51.100.1", None, None)
    assert list(alerts.states["errors"].fired) == ["all"]


def test_nobody_subscribed_means_no_publishing():
    assert events.subscribers == ()  # the default: an event costs one truth test more


@pytest.mark.parametrize(("alerts", "expected"), [
    ({"rules": [{"name": "r", "kind": "ban", "notify": ["nope"]}]},
     "alerts.rules.0.notify: 'nope' is not a webhook under alerts.webhooks"),
    ({"rules": [{"name": "r", "kind": "flood"}]}, "alerts.rules.0.kind: Input should be"),
    ({"rules": [{"name": "r", "kind": "refusal-spike", "threshold": 0}]},
     "alerts.rules.0.threshold: Input should be greater than 0"),
    ({"rules": [{"name": "r", "kind": "error-ratio", "threshold": 5}]},
     "alerts.rules.0.threshold: is the share of 5xx answers, between 0 and 1"),
    ({"rules": [{"name": "r", "kind": "ban", "factor": 3}]},
     "alerts.rules.0.factor: does not apply to a ban rule (only to identity-baseline)"),
    ({"rules": [{"name": "r", "kind": "country", "allow": ["FR"]}]},
     "alerts.rules.0.kind: a country rule needs alerts.geoip.database"),
    ({"geoip": {"database": "x.mmdb"}, "rules": [{"name": "r", "kind": "country",
                                                  "allow": ["france"]}]},
     "alerts.rules.0.allow: Value error, 'france' is not an ISO 3166-1 alpha-2"),
    ({"rules": [{"name": "r", "kind": "ban"}, {"name": "r", "kind": "ban"}]},
     "alerts.rules.1.name: 'r' is used by another rule"),
    ({"webhooks": {"w": {"url": "https://x.example", "url_secret": {"env": "X"}}}},
     "alerts.webhooks.w: give exactly one of `url` or `url_secret`"),
    ({"webhooks": {"w": {"url": "ftp://x.example"}}},
     "alerts.webhooks.w.url: must be an http:// or https:// URL"),
    ({"webhooks": {"w": {"url": "https://x.example", "headers": {"Authorization": "x"}}}},
     "alerts.webhooks.w.headers.Authorization: holds a credential: move it to"),
])
def test_bad_alert_config_is_refused_at_its_location(alerts, expected):
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"contract": "contract.yaml", "alerts": alerts}, source_dir=DATA)
    assert any(problem.replace("Value error, ", "").startswith(
        expected.replace("Value error, ", "")) for problem in caught.value.problems), \
        caught.value.problems


def check(tmp_path: Path, alerts: dict[str, Any], **env: str) -> subprocess.CompletedProcess[str]:
    import os
    import shutil

    import yaml

    for name in ("contract.yaml", "paths.yaml"):
        shutil.copy(DATA / name, tmp_path / name)
    config = tmp_path / "apishield.yaml"
    config.write_text(yaml.safe_dump({"contract": "contract.yaml",
                                      "upstream": {"url": "http://127.0.0.1:9"},
                                      "alerts": alerts}))
    return subprocess.run([sys.executable, "-m", "apishield", "check", "--config",
                           str(config)], capture_output=True, text=True, timeout=60,
                          check=False, env={**os.environ, **env})


def test_check_reports_an_unknown_webhook_name(tmp_path):
    result = check(tmp_path, {"webhooks": {"ops": {"url": "https://hooks.example/a"}},
                              "rules": [{"name": "r", "kind": "ban", "notify": ["chat"]}]})
    assert result.returncode != 0
    assert "alerts.rules.0.notify: 'chat' is not a webhook under alerts.webhooks (ops)" \
        in result.stderr


def test_check_reports_a_missing_geoip_database_and_an_unset_url_secret(tmp_path):
    result = check(tmp_path, {"geoip": {"database": "GeoLite2-Country.mmdb"},
                              "rules": [{"name": "geo", "kind": "country", "allow": ["FR"]}]})
    assert result.returncode != 0
    assert "alerts.geoip.database:" in result.stderr
    assert "GeoLite2-Country.mmdb does not exist" in result.stderr
    (tmp_path / "junk.mmdb").write_bytes(b"not a database")
    result = check(tmp_path, {"geoip": {"database": "junk.mmdb"}, "rules": [
        {"name": "geo", "kind": "country", "allow": ["FR"]}]})
    assert "alerts.geoip.database: cannot read" in result.stderr
    result = check(tmp_path, {"webhooks": {"chat": {"url_secret": {
        "env": "APISHIELD_TEST_UNSET_HOOK"}}}, "rules": [{"name": "b", "kind": "ban",
                                                           "notify": ["chat"]}]})
    assert result.returncode != 0
    assert "alerts.webhooks.chat.url_secret: environment variable APISHIELD_TEST_UNSET_HOOK" \
        in result.stderr


def test_check_accepts_a_good_alert_config(tmp_path):
    result = check(tmp_path, {"webhooks": {"chat": {"url_secret": {"env": "HOOK"},
                                                    "format": "slack"}},
                              "rules": [{"name": "b", "kind": "ban", "notify": ["chat"]}]},
                   HOOK="https://hooks.slack.example/T/B/X")
    assert result.returncode == 0, result.stderr
    assert "hooks.slack.example" not in result.stdout + result.stderr
    assert "warning" not in result.stderr


def test_check_warns_of_a_webhook_over_plain_http_to_another_host(tmp_path):
    result = check(tmp_path, {"webhooks": {
        "far": {"url_secret": {"env": "HOOK"}},
        "near": {"url": "http://127.0.0.1:9/hook"}},
        "rules": [{"name": "b", "kind": "ban", "notify": ["far", "near"]}]},
        HOOK="http://hooks.example/T/xyzzy")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "alerts.webhooks" in line]
    assert warnings == ["warning: alerts.webhooks.far: plain HTTP to another host: anyone on "
                        "the path reads the alerts (and any secret header); use https://"]
    assert "xyzzy" not in result.stdout + result.stderr


def test_a_reload_keeps_the_rules_state_only_when_alerts_is_unchanged():
    from apishield.contract.loader import load_contract
    from apishield.pipeline import Pipeline

    rules = {"rules": [{"name": "burst", "kind": "failed-auth-burst", "threshold": 2}]}
    base = {"contract": "contract.yaml", "access_log": {"enabled": False}}
    config = config_from_dict({**base, "alerts": rules}, source_dir=DATA)
    contract = load_contract(config)
    first = Pipeline(config, contract)
    same = Pipeline(config_from_dict({**base, "alerts": rules, "mode": "log-only"},
                                     source_dir=DATA), contract, previous=first)
    assert "alerts" in same.kept and same.alerts is first.alerts
    changed = config_from_dict({**base, "alerts": {"rules": [
        {"name": "burst", "kind": "failed-auth-burst", "threshold": 3}]}}, source_dir=DATA)
    fresh = Pipeline(changed, contract, previous=same)
    assert "alerts" not in fresh.kept and fresh.alerts is not first.alerts
    none = Pipeline(config_from_dict(base, source_dir=DATA), contract, previous=fresh)
    assert none.alerts is None  # no rules: nothing on the request path
    for pipeline in (first, fresh, none):
        pipeline.close()


async def test_the_middleware_runs_the_same_rules(tmp_path):
    import asyncio
    import shutil

    import httpx
    import yaml

    from tests.middleware_app import create_app
    from tests.webhook_server import start_webhooks

    shutil.copy(DATA / "middleware_contract.yaml", tmp_path)
    hooks = start_webhooks()
    try:
        config = tmp_path / "apishield.yaml"
        config.write_text(yaml.safe_dump({
            "contract": "middleware_contract.yaml", "access_log": {"enabled": False},
            "alerts": {"webhooks": {"ops": {"url": f"{hooks.url}/ok/middleware"}},
                       "rules": [{"name": "spike", "kind": "refusal-spike", "threshold": 3,
                                  "notify": ["ops"]}]}}))
        app = create_app(config)
        lifespan: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        await lifespan.put({"type": "lifespan.startup"})
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        running = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}},
                                          lifespan.get, send))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            codes = [(await c.get("/nowhere")).status_code for _ in range(3)]
        assert codes == [404] * 3
        for _ in range(200):
            if hooks.bodies("/ok/middleware"):
                break
            await asyncio.sleep(0.05)
        [body] = hooks.bodies("/ok/middleware")
        assert (body["rule"], body["details"]["count"]) == ("spike", 3)
        await lifespan.put({"type": "lifespan.shutdown"})
        await running
        assert sent[-1] == {"type": "lifespan.shutdown.complete"}
    finally:
        hooks.stop()


async def test_an_alert_sent_from_another_thread_is_handed_to_the_loop():
    import asyncio
    import threading

    from apishield.config.alerts import Webhook
    from apishield.observe.webhooks import Delivery, resolve
    from tests.webhook_server import start_webhooks

    hooks = start_webhooks()
    metrics = Metrics()
    delivery = Delivery({"ops": resolve("ops", Webhook(url=f"{hooks.url}/ok/thread"), ".")},
                        10, metrics)
    try:
        await delivery.start()
        alert = FiredAlert("r", "ban", "ip:198.51.100.1", 0.0, "banned")
        thread = threading.Thread(target=delivery.send, args=(alert, ("ops",)))
        thread.start()
        thread.join()
        for _ in range(200):
            if metrics.alert_deliveries:
                break
            await asyncio.sleep(0.05)
        assert metrics.alert_deliveries == {("ops", "delivered"): 1}
        assert [body["key"] for body in hooks.bodies("/ok/thread")] == ["ip:198.51.100.1"]
    finally:
        await delivery.stop()
        hooks.stop()


def test_country_lookup_reads_a_maxmind_database(tmp_path):
    from apishield.observe.geoip import CountryLookup
    from tests.test_alerts_e2e import country_database

    lookup = CountryLookup(country_database(tmp_path / "c.mmdb"))
    try:
        assert lookup.country("203.0.113.7") == "FR"
        assert lookup.country("::ffff:203.0.113.7") == "FR"  # IPv4-mapped IPv6
        assert lookup.country("198.51.100.20") == "US"
        assert lookup.country("127.0.0.1") is None
        assert lookup.country("2001:db8::1") is None
        assert lookup.country("not an address") is None
    finally:
        lookup.close()
