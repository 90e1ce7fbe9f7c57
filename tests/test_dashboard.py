"""The live dashboard (issue 14): its parts in-process, its endpoints on a real gateway's
admin listener and under the middleware's admin mount, and the page itself in a real
headless Chromium against a gateway under scripted traffic."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from apishield.admin.dashboard import ASSETS, asset
from apishield.observe.alert_feed import ALERT_FEED, FiredAlert
from apishield.observe.history import History, quantile
from apishield.observe.metrics import DURATION_BUCKETS, Metrics
from apishield.observe.refusers import REFUSERS, Refusers
from tests.chromium import Chromium, find_chromium
from tests.conftest import DATA, free_port, wait_for
from tests.middleware_app import create_app

TOKEN = "dashboard-admin-token-0123456789"
HOSTILE = "<img src=x onerror=\"document.title='pwned'\">"
ARTIFACTS = Path(__file__).parent / "artifacts"


# --- the parts -------------------------------------------------------------------------

def test_refusers_rank_by_refusals_and_stay_bounded() -> None:
    refusers = Refusers(keep=3)
    for _ in range(5):
        refusers.count("198.51.100.1", "route-not-declared", 10.0)
    refusers.count("198.51.100.2", "client-banned", 11.0)
    refusers.count("198.51.100.2", "body-over-limit", 12.0)
    refusers.count(None, "x", 13.0)
    top = refusers.top(2)
    assert [(r.ip, r.refusals, r.last_reason) for r in top] == [
        ("198.51.100.1", 5, "route-not-declared"), ("198.51.100.2", 2, "body-over-limit")]
    assert refusers.top(10)[-1].ip == "unknown"
    # a flood of fresh addresses: never more than twice `keep`, the big ones survive
    for n in range(1000):
        refusers.count(f"2001:db8::{n:x}", "route-not-declared", 20.0 + n)
        assert len(refusers) <= 6
    assert refusers.top(1)[0].ip == "198.51.100.1"
    assert refusers.pruned > 990


def test_history_samples_rates_and_refusals_since_the_first_sample() -> None:
    metrics = Metrics()
    history = History(metrics, interval=2.0, window=10.0)
    metrics.request("op", "GET", 404, "refused", 0.001, "route-not-declared")  # before: base
    assert history.tick(100.0)
    assert history.samples[0].reasons == {}
    assert not history.tick(101.0)  # too early: no sample
    for _ in range(4):
        metrics.request("op", "GET", 200, "allowed", 0.002, None)
    metrics.request("op", "GET", 413, "refused", 0.001, "body-over-limit")
    metrics.request("op", "GET", 502, "error", 0.003, "upstream-unreachable")
    assert history.tick(102.0)
    sample = history.samples[-1]
    assert (sample.requests, sample.refused, sample.errors) == (7, 2, 1)
    assert sample.reasons == {"body-over-limit": 1, "upstream-unreachable": 1}
    for at in range(104, 130, 2):
        history.tick(float(at))
    assert len(history.samples) == 6  # 10 s of 2 s samples, both ends kept
    assert history.tick(50.0)  # the wall clock was set back: sample rather than stall


def test_quantiles_interpolate_inside_buckets() -> None:
    counts = [0] * (len(DURATION_BUCKETS) + 1)
    assert quantile(counts, 0.5) is None
    counts[DURATION_BUCKETS.index(0.01)] = 10  # ten requests between 5 and 10 ms
    assert quantile(counts, 0.5) == pytest.approx(0.0075)
    counts[-1] = 90  # ninety beyond the largest bound
    assert quantile(counts, 0.99) == DURATION_BUCKETS[-1]


def test_the_page_runs_no_inline_code_and_writes_data_as_text_only() -> None:
    html = asset("/dashboard").decode()
    script = asset("/dashboard/app.js").decode()
    code = "\n".join(line for line in script.splitlines()
                     if not line.lstrip().startswith("//"))  # the code, not its comments
    # everything it runs or styles comes from its own files (the CSP allows nothing inline)
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="dashboard/app.js" defer>']
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"<[^>]*\son[a-z]+\s*=", html, re.IGNORECASE)  # no handler attribute
    # no HTML parsing of anything: data from requests is attacker input
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "localStorage"):
        assert sink not in code, sink
    assert "sessionStorage" in code


def test_the_assets_ship_as_package_data() -> None:
    """An installed (not editable) apishield has its page: pyproject's package-data names
    every asset the dashboard serves."""
    import fnmatch
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["apishield"]
    for name, _ in ASSETS.values():
        assert any(fnmatch.fnmatch(f"admin/static/{name}", p) for p in patterns), name


# --- the endpoints on a real gateway ---------------------------------------------------

@pytest.fixture
def dashboard_gateway(make_gateway: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, str]:
    """A gateway with a token-protected admin listener, a trusted proxy on loopback (so a
    test presents any client address in X-Forwarded-For) and a ban rule on probing."""
    monkeypatch.setenv("APISHIELD_TEST_DASHBOARD_TOKEN", TOKEN)
    port = free_port()
    gateway = make_gateway({
        "admin": {"port": port, "token_env": "APISHIELD_TEST_DASHBOARD_TOKEN"},
        "trusted_proxies": ["127.0.0.1/32"],
        "rate_limiting": {"bans": {"rules": [{
            "name": "probing", "on": "not-found", "by": "ip", "threshold": 3,
            "window": "1m", "duration": "10m"}]}},
    })
    return gateway, f"http://127.0.0.1:{port}"


def scripted_traffic(gateway: Any) -> None:
    """Allowed requests, two refusal reasons from two presented clients, and a ban."""
    with httpx.Client(base_url=gateway.url) as client:
        for _ in range(6):
            assert client.get("/echo", headers={"x-forwarded-for": "192.0.2.10"}
                              ).status_code == 200
        prober = {"x-forwarded-for": "198.51.100.23"}
        for _ in range(3):
            assert client.get("/wp-login.php", headers=prober).status_code == 404
        # the third 404 banned it: refused before routing from now on
        assert client.get("/echo", headers=prober).status_code == 403
        for _ in range(2):
            assert client.post("/echo/small", content=b'{"padding": "more than 16 bytes"}',
                               headers={"x-forwarded-for": "198.51.100.24",
                                        "content-type": "application/json"}
                               ).status_code == 413


def test_data_needs_the_token_the_page_and_assets_do_not(
        dashboard_gateway: tuple[Any, str]) -> None:
    gateway, admin = dashboard_gateway
    for path, (_, content_type) in ASSETS.items():
        response = httpx.get(f"{admin}{path}")
        assert response.status_code == 200, path
        assert response.headers["content-type"] == content_type.decode()
        assert response.headers["x-content-type-options"] == "nosniff"
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "unsafe-inline" not in policy
        assert response.headers["x-frame-options"] == "DENY"
    assert httpx.get(f"{admin}/dashboard/data").status_code == 401
    wrong = httpx.get(f"{admin}/dashboard/data", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wait_for(lambda: gateway.security_events("admin-unauthorized"))
    data = httpx.get(f"{admin}/dashboard/data", headers={"authorization": f"Bearer {TOKEN}"})
    assert data.status_code == 200
    assert data.headers["cache-control"] == "no-store"
    assert data.headers["content-type"] == "application/json"
    assert set(data.json()) >= {"totals", "rate", "refusals", "refusers", "bans", "alerts",
                                "latency"}


def test_data_shows_the_traffic_sent(dashboard_gateway: tuple[Any, str]) -> None:
    gateway, admin = dashboard_gateway
    scripted_traffic(gateway)
    auth = {"authorization": f"Bearer {TOKEN}"}
    data = httpx.get(f"{admin}/dashboard/data", headers=auth).json()
    assert data["totals"]["requests"] >= 12
    assert data["totals"]["refused"] >= 6
    reasons = {row["reason"]: row for row in data["refusals"]}
    assert reasons["route-not-declared"]["total"] >= 3
    assert reasons["body-over-limit"]["total"] >= 2
    refusers = {row["ip"]: row for row in data["refusers"]}
    assert refusers["198.51.100.23"]["refusals"] >= 4
    assert refusers["198.51.100.23"]["last_reason"] == "banned:probing"
    assert refusers["198.51.100.24"]["refusals"] >= 2
    assert "192.0.2.10" not in refusers  # allowed requests are not counted
    assert data["bans"]["active"] == 1
    assert data["bans"]["list"][0]["value"] == "198.51.100.23"
    assert data["bans"]["list"][0]["rule"] == "probing"
    latency = {row["operation"]: row for row in data["latency"]["operations"]}
    assert latency["echoGet"]["count"] >= 6
    assert latency["echoGet"]["p50_ms"] > 0
    # the admin listener samples every 2 s on its own: a past builds up without polls
    later = wait_for(lambda: [point for point in httpx.get(
        f"{admin}/dashboard/data", headers=auth).json()["rate"] if point["requests"] > 0],
        timeout=20)
    assert later, "no sample saw the requests"


# --- under the middleware --------------------------------------------------------------

async def test_middleware_mount_serves_the_dashboard_with_an_alert(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APISHIELD_TEST_MW_DASHBOARD_TOKEN", TOKEN)
    shutil.copy(DATA / "middleware_contract.yaml", tmp_path / "middleware_contract.yaml")
    config = tmp_path / "middleware.yaml"
    config.write_text("contract: middleware_contract.yaml\naccess_log: {enabled: false}\n"
                      "admin: {token_env: APISHIELD_TEST_MW_DASHBOARD_TOKEN}\n")
    app = create_app(config)
    # the table is per process: other tests' refusals must not push this client out of the
    # top ten (monkeypatch puts them back afterwards)
    monkeypatch.setattr(REFUSERS, "_table", {})
    alert = FiredAlert(rule="stuffing", kind="failed-auth-burst", key="203.0.113.50",
                       at=1_800_000_000.0, summary="<b>12 failed logins</b> in 1 min",
                       details={"count": 12})
    ALERT_FEED.add(alert)  # as the alert engine would, in this process
    transport = httpx.ASGITransport(app=app, client=("203.0.113.77", 40000))
    auth = {"authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        assert (await client.get("/admin")).status_code == 404  # undeclared: refused
        page = await client.get("/_apishield/dashboard")
        assert page.status_code == 200 and b'src="dashboard/app.js"' in page.content
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert (await client.get("/_apishield/dashboard/app.css")).status_code == 200
        assert (await client.get("/_apishield/dashboard/data")).status_code == 401
        response = await client.get("/_apishield/dashboard/data", headers=auth)
    assert response.status_code == 200
    data = response.json()
    assert data["counting"] is True
    assert data["alerts"]["fired"] >= 1
    assert alert.as_dict() in data["alerts"]["recent"]
    refusers = {row["ip"]: row for row in data["refusers"]}
    assert refusers["203.0.113.77"]["last_reason"] == "route-not-declared"


async def test_the_snapshot_says_when_nothing_is_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(DATA / "middleware_contract.yaml", tmp_path / "middleware_contract.yaml")
    config = tmp_path / "middleware.yaml"
    config.write_text("contract: middleware_contract.yaml\naccess_log: {enabled: false}\n"
                      "metrics: {enabled: false}\nadmin: {}\n")
    transport = httpx.ASGITransport(app=create_app(config), client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/_apishield/dashboard/data")
    assert response.status_code == 200
    assert response.json()["counting"] is False


# --- the page in a real browser --------------------------------------------------------

@pytest.fixture
def chromium_binary() -> str:
    """The browser, looked for before any gateway starts (a skip costs nothing)."""
    return find_chromium()


TABLE = """[...document.querySelectorAll('#{name}-table tbody tr')]
  .map(tr => [...tr.cells].map(td => td.textContent))"""


@pytest.mark.timeout(180)  # a browser start on a loaded 2-core CI machine
def test_the_page_in_headless_chromium(chromium_binary: str,
                                       dashboard_gateway: tuple[Any, str],
                                       tmp_path: Path) -> None:
    gateway, admin = dashboard_gateway
    scripted_traffic(gateway)
    # an account name is the caller's own input (a token's subject): ban one that is HTML
    added = subprocess.run(
        [sys.executable, "-m", "apishield", "bans", "add", "--subject", HOSTILE,
         "--duration", "30m", "--config", str(gateway.config_path)],
        capture_output=True, text=True, timeout=60, check=False)
    assert added.returncode == 0, added.stderr
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert wait_for(lambda: httpx.get(f"{admin}/dashboard/data", headers=auth
                                      ).json()["bans"]["active"] == 2)  # the next refresh
    browser = Chromium(chromium_binary, tmp_path / "chromium-profile")
    try:
        browser.navigate(f"{admin}/dashboard?poll=1")
        # no token in the tab yet: the page asks for it and shows no panel
        assert browser.wait_for("!document.getElementById('token-form').hidden")
        assert browser.evaluate("document.getElementById('panels').hidden") is True
        browser.evaluate(f"""document.getElementById('token').value = {TOKEN!r};
            document.querySelector('#token-form button[type=submit]').click(); true""")
        # the charts update: several polls, and the rate chart has points to draw
        updated = browser.wait_for(
            "Number(document.body.dataset.updates || 0) >= 3 && "
            "document.querySelector('#rate-chart polyline.requests')"
            ".getAttribute('points').split(' ').length >= 2")
        assert updated, browser.evaluate("document.getElementById('status').textContent")
        assert browser.evaluate(f"sessionStorage.getItem('apishield.admin.token') === {TOKEN!r}")
        assert browser.evaluate("localStorage.length") == 0
        assert browser.evaluate("document.getElementById('token-form').hidden") is True

        reasons = {row[0]: row for row in browser.evaluate(TABLE.format(name="reasons"))}
        assert int(reasons["route-not-declared"][1]) >= 3
        assert int(reasons["body-over-limit"][1]) >= 2
        assert int(reasons["banned:probing"][1]) >= 1
        assert browser.evaluate(
            "document.querySelectorAll('#reasons-chart rect.bar').length") >= 3
        refusers = {row[0]: row for row in browser.evaluate(TABLE.format(name="refusers"))}
        assert int(refusers["198.51.100.23"][1]) >= 4
        assert int(refusers["198.51.100.24"][1]) >= 2
        assert "192.0.2.10" not in refusers
        bans = browser.evaluate(TABLE.format(name="bans"))
        assert [(row[0], row[1], row[2]) for row in bans] == [
            ("ip", "198.51.100.23", "probing"), ("subject", HOSTILE, "manual")]
        # shown as text: no element came out of it, its handler never ran
        assert browser.evaluate("document.querySelectorAll('#bans-table img').length") == 0
        assert browser.evaluate("document.title") == "apishield: live dashboard"
        assert browser.evaluate("document.getElementById('total-bans').textContent") == "2"
        # no alert engine runs here: the empty state shows
        assert browser.evaluate("document.querySelectorAll('#alerts-list li').length") == 0
        assert browser.evaluate("document.getElementById('alerts-empty').hidden") is False
        assert browser.evaluate("document.getElementById('alerts-empty').textContent") == (
            "No alerts fired.")
        latency = {row[0]: row for row in browser.evaluate(TABLE.format(name="latency"))}
        assert int(latency["echoGet"][1]) >= 6
        assert int(browser.evaluate(
            "document.getElementById('total-requests').textContent")) >= 12
        # the page broke none of its own rules (a CSP violation is a console error); the
        # one failed load expected is the first poll's, made before the token was given
        assert [line for line in browser.console if "401 (Unauthorized)" not in line] == []
        browser.screenshot(ARTIFACTS / "dashboard.png")
    finally:
        browser.close()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
