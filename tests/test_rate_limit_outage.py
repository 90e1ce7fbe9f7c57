"""A Redis outage is logged as one event, not once a request (issue 11).

Before: every request refused while Redis was down logged a WARNING (1,508 lines in 10 s).
Now: one line when the outage starts (reason, URL without its password), at most one count
every 5 s, one line when Redis answers again (duration, total). Against a real
redis-server with a password and a real gateway: kill Redis, send 200 requests, restart
it. The summary cadence is tested in process with a fake clock.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from apishield.state import counters as counters_module
from apishield.state.counters import StoreOutage, StoreUnavailable
from apishield.state.redis_counters import RedisCounters
from tests.conftest import RunningGateway, free_port, start_gateway
from tests.redis_server import RedisServer

PASSWORD = "outage-test-Redis-pw-7c1d"  # never in a log line
REQUESTS = 200

CONTRACT = """
openapi: 3.1.0
info: {title: redis outage, version: "1"}
security: []
paths:
  /echo/limited:
    get: {operationId: limited, responses: {"200": {description: ok}}}
"""


class PasswordRedis(RedisServer):
    """The suite's redis-server, with `requirepass` set once it answers."""

    def __init__(self, workdir) -> None:
        super().__init__(workdir)
        self.url = f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        super().start()
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(b"CONFIG SET requirepass " + PASSWORD.encode() + b"\r\n")
            assert sock.recv(64).startswith(b"+OK")


@pytest.fixture
def redis(tmp_path) -> Iterator[PasswordRedis]:
    server = PasswordRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def _gateway(tmp_path, upstream_url: str, redis: PasswordRedis, policy: str) -> RunningGateway:
    (tmp_path / "pepper").write_text("x" * 43)
    (tmp_path / "pepper").chmod(0o600)
    contract = tmp_path / "outage-contract.yaml"
    contract.write_text(CONTRACT)
    return start_gateway(tmp_path, upstream_url, {
        "state": redis.url,
        "auth": {"api_keys": {"pepper": {"file": "pepper"}}},
        "rate_limiting": {"on_store_error": policy, "limits": [
            {"name": "shared", "key": ["ip"], "rate": "100/s", "burst": 10,
             "operations": ["limited"]}]},
    }, contract=contract)


def _store_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "rate-limit store" in line]


@pytest.mark.parametrize(("policy", "status"), [("deny", 503), ("allow", 200)])
def test_an_outage_is_logged_once_with_a_count_and_its_end(tmp_path, upstream_url, redis,
                                                           policy, status):
    gateway = _gateway(tmp_path, upstream_url, redis, policy)
    try:
        with httpx.Client(base_url=gateway.url, timeout=10) as client:
            assert client.get("/echo/limited").status_code == 200
            redis.stop()
            try:
                time.sleep(1.1)  # past the lease the gateway held (lease_ttl 1 s)
                started = time.monotonic()
                statuses = [client.get("/echo/limited").status_code for _ in range(REQUESTS)]
                took = time.monotonic() - started
            finally:
                redis.start()
            assert statuses == [status] * REQUESTS
            time.sleep(0.2)
            during = _store_lines(gateway.stderr())
            assert len(during) == 1, during  # not one line per request
            what = ("refused with 503 (on_store_error: deny)" if policy == "deny"
                    else "let through (on_store_error: allow)")
            assert "is unavailable (" in during[0] and what in during[0]
            assert "redis://:***@127.0.0.1" in during[0]
            deadline = time.monotonic() + 10
            while (client.get("/echo/limited").status_code != 200
                   or "is reachable again after" not in gateway.stderr()):
                assert time.monotonic() < deadline, "the limiter did not recover"
                time.sleep(0.1)
        stderr = gateway.stderr()
        lines = _store_lines(stderr)
        recovered = [line for line in lines if "is reachable again after" in line]
        assert len(recovered) == 1, lines
        total = int(recovered[0].split(" s: ")[1].split(" request(s)")[0])
        assert total >= REQUESTS  # the 200, and any refused while Redis restarted
        summaries = [line for line in lines if "still unavailable" in line]
        assert len(summaries) <= 1 + int(took // 5)  # at most one every 5 s
        assert len(lines) == 2 + len(summaries)
        assert PASSWORD not in stderr
    finally:
        gateway.stop()


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_summary_every_five_seconds_and_recovery_totals(monkeypatch, caplog):
    clock = _Clock()
    monkeypatch.setattr(counters_module.time, "monotonic", clock)
    caplog.set_level(logging.WARNING, logger="apishield.state")
    outage = StoreOutage("redis://:***@db:6379/0")
    outage.policy = "refused with 503 (on_store_error: deny)"
    outage.down("ConnectionError: refused")
    for _ in range(1000):
        outage.request()
        clock.now += 0.001  # 1 s of traffic: no summary yet
    outage.down("ConnectionError: refused again")  # a retry failed: no new line
    assert len(caplog.records) == 1
    assert "is unavailable (ConnectionError: refused)" in caplog.records[0].getMessage()
    clock.now = 1005.0
    outage.request()
    outage.request()
    clock.now = 1007.0
    outage.request()  # 2 s after the summary: counted, not logged
    clock.now = 1010.5
    outage.request()
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3
    assert "still unavailable after 5 s" in messages[1]
    assert "1001 request(s) refused with 503" in messages[1] and "1001 since" in messages[1]
    assert "3 request(s) refused with 503" in messages[2] and "1004 since" in messages[2]
    clock.now = 1012.25
    outage.up()
    outage.up()  # already up: nothing
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 4
    assert "reachable again after 12.2 s: 1004 request(s) refused" in messages[3]
    outage.request()  # a refusal the backend did not report opens a new outage
    assert "no answer from the store" in caplog.records[-1].getMessage()


async def test_the_reason_never_holds_the_password(caplog):
    caplog.set_level(logging.WARNING, logger="apishield.state")
    port = free_port()  # nothing listens: connection refused
    counters = RedisCounters(f"redis://user:{PASSWORD}@127.0.0.1:{port}/0")
    try:
        with pytest.raises(StoreUnavailable) as raised:
            await counters.prepare("k", 0.01, 10)
        assert PASSWORD not in str(raised.value)
        with pytest.raises(StoreUnavailable):  # fails fast now: no second line
            await counters.prepare("k", 0.01, 10)
    finally:
        await counters.close()
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1 and counters.outage.ongoing
    assert f"redis://user:***@127.0.0.1:{port}/0 is unavailable" in messages[0]
    assert PASSWORD not in messages[0]
