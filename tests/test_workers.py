"""`apishield serve --workers N` (apishield/supervisor.py, docs/workers.md): a supervisor
and two worker processes, started through the real CLI, in front of the real upstream.

Connections are spread over the workers by the kernel (each blocks in accept() on the
one listening socket the supervisor bound), so the tests open many connections and read
which worker served each request from the `worker` field of its access-log line.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import (
    DATA,
    RunningGateway,
    free_port,
    json_lines,
    start_gateway,
    wait_for,
    wait_for_port,
)
from tests.test_logging import problems_of

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and fds")

# A limit of 100 a minute for everyone (one key: the test client's address). burst = 100,
# lease_fraction 0.02 (the default): n = max(1, floor(100 * 0.02)) = 2, L = n + n // 2 = 3;
# with G = 2 workers the proven bound admits at most burst + W / T + G * L, i.e. 6 over an
# exact limiter in any window, and leaves at most G * L = 6 unspent when the test ends.
LIMIT = {"rate_limiting": {"limits": [{"name": "everyone", "key": ["ip"], "rate": "100/m"}]}}
G_TIMES_L = 2 * 3
INTERVAL = 60 / 100  # seconds per token


def get(port: int, path: str = "/echo", timeout: float = 10.0) -> int:
    """One request on a new connection (so the kernel picks a worker for each)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def spread(port: int, count: int, path: str = "/echo", threads: int = 8) -> list[int]:
    """`count` requests from `threads` concurrent clients; their statuses."""
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda _: get(port, path), range(count)))


def workers_of(lines: list[dict[str, Any]]) -> Counter[int]:
    return Counter(line["worker"] for line in lines)


def lifecycle(gw: RunningGateway, event: str) -> list[dict[str, Any]]:
    return [line for line in json_lines(gw.stderr(), "lifecycle") if line["event"] == event]


def worker_pids(gw: RunningGateway) -> dict[int, int]:
    """The pid of each worker, as last started."""
    return {line["worker"]: line["pid"] for line in lifecycle(gw, "worker-start")}


def wait_until_serving(gw: RunningGateway, workers: int = 2) -> None:
    """Every worker has logged its listener (connections queue in the shared backlog
    before that: they would all go to the first worker up)."""
    assert wait_for(lambda: len([line for line in lifecycle(gw, "start")
                                 if line["listener"] in ("http", "https")]) >= workers,
                    30), gw.stderr()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


@pytest.fixture
def two_workers(tmp_path: Path, upstream_url: str) -> Any:
    started: list[RunningGateway] = []

    def make(overrides: dict[str, Any] | None = None, **kwargs: Any) -> RunningGateway:
        workdir = tmp_path / f"gw{len(started)}"
        workdir.mkdir()
        # two workers: on a 2-core machine (CI) by the default, no --workers (so every
        # test here also runs what `apishield serve` does unconfigured); else asked for
        gw = start_gateway(workdir, upstream_url, overrides,
                           workers=None if usable_cores() == 2 else 2, **kwargs)
        started.append(gw)
        wait_until_serving(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


def test_a_limit_is_shared_exactly_by_the_workers(two_workers: Any) -> None:
    """1,000 requests over both workers against 100/min: 100 admitted, within the bound
    (at most G * L = 6 over, plus what the limit regenerates while the test runs; at most
    6 under: tokens a worker still holds at the end)."""
    gw = two_workers(LIMIT)
    started = time.monotonic()
    statuses = spread(gw.port, 1000)
    elapsed = time.monotonic() - started
    admitted = statuses.count(200)
    assert set(statuses) <= {200, 429}
    regenerated = int(elapsed / INTERVAL) + 1
    assert 100 - G_TIMES_L <= admitted <= 100 + regenerated + G_TIMES_L, (admitted, elapsed)
    lines = wait_for(lambda: len(gw.log_lines()) >= 1000 and gw.log_lines())
    assert len(lines) == 1000  # every line parsed as JSON (log_lines would raise)
    served = workers_of(lines)
    assert set(served) == {0, 1} and min(served.values()) > 50, served
    by_worker = Counter(line["worker"] for line in lines if line["status"] == 200)
    assert set(by_worker) == {0, 1}, by_worker  # both admitted some: one shared budget


def test_access_lines_on_standard_output_are_never_cut(tmp_path: Path,
                                                        upstream_url: str) -> None:
    """Both workers write the access log to the same pipe (the supervisor's standard
    output) under load: every line read from it is one whole JSON object. Each worker
    writes ~100 ms of lines at a time, far more than the 4 KiB a pipe keeps whole."""
    gw = start_gateway(tmp_path, upstream_url, {"access_log": {"path": "-"}}, workers=2,
                       stdout=subprocess.PIPE)
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(gw.process.stdout.read()))  # type: ignore[union-attr]
    reader.start()
    try:
        wait_until_serving(gw)
        statuses = spread(gw.port, 1500, threads=10)
        assert statuses.count(200) == 1500
    finally:
        gw.stop()
        reader.join(30)
        gw.process.stdout.close()  # type: ignore[union-attr]
    lines = out[0].decode().splitlines()
    records = [json.loads(line) for line in lines]  # raises on a cut or interleaved line
    assert len(records) == 1500
    assert set(workers_of(records)) == {0, 1}


def assert_documented(gw: RunningGateway) -> None:
    """Every line the supervisor and its workers wrote follows docs/logging.md."""
    lines = [*json_lines(gw.stderr()), *gw.log_lines()]
    bad = {json.dumps(line): problems for line in lines if (problems := problems_of(line))}
    assert bad == {}


def restarts_metric(admin_port: int) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    (line,) = [line for line in text.splitlines()
               if line.startswith("apishield_worker_restarts_total ")]
    return float(line.split()[1])


def test_a_killed_worker_is_started_again_and_traffic_continues(two_workers: Any) -> None:
    admin = free_port()
    gw = two_workers({**LIMIT, "admin": {"port": admin}})
    assert spread(gw.port, 20).count(200) == 20
    assert restarts_metric(admin) == 0
    before = worker_pids(gw)
    os.kill(before[1], signal.SIGKILL)  # it held leases of the shared limit: they expire
    assert wait_for(lambda: worker_pids(gw).get(1) not in (None, before[1]), 30), gw.stderr()
    exits = lifecycle(gw, "worker-exit")
    assert exits[0]["worker"] == 1 and exits[0]["exit_code"] == -signal.SIGKILL
    assert exits[0]["action"] == "restart"
    wait_for(lambda: len([line for line in lifecycle(gw, "start")
                          if line["listener"] == "http"]) >= 3, 30)
    statuses = spread(gw.port, 300)
    assert set(statuses) <= {200, 429}
    # the limit held across the death: 20 before, then what was left of the 100
    assert 100 - 20 - G_TIMES_L <= statuses.count(200) <= 100 - 20 + 30, statuses.count(200)
    assert worker_pids(gw)[0] == before[0]  # the other worker was never touched
    lines = gw.log_lines()
    assert {line["worker"] for line in lines[20:]} == {0, 1}  # the new worker 1 serves
    # worker 0 (the admin listener's) reports the supervisor's count within a second
    assert wait_for(lambda: restarts_metric(admin) == 1, 10)
    assert_documented(gw)


def post_reload(admin_port: int) -> dict[str, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=30)
    try:
        connection.request("POST", "/reload")
        response = connection.getresponse()
        return dict(json.loads(response.read()))
    finally:
        connection.close()


def test_sighup_reloads_every_worker(two_workers: Any) -> None:
    """SIGHUP to the supervisor reloads both workers; so does `POST /reload` on the admin
    API, which only worker 0 serves (it has the supervisor forward a SIGHUP)."""
    admin = free_port()
    gw = two_workers({"admin": {"port": admin}})
    assert set(spread(gw.port, 40)) == {200}
    config = yaml.safe_load(gw.config_path.read_text())
    config["rate_limiting"] = {"ip": {"deny": ["127.0.0.1/32"]}}
    gw.config_path.write_text(yaml.safe_dump(config))
    gw.process.send_signal(signal.SIGHUP)
    assert wait_for(lambda: gw.stderr().count("reload (SIGHUP) succeeded") >= 2, 30), (
        gw.stderr())
    reloaded = [line for line in lifecycle(gw, "reload") if line["outcome"] == "succeeded"]
    assert sorted(line["worker"] for line in reloaded) == [0, 1]  # each line says whose
    statuses = spread(gw.port, 200)
    assert set(statuses) == {403}
    refused = [line for line in gw.log_lines() if line["status"] == 403]
    assert set(workers_of(refused)) == {0, 1}  # the new config is in force in both
    del config["rate_limiting"]
    gw.config_path.write_text(yaml.safe_dump(config))
    assert post_reload(admin)["outcome"] == "succeeded"
    assert wait_for(lambda: gw.stderr().count("reload (SIGHUP) succeeded") >= 3, 30), (
        gw.stderr())  # worker 1, by the forwarded SIGHUP (worker 0 finds nothing new)
    assert set(spread(gw.port, 200)) == {200}
    assert set(workers_of(gw.log_lines()[-200:])) == {0, 1}
    assert_documented(gw)


def test_sigterm_drains_every_worker(two_workers: Any) -> None:
    """Slow requests in flight on both workers when the supervisor gets SIGTERM: each
    completes, then every process exits, the supervisor with 0."""
    gw = two_workers({"timeouts": {"shutdown": "10s"}})
    futures = []
    with ThreadPoolExecutor(12) as pool:
        for _ in range(12):  # one at a time: each connection is a separate accept race
            futures.append(pool.submit(get, gw.port, "/slow?ms=2500"))
            time.sleep(0.05)
        time.sleep(0.3)  # the last one has reached a worker
        gw.process.send_signal(signal.SIGTERM)
        statuses = [future.result() for future in futures]
    assert statuses == [200] * 12
    assert gw.process.wait(30) == 0
    lines = gw.log_lines()
    assert set(workers_of(lines)) == {0, 1}  # both had requests in flight and drained them
    assert len(lifecycle(gw, "stop")) == 3  # two workers and the supervisor


def test_bans_reach_every_worker_within_a_second(two_workers: Any) -> None:
    """A ban added with the CLI is refused by both workers one poll later (the SQLite
    state's change counter, read once a second), and so is one a worker's own ban rule
    made: it is written to the shared state too. Ban rules count per worker, as they count
    per gateway instance (abuse/bans.py): with a threshold of 5 and 2 workers, 9 events
    make sure one worker saw 5."""
    gw = two_workers({"rate_limiting": {"bans": {"rules": [
        {"name": "probing", "on": "not-found", "threshold": 5, "window": "1m",
         "duration": "10m"}]}}})
    assert set(spread(gw.port, 20)) == {200}
    # a worker's own rule: 404s from this address until one worker bans it
    statuses = [get(gw.port, "/nowhere") for _ in range(2 * (5 - 1) + 1)]
    assert statuses[:5] == [404] * 5
    started = time.monotonic()
    assert wait_for(lambda: set(spread(gw.port, 40)) == {403}, 10)
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, elapsed  # one poll (1 s) and the loop's slack on a busy machine
    banned = [line for line in gw.log_lines() if line["status"] == 403]
    assert set(workers_of(banned)) == {0, 1}
    # lifted with the CLI: both serve again; banned with the CLI: both refuse again
    cli = [sys.executable, "-m", "apishield", "bans"]
    subprocess.run([*cli, "remove", "--config", str(gw.config_path), "--ip", "127.0.0.1"],
                   check=True, capture_output=True)
    assert wait_for(lambda: set(spread(gw.port, 40)) == {200}, 10)
    subprocess.run([*cli, "add", "--config", str(gw.config_path), "--ip", "127.0.0.1",
                    "--duration", "1h", "--reason", "test"], check=True, capture_output=True)
    started = time.monotonic()
    assert wait_for(lambda: set(spread(gw.port, 40)) == {403}, 10)
    assert time.monotonic() - started < 3.0


@pytest.mark.timeout(150)  # six worker starts that fail, on a loaded machine
def test_a_crash_loop_stops_the_supervisor_with_a_clear_message(two_workers: Any) -> None:
    """The config breaks on disk, then a worker dies: each new worker exits at once
    (exit 2), and after RESTART_LIMIT restarts the supervisor gives up with exit 1."""
    gw = two_workers()
    gw.config_path.write_text("contract: [not, a, path]\n")
    os.kill(worker_pids(gw)[1], signal.SIGKILL)
    assert gw.process.wait(120) == 1
    stderr = gw.stderr()
    assert "workers crash-looping" in stderr
    assert lifecycle(gw, "crash-loop")[0]["limit"] == 5
    assert [line["exit_code"] for line in lifecycle(gw, "worker-exit")][1:6] == [2] * 5
    assert lifecycle(gw, "stop")[-1]["reason"] == "crash-loop"
    assert_documented(gw)


KEY_CONTRACT = """
openapi: 3.0.3
info: {title: keys, version: "1"}
paths:
  /echo:
    get:
      operationId: echoGet
      security: [{key: []}]
      responses: {"200": {description: ok}}
components:
  securitySchemes:
    key: {type: apiKey, in: header, name: X-Api-Key}
"""


def get_with_key(port: int, key: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/echo", headers={"X-Api-Key": key})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_a_revoked_api_key_is_refused_by_every_worker_within_a_second(
        two_workers: Any, tmp_path: Path) -> None:
    contract = tmp_path / "keys.yaml"
    contract.write_text(KEY_CONTRACT)
    gw = two_workers(contract=contract)
    keys = [sys.executable, "-m", "apishield", "keys"]
    created = subprocess.run([*keys, "create", "--name", "billing", "--config",
                              str(gw.config_path)], capture_output=True, text=True, check=True)
    key = created.stdout.splitlines()[0].strip()
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(lambda _: get_with_key(gw.port, key), range(40))) == {200}
        subprocess.run([*keys, "revoke", key.split("_")[1], "--config", str(gw.config_path)],
                       check=True, capture_output=True)
        started = time.monotonic()
        assert wait_for(lambda: set(pool.map(lambda _: get_with_key(gw.port, key),
                                             range(40))) == {401}, 10)
        assert time.monotonic() - started < 3.0  # one poll (1 s), with a busy machine's slack
    lines = gw.log_lines()
    assert set(workers_of([line for line in lines if line["status"] == 200])) == {0, 1}
    assert set(workers_of([line for line in lines if line["status"] == 401])) == {0, 1}


def test_tls_and_the_plain_http_listener_are_shared_too(two_workers: Any,
                                                         tmp_path: Path) -> None:
    """With TLS, the supervisor binds the HTTPS listener and the plain-HTTP one; every
    worker terminates TLS on the first and refuses on the second."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    key.chmod(0o600)
    plain = free_port()
    gw = two_workers({"tls": {"cert": str(cert), "key": str(key),
                              "plain_http": {"port": plain, "mode": "refuse"}}})
    context = ssl.create_default_context()
    ca.configure_trust(context)

    def https(_: int) -> int:
        connection = http.client.HTTPSConnection("127.0.0.1", gw.port, timeout=10,
                                                 context=context)
        try:
            connection.request("GET", "/echo")
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(https, range(60))) == {200}
    assert set(spread(plain, 60)) == {403}
    lines = gw.log_lines()
    assert set(workers_of([line for line in lines if line["status"] == 200])) == {0, 1}
    assert set(workers_of([line for line in lines if line["status"] == 403])) == {0, 1}


# ---------------------------------------------------------------- figures add up
def admin_get(admin_port: int, path: str) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, (path, response.status, body)
        return body
    finally:
        connection.close()


def scrape(admin_port: int) -> dict[str, float]:
    """One `/metrics` scrape: each sample's `name{labels}` (labels sorted) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, float] = {}
    text = admin_get(admin_port, "/metrics").decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def total(samples: dict[str, float], name: str) -> float:
    return sum(value for key, value in samples.items() if key.startswith(name + "{"))


def usage_requests(admin_port: int) -> int:
    current = json.loads(admin_get(admin_port, "/usage"))["current"]
    return sum(row["requests"] for row in current["top"]) + current["rest"]["requests"]


def figures(admin_port: int) -> tuple[float, float, int, int]:
    """Requests counted by /metrics, by the duration histogram's `_count`, by /usage and
    by the dashboard's data, each from one call."""
    samples = scrape(admin_port)
    dashboard = json.loads(admin_get(admin_port, "/dashboard/data"))
    return (total(samples, "apishield_requests_total"),
            total(samples, "apishield_request_duration_seconds_count"),
            usage_requests(admin_port), dashboard["totals"]["requests"])


@pytest.mark.skipif(usable_cores() < 2, reason="the default is one process on one core")
def test_the_default_runs_a_worker_per_core_and_the_admin_api_adds_them_up(
        tmp_path: Path, upstream_url: str) -> None:
    """`serve` with neither --workers nor APISHIELD_WORKERS: one worker per usable core.
    Requests spread over every worker (new connections); once they have completed, one
    call of each admin endpoint counts exactly the requests sent, a histogram's count
    too. A worker killed with SIGKILL is started again and no figure goes down; the new
    one's requests add on top."""
    cores = usable_cores()
    admin = free_port()
    gw = start_gateway(tmp_path, upstream_url, {"admin": {"port": admin}}, workers=None)
    try:
        wait_until_serving(gw, cores)
        (started,) = [line for line in lifecycle(gw, "start")
                      if line["listener"] == "supervisor"]
        assert started["workers"] == cores
        statuses = spread(gw.port, 300)
        assert statuses.count(200) == 300
        lines = wait_for(lambda: len(gw.log_lines()) >= 300 and gw.log_lines())
        assert len(set(workers_of(lines))) >= 2, workers_of(lines)  # spread
        assert figures(admin) == (300, 300, 300, 300)
        assert scrape(admin)["apishield_worker_restarts_total{}"] == 0
        before = worker_pids(gw)
        killed = max(before)  # not worker 0: the admin listener's
        os.kill(before[killed], signal.SIGKILL)
        assert wait_for(lambda: worker_pids(gw).get(killed) not in (None, before[killed]),
                        30), gw.stderr()
        wait_for(lambda: len([line for line in lifecycle(gw, "start")
                              if line["listener"] == "http"]) >= cores + 1, 30)
        # what the killed worker counted before the last gather is kept: nothing went down
        assert figures(admin) == (300, 300, 300, 300)
        assert spread(gw.port, 200).count(200) == 200
        lines = wait_for(lambda: len(gw.log_lines()) >= 500 and gw.log_lines())
        assert killed in set(workers_of(lines[300:]))  # the new worker served some
        assert figures(admin) == (500, 500, 500, 500)
        assert wait_for(lambda: scrape(admin)["apishield_worker_restarts_total{}"] == 1, 10)
        assert lifecycle(gw, "figures-late") == []
    finally:
        gw.stop()
    assert_documented(gw)


def test_usage_per_identity_is_whole_across_workers(two_workers: Any, tmp_path: Path) -> None:
    """Two API keys' requests spread over both workers: `GET /usage` (the last hours,
    every worker's added up by worker 0) and the persisted counts (`?since=1d`, which
    every worker adds to the shared SQLite state each flush) both count each identity's
    requests exactly."""
    contract = tmp_path / "keys.yaml"
    contract.write_text(KEY_CONTRACT)
    admin = free_port()
    gw = two_workers({"admin": {"port": admin}, "usage": {"flush_interval": "1s"}},
                     contract=contract)
    keys = [sys.executable, "-m", "apishield", "keys"]
    ids: dict[str, str] = {}
    for name in ("billing", "reports"):
        created = subprocess.run([*keys, "create", "--name", name, "--config",
                                  str(gw.config_path)], capture_output=True, text=True,
                                 check=True)
        ids[name] = created.stdout.splitlines()[0].strip()
    sent = {"billing": 70, "reports": 50}
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda name: get_with_key(gw.port, ids[name]),
                                 ["billing"] * sent["billing"] + ["reports"] * sent["reports"]))
    assert statuses == [200] * 120
    lines = wait_for(lambda: len(gw.log_lines()) >= 120 and gw.log_lines())
    assert set(workers_of(lines)) == {0, 1}
    key_ids = Counter(line["key_id"] for line in lines)  # the identity of a key's request
    assert sorted(key_ids.values()) == [50, 70]
    live = json.loads(admin_get(admin, "/usage"))["current"]["top"]
    assert {row["identity"]: row["requests"] for row in live} == key_ids

    def persisted() -> dict[str, int]:
        rows = json.loads(admin_get(admin, "/usage?since=1d"))["rows"]
        return {row["identity"]: row["requests"] for row in rows}

    assert wait_for(lambda: persisted() == key_ids, 15), persisted()  # a flush from each


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux: CPU affinity")
def test_the_default_on_one_usable_core_is_a_lone_gateway(tmp_path: Path,
                                                          upstream_url: str) -> None:
    """`serve` without --workers, allowed one core (as `taskset -c 0` would): no
    supervisor, the gateway in the `serve` process itself."""
    for name in ("contract.yaml", "paths.yaml"):
        shutil.copy(DATA / name, tmp_path / name)
    config = tmp_path / "apishield.yaml"
    config.write_text(yaml.safe_dump({"contract": "contract.yaml",
                                      "upstream": {"url": upstream_url},
                                      "access_log": {"path": str(tmp_path / "access.log")}}))
    port = free_port()
    core = min(os.sched_getaffinity(0))
    environment = {name: value for name, value in os.environ.items()
                   if name != "APISHIELD_WORKERS"}
    with (tmp_path / "stderr").open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "apishield", "serve", "--config", str(config), "--port",
             str(port)], stdout=subprocess.DEVNULL, stderr=stderr, env=environment,
            preexec_fn=lambda: os.sched_setaffinity(0, {core}))
    try:
        wait_for_port(port, process)
        assert get(port) == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    lines = json_lines((tmp_path / "stderr").read_text(), "lifecycle")
    starts = [line for line in lines if line["event"] == "start"]
    assert [line["listener"] for line in starts] == ["http"]  # no supervisor
    assert not any("worker" in line for line in lines)
    assert not any(line["event"] == "worker-start" for line in lines)
