"""Distributed mode: gateways sharing one real redis-server (issue 5, checklist D6).

Two `apishield serve` processes with `state: redis://...` are driven together: the limit
holds for both together (within 5%), a ban made by one is enforced by the other, and when
Redis goes away the default `on_store_error: deny` answers 503 until it is back, with no
restart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import RunningGateway, start_gateway
from tests.redis_server import RedisServer, running_redis

CONTRACT = """
openapi: 3.1.0
info: {title: redis limits, version: "1"}
security: []
paths:
  /echo/limited:
    get: {operationId: limited, responses: {"200": {description: ok}}}
  /echo/open:
    get: {operationId: open, responses: {"200": {description: ok}}}
  /echo/probe/{n}:
    get:
      operationId: probe
      parameters: [{name: n, in: path, required: true, schema: {type: integer}}]
      responses: {"200": {description: ok}}
"""

RATE, BURST = 100, 10  # per second


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, upstream_url: str,
         redis: RedisServer) -> Iterator[tuple[RunningGateway, RunningGateway]]:
    overrides = {
        "state": redis.url,
        "trusted_proxies": ["127.0.0.1/32"],
        "auth": {"api_keys": {"pepper": {"file": "pepper"}}},
        "rate_limiting": {
            "limits": [{"name": "shared", "key": ["ip"], "rate": f"{RATE}/s",
                        "burst": BURST, "operations": ["limited"]}],
            "bans": {"rules": [{"name": "probing", "on": "validation", "threshold": 3,
                                "window": "1m", "duration": "1h"}]},
        },
    }
    running = []
    for name in ("a", "b"):
        workdir = tmp_path_factory.mktemp(f"gw-{name}")
        (workdir / "pepper").write_text("x" * 43)
        (workdir / "pepper").chmod(0o600)
        contract = workdir / "redis-contract.yaml"
        contract.write_text(CONTRACT)
        running.append(start_gateway(workdir, upstream_url, overrides, contract=contract))
    yield running[0], running[1]
    for gateway in running:
        gateway.stop()


def _drive(url: str, ip: str, start: float, until: float, admitted: list[int]) -> None:
    count = 0
    with httpx.Client(headers={"X-Forwarded-For": ip}) as client:
        client.get(f"{url}/echo/open")  # connect before the measured window
        while time.monotonic() < start:
            time.sleep(0.001)
        while time.monotonic() < until:
            if client.get(f"{url}/echo/limited").status_code == 200:
                count += 1
    admitted.append(count)


def test_two_gateways_together_admit_the_limit_within_5_percent(pair):
    a, b = pair
    ip = "198.51.100.10"
    admitted: list[int] = []
    started = time.monotonic() + 0.5  # all four clients connected and waiting
    until = started + 3.0
    threads = [threading.Thread(target=_drive, args=(gw.url, ip, started, until, admitted))
               for gw in (a, a, b, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = until - started
    allowed = BURST + RATE * elapsed
    total = sum(admitted)
    print(f"admitted {total} of {allowed:.0f} allowed: {admitted}")
    assert abs(total - allowed) <= 0.05 * allowed, (total, allowed, admitted)
    # both gateways admitted a share: the limit is shared, not per instance
    assert admitted[0] + admitted[1] > 0 and admitted[2] + admitted[3] > 0


def test_a_ban_made_by_one_gateway_is_enforced_by_the_other(pair):
    a, b = pair
    ip = {"X-Forwarded-For": "198.51.100.20"}
    for _ in range(3):  # three contract refusals at gateway a
        assert httpx.get(f"{a.url}/echo/probe/not-a-number", headers=ip).status_code == 400
    deadline = time.monotonic() + 5
    status = 200
    while time.monotonic() < deadline and status != 403:
        status = httpx.get(f"{b.url}/echo/open", headers=ip).status_code
        time.sleep(0.1)
    assert status == 403


def test_store_down_is_503_then_recovers_without_restart(pair, redis):
    a, _ = pair
    ip = {"X-Forwarded-For": "198.51.100.30"}
    assert httpx.get(f"{a.url}/echo/limited", headers=ip).status_code == 200
    redis.stop()
    try:
        time.sleep(1.2)  # past any lease the gateway still held
        down = httpx.get(f"{a.url}/echo/limited", headers={"X-Forwarded-For": "198.51.100.31"},
                         timeout=10)
        assert down.status_code == 503
        assert "rate-limit-store-unavailable" in a.log_entry(down.headers["x-request-id"])[
            "reason"]
        # operations without a limit are not affected
        assert httpx.get(f"{a.url}/echo/open", headers=ip).status_code == 200
    finally:
        redis.start()
    deadline = time.monotonic() + 10
    status = 503
    while time.monotonic() < deadline and status != 200:
        status = httpx.get(f"{a.url}/echo/limited",
                           headers={"X-Forwarded-For": "198.51.100.32"}).status_code
        time.sleep(0.2)
    assert status == 200





def test_on_store_error_allow_lets_requests_through_while_redis_is_down(
        tmp_path, upstream_url, redis):
    (tmp_path / "pepper").write_text("x" * 43)
    (tmp_path / "pepper").chmod(0o600)
    contract = tmp_path / "redis-contract.yaml"
    contract.write_text(CONTRACT)
    gateway = start_gateway(tmp_path, upstream_url, {
        "state": redis.url,
        "auth": {"api_keys": {"pepper": {"file": "pepper"}}},
        "rate_limiting": {"on_store_error": "allow", "limits": [
            {"name": "shared", "key": ["ip"], "rate": f"{RATE}/s", "burst": BURST,
             "operations": ["limited"]}]},
    }, contract=contract)
    try:
        assert httpx.get(f"{gateway.url}/echo/limited").status_code == 200
        redis.stop()
        try:
            time.sleep(1.2)
            response = httpx.get(f"{gateway.url}/echo/limited", timeout=10)
            assert response.status_code == 200  # fail open, as configured by name
            assert "let through (on_store_error: allow)" in gateway.stderr()
        finally:
            redis.start()
    finally:
        gateway.stop()
