"""Usage persisted per day, identity and operation (F4, issue 14): real gateways flushing
into a real SQLite file and a real redis-server, read back by the real `apishield usage`
CLI and the admin API; then the stores' bounds and the flush's retry on their own."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from apishield.config import ConfigError, Usage, config_from_dict
from apishield.observe.metrics import METRICS
from apishield.observe.usage import DailyUsage
from apishield.observe.usage_flush import UsageFlusher
from apishield.state.redis_usage import RedisUsageStore
from apishield.state.sqlite_usage import SqliteUsageStore
from apishield.state.usage import OTHER, UsageStore, day_of
from tests.conftest import RunningGateway, free_port, start_gateway, wait_for
from tests.redis_server import RedisServer, running_redis

CONTRACT = """
openapi: 3.1.0
info: {title: usage test, version: "1"}
paths:
  /echo/key:
    get:
      operationId: readReport
      security: [{apiKey: []}]
      responses: {"200": {description: ok}}
  /echo:
    post:
      operationId: sendReport
      security: [{apiKey: []}]
      requestBody:
        required: true
        content: {application/json: {schema: {type: object}}}
      responses: {"200": {description: ok}}
components:
  securitySchemes:
    apiKey: {type: apiKey, in: header, name: X-Api-Key}
"""

BODY = b'{"report": "quarterly", "rows": [1, 2, 3]}'


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "apishield", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


def usage_json(config: Path, *args: str) -> dict[str, Any]:
    result = cli(config, "usage", "--format", "json", *args)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def rows_by_pair(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """The rows per (identity, operation), summed over their periods (a test that runs
    across midnight UTC has two days)."""
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    for row in report["rows"]:
        pair = (row["identity"], row["operation"])
        if pair in pairs:
            for count in ("requests", "refusals", "bytes_in", "bytes_out"):
                pairs[pair][count] += row[count]
        else:
            pairs[pair] = dict(row)
    return pairs


def keyed_gateway(workdir: Path, upstream_url: str, state: str,
                  **overrides: Any) -> RunningGateway:
    contract = workdir / "usage-contract.yaml"
    contract.write_text(CONTRACT)
    return start_gateway(workdir, upstream_url, {"state": state, **overrides},
                         contract=contract)


def create_key(config: Path, name: str) -> tuple[str, str]:
    result = cli(config, "keys", "create", "--name", name)
    assert result.returncode == 0, result.stderr
    key = result.stdout.splitlines()[0].strip()
    return key, key.split("_")[1]


@pytest.fixture
def two_gateways(tmp_path: Path, upstream_url: str) -> Iterator[tuple[RunningGateway,
                                                                       RunningGateway]]:
    """Two gateways, each with its own config folder, sharing one SQLite state file."""
    state = str(tmp_path / "shared-state.db")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    admin_port = free_port()
    first = keyed_gateway(tmp_path / "a", upstream_url, state,
                          admin={"port": admin_port}, usage={"flush_interval": "200ms"})
    second = keyed_gateway(tmp_path / "b", upstream_url, state)
    yield first, second
    first.stop()
    second.stop()


def test_two_gateways_add_up_in_one_sqlite_file_and_the_cli_reads_it(
        two_gateways: tuple[RunningGateway, RunningGateway]) -> None:
    first, second = two_gateways
    key, key_id = create_key(first.config_path, "billing")
    other, other_id = create_key(first.config_path, "reporting")
    for gateway in (first, second):
        for _ in range(3):
            assert httpx.get(f"{gateway.url}/echo/key",
                             headers={"X-Api-Key": key}).status_code == 200
        response = httpx.post(f"{gateway.url}/echo", content=BODY,
                              headers={"X-Api-Key": other,
                                       "Content-Type": "application/json"})
        assert response.status_code == 200
        assert httpx.get(f"{gateway.url}/echo/key").status_code == 401  # anonymous

    # the first gateway flushes every 200 ms: its admin API shows what is stored while
    # the second one still holds its counts in memory
    admin = f"http://127.0.0.1:{yaml.safe_load(first.config_path.read_text())['admin']['port']}"

    def stored() -> dict[str, Any] | None:
        answer = httpx.get(f"{admin}/usage", params={"since": "2d", "identity": key_id})
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body if body["total"]["requests"] >= 3 else None

    view = wait_for(stored)
    assert view["version"] == 1 and view["by"] == "day"
    assert {(row["identity"], row["operation"]) for row in view["rows"]} == \
        {(key_id, "readReport")}
    assert view["rows"][-1]["period"] == day_of(time.time())
    # the in-memory view without parameters answers as before
    assert "current" in httpx.get(f"{admin}/usage").json()
    for bad in ({"since": "soon"}, {"since": "0s"}, {"by": "week"}):
        answer = httpx.get(f"{admin}/usage", params=bad)
        assert answer.status_code == 400
        assert answer.headers["content-type"] == "application/problem+json"

    assert first.stop() == 0 and second.stop() == 0  # the last flush happens at shutdown
    report = usage_json(first.config_path, "--since", "2d")
    rows = rows_by_pair(report)
    assert rows[(key_id, "readReport")]["requests"] == 6  # 3 + 3: added, not overwritten
    assert rows[(key_id, "readReport")]["refusals"] == 0
    assert rows[(key_id, "readReport")]["bytes_out"] > 0
    assert rows[(other_id, "sendReport")]["requests"] == 2
    assert rows[(other_id, "sendReport")]["bytes_in"] == 2 * len(BODY)
    assert rows[("anonymous", "readReport")] == {
        **rows[("anonymous", "readReport")], "requests": 2, "refusals": 2, "bytes_in": 0}
    assert report["total"]["requests"] == 10

    # filters, months, CSV and the table
    only = usage_json(second.config_path, "--identity", other_id, "--by", "month")
    assert {row["identity"] for row in only["rows"]} == {other_id}
    assert only["rows"][-1]["period"] == day_of(time.time())[:7]
    assert sum(row["requests"] for row in only["rows"]) == 2
    by_operation = usage_json(first.config_path, "--operation", "readReport")
    assert {row["identity"] for row in by_operation["rows"]} == {key_id, "anonymous"}
    result = cli(first.config_path, "usage", "--format", "csv", "--since", "7d")
    assert result.returncode == 0, result.stderr
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(table[0]) == ["period", "identity", "operation", "requests", "refusals",
                              "bytes_in", "bytes_out"]
    assert sum(int(line["requests"]) for line in table if line["identity"] == key_id) == 6
    result = cli(first.config_path, "usage")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split() == ["PERIOD", "IDENTITY", "OPERATION",
                                                     "REQUESTS", "REFUSALS", "BYTES_IN",
                                                     "BYTES_OUT"]
    assert result.stdout.splitlines()[-1].split()[:2] == ["total", "10"]
    # bad options are refused with a message, not a traceback
    result = cli(first.config_path, "usage", "--since", "yesterday")
    assert result.returncode == 1 and "--since" in result.stderr
    result = cli(first.config_path, "usage", "--since", "4000d")
    assert result.returncode == 1 and "3660 days" in result.stderr
    assert cli(first.config_path, "usage", "--format", "xml").returncode == 2


def test_usage_cli_refuses_a_state_file_that_does_not_exist(tmp_path: Path) -> None:
    (tmp_path / "contract.yaml").write_text(CONTRACT)
    config = tmp_path / "apishield.yaml"
    config.write_text(yaml.safe_dump({"contract": "contract.yaml", "state": "nowhere.db"}))
    result = cli(config, "usage")
    assert result.returncode == 1
    assert "no state file at" in result.stderr and "nowhere.db" in result.stderr
    assert not (tmp_path / "nowhere.db").exists()  # reading created nothing


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(Path(tmp_path_factory.mktemp("usage-redis"))) as server:
        yield server


def test_a_gateway_on_redis_flushes_at_stop_and_the_cli_reads_it(
        tmp_path: Path, upstream_url: str, redis_server: RedisServer) -> None:
    namespace_day = f"apishield:usage:{day_of(time.time())}"
    redis.Redis.from_url(redis_server.url).delete(namespace_day)
    (tmp_path / "pepper").write_text("usage-test-pepper-usage-test-pepper")
    (tmp_path / "pepper").chmod(0o600)
    gateway = start_gateway(tmp_path, upstream_url, {
        "state": redis_server.url,
        "auth": {"api_keys": {"pepper": {"file": str(tmp_path / "pepper")}}}})
    try:
        for _ in range(4):
            assert httpx.get(f"{gateway.url}/echo").status_code == 200
        assert httpx.get(f"{gateway.url}/nowhere").status_code == 404
    finally:
        assert gateway.stop() == 0
    rows = rows_by_pair(usage_json(gateway.config_path, "--since", "2d"))
    assert rows[("anonymous", "echoGet")]["requests"] == 4
    assert rows[("anonymous", "echoGet")]["bytes_out"] > 0
    assert rows[("anonymous", "unmatched")]["refusals"] == 1
    ttl = redis.Redis.from_url(redis_server.url).ttl(namespace_day)
    assert 399 * 86_400 < ttl <= 402 * 86_400  # the retention, from the day's start


def _stores(tmp_path: Path, redis_server: RedisServer, prefix: str) -> list[UsageStore]:
    """Two stores on one SQLite file, or two clients of one Redis: two gateways."""
    if prefix == "sqlite":
        return [SqliteUsageStore(tmp_path / "state.db"), SqliteUsageStore(tmp_path / "state.db")]
    namespace = f"test-{tmp_path.name}"
    return [RedisUsageStore(redis_server.url, namespace=namespace),
            RedisUsageStore(redis_server.url, namespace=namespace)]


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_stores_add_up_bound_pairs_per_day_and_filter(
        tmp_path: Path, redis_server: RedisServer, backend: str) -> None:
    today = day_of(time.time())
    first, second = _stores(tmp_path, redis_server, backend)
    try:
        batch = {(today, "a", "op"): [2, 1, 10, 20], (today, "b", "op"): [1, 0, 5, 6]}
        first.add(batch, max_pairs=3, retention_days=400)
        assert batch == {}  # stored: nothing left to retry
        # another gateway: a known pair adds up, a third is kept apart, the rest is `other`
        second.add({(today, "a", "op"): [1, 0, 1, 1], (today, "c", "op"): [1, 0, 0, 0],
                    (today, "d", "op"): [4, 4, 0, 0], (today, "e", "op2"): [1, 0, 0, 0]},
                   max_pairs=3, retention_days=400)
        rows = {(row.identity, row.operation): row for row in first.query(today)}
        assert set(rows) == {("a", "op"), ("b", "op"), ("c", "op"), (OTHER, "op"),
                             (OTHER, "op2")}
        assert (rows["a", "op"].requests, rows["a", "op"].refusals, rows["a", "op"].bytes_in,
                rows["a", "op"].bytes_out) == (3, 1, 11, 21)
        assert rows[OTHER, "op"].requests == 4 and rows[OTHER, "op"].refusals == 4
        assert [row.identity for row in second.query(today, identity="b")] == ["b"]
        assert {row.identity for row in second.query(today, operation="op2")} == {OTHER}
    finally:
        first.close()
        second.close()


def test_sqlite_prunes_days_past_the_retention(tmp_path: Path) -> None:
    with SqliteUsageStore(tmp_path / "state.db") as store:
        store.add({("2020-01-01", "a", "op"): [1, 0, 0, 0]}, 10, 400,
                  now=time.mktime((2020, 1, 2, 0, 0, 0, 0, 0, 0)))
        assert len(store.query("2019-01-01")) == 1
        store.add({("2020-03-01", "a", "op"): [1, 0, 0, 0]}, 10, 30,
                  now=time.mktime((2020, 3, 1, 12, 0, 0, 0, 0, 0)))
        assert [row.day for row in store.query("2019-01-01")] == ["2020-03-01"]


def test_memory_bounds_pairs_per_day_and_starts_afresh_the_next_day() -> None:
    usage = DailyUsage(max_pairs=2)
    day = 20_000 * 86_400.0
    for identity in ("a", "b", "c", "d", None):
        usage.count(identity, "op", identity == "d", 3, 4, day + 10)
    usage.count("c", "op", False, 0, 0, day + 86_400 + 1)  # the next day: `c` is new again
    batch = usage.take()
    assert batch == {
        (day_of(day), "a", "op"): [1, 0, 3, 4],
        (day_of(day), "b", "op"): [1, 0, 3, 4],
        (day_of(day), OTHER, "op"): [3, 1, 9, 12],  # c, d and the anonymous caller
        (day_of(day + 86_400), "c", "op"): [1, 0, 0, 0],
    }
    assert usage.take() == {}


def test_a_failed_flush_keeps_the_counts_and_the_next_one_writes_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A state folder that does not exist yet: the real store fails to open, the counts
    stay, are logged and counted; once the folder exists the same counts are written."""
    folder = tmp_path / "later"
    usage = DailyUsage()
    now = time.time()
    usage.count("k1", "op", False, 7, 8, now)
    config = Usage(flush_interval=3600)
    flusher = UsageFlusher(lambda: SqliteUsageStore(folder / "state.db"), config, usage)
    errors = METRICS.usage_flush_errors
    with caplog.at_level(logging.WARNING, logger="apishield"):
        assert asyncio.run(flusher.flush()) is False
    assert METRICS.usage_flush_errors == errors + 1
    assert any("could not write 1 of 1 pending counts" in record.getMessage()
               for record in caplog.records)
    usage.count("k1", "op", True, 1, 1, now)  # counted meanwhile
    folder.mkdir()

    async def recover() -> bool:
        ok = await flusher.flush()
        await flusher.stop()
        return ok

    assert asyncio.run(recover()) is True
    with SqliteUsageStore(folder / "state.db") as store:
        [row] = store.query(day_of(now))
    assert (row.identity, row.requests, row.refusals, row.bytes_in, row.bytes_out) == \
        ("k1", 2, 1, 8, 9)


@pytest.mark.parametrize(("usage", "expected"), [
    ({"max_pairs": 0}, "usage.max_pairs"),
    ({"retention": "1h"}, "usage.retention"),
    ({"flush_interval": "soon"}, "usage.flush_interval"),
    ({"flush": "10s"}, 'usage: unknown key "flush"'),
])
def test_bad_usage_config_is_refused_with_its_location(usage: dict[str, Any],
                                                       expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"contract": "contract.yaml", "usage": usage}, source_dir=Path("."))
    assert any(problem.startswith(expected) for problem in caught.value.problems), \
        caught.value.problems


def test_a_reload_neither_loses_nor_repeats_counts(tmp_path: Path, upstream_url: str) -> None:
    """The old pipeline flushes at its stop, the new one takes over the same per-process
    counts: every request is in the store exactly once."""
    admin_port = free_port()
    gateway = start_gateway(tmp_path, upstream_url, {"admin": {"port": admin_port},
                                                     "usage": {"flush_interval": "1h"}})
    try:
        for _ in range(3):
            assert httpx.get(f"{gateway.url}/echo").status_code == 200
        config = yaml.safe_load(gateway.config_path.read_text())
        config["usage"]["flush_interval"] = "30m"  # a changed config: a new pipeline
        gateway.config_path.write_text(yaml.safe_dump(config))
        answer = httpx.post(f"http://127.0.0.1:{admin_port}/reload", timeout=30)
        assert answer.json()["outcome"] == "succeeded", answer.text
        for _ in range(2):
            assert httpx.get(f"{gateway.url}/echo").status_code == 200
        # the old pipeline's last flush is in the store already
        stored = wait_for(lambda: usage_json(gateway.config_path)["total"]["requests"])
        assert stored >= 3
    finally:
        assert gateway.stop() == 0
    rows = rows_by_pair(usage_json(gateway.config_path))
    assert rows[("anonymous", "echoGet")]["requests"] == 5


def test_the_asgi_middleware_flushes_at_lifespan_shutdown(tmp_path: Path) -> None:
    from tests.test_middleware_lifespan import _run_uvicorn

    process, port, _, _, stderr = _run_uvicorn(tmp_path, "fastapi_app", "on")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            sizes = [len(client.get(f"/items/{i}").content) for i in range(4)]
            assert client.get("/admin").status_code == 404
        process.send_signal(signal.SIGINT)  # lifespan shutdown, then exit
        process.wait(15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    assert "Traceback" not in stderr.read_text(errors="replace")
    rows = rows_by_pair(usage_json(tmp_path / "apishield.yaml"))
    row = rows[("anonymous", "getItem")]
    assert (row["requests"], row["refusals"], row["bytes_in"]) == (4, 0, 0)
    assert row["bytes_out"] == sum(sizes)  # the body bytes the app sent
    assert rows[("anonymous", "unmatched")]["refusals"] == 1


def test_a_flush_during_a_redis_outage_is_retried_once_redis_is_back(tmp_path: Path) -> None:
    with running_redis(tmp_path) as server:
        usage = DailyUsage()
        now = time.time()
        usage.count("k2", "op", False, 1, 2, now)
        flusher = UsageFlusher(lambda: RedisUsageStore(server.url), Usage(), usage)
        server.stop()
        errors = METRICS.usage_flush_errors
        assert asyncio.run(flusher.flush()) is False
        assert METRICS.usage_flush_errors == errors + 1
        server.start()

        async def recover() -> bool:
            ok = await flusher.flush()
            await flusher.stop()
            return ok

        assert asyncio.run(recover()) is True
        reader = RedisUsageStore(server.url)
        try:
            [row] = reader.query(day_of(now))
        finally:
            reader.close()
        assert (row.identity, row.requests, row.bytes_in, row.bytes_out) == ("k2", 1, 1, 2)


def test_admin_usage_says_501_when_usage_is_not_persisted(tmp_path: Path,
                                                          upstream_url: str) -> None:
    admin_port = free_port()
    gateway = start_gateway(tmp_path, upstream_url, {"admin": {"port": admin_port},
                                                     "usage": {"enabled": False}})
    try:
        answer = httpx.get(f"http://127.0.0.1:{admin_port}/usage", params={"since": "7d"})
        assert answer.status_code == 501, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["type"] == "urn:apishield:problem:admin-usage-unavailable"
        # the in-memory view does not depend on persistence
        assert "current" in httpx.get(f"http://127.0.0.1:{admin_port}/usage").json()
    finally:
        assert gateway.stop() == 0


def test_admin_usage_says_503_while_the_usage_store_is_down(tmp_path: Path,
                                                            upstream_url: str) -> None:
    (tmp_path / "pepper").write_text("usage-test-pepper-usage-test-pepper")
    (tmp_path / "pepper").chmod(0o600)
    admin_port = free_port()
    with running_redis(tmp_path) as server:
        gateway = start_gateway(tmp_path, upstream_url, {
            "state": server.url, "admin": {"port": admin_port},
            "auth": {"api_keys": {"pepper": {"file": str(tmp_path / "pepper")}}}})
        try:
            url = f"http://127.0.0.1:{admin_port}/usage"
            assert httpx.get(url, params={"since": "1d"}, timeout=10).status_code == 200
            server.stop()
            answer = httpx.get(url, params={"since": "1d"}, timeout=10)
            assert answer.status_code == 503, answer.text
            assert answer.json()["type"] == \
                "urn:apishield:problem:admin-usage-store-unavailable"
            assert server.url.rsplit("@", 1)[-1] not in answer.text  # no store detail
            server.start()
            assert httpx.get(url, params={"since": "1d"}, timeout=10).status_code == 200
        finally:
            gateway.stop()
