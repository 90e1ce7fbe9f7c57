"""Live reload (issue 13): SIGHUP and the file watch swap in a new config and contract while
clients keep sending requests; a broken file keeps the running one; state whose config did
not change survives. Every test runs the real gateway process in front of the real test
upstream and changes the files it was started from."""

from __future__ import annotations

import http.client
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import RunningGateway, free_port, start_gateway, wait_for_port
from tests.issuer_server import AUDIENCE, start_issuer, stop_issuer

DOCS = Path(__file__).parent.parent / "docs"


def write_config(gw: RunningGateway, **changes: Any) -> None:
    """Rewrite the gateway's config file: what it was started with, plus `changes`."""
    config = yaml.safe_load(gw.config_path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    gw.config_path.write_text(yaml.safe_dump(config))


def wait_for_log(gw: RunningGateway, text: str, count: int = 1, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stderr = gw.stderr()
        if stderr.count(text) >= count:
            return stderr
        time.sleep(0.02)
    raise AssertionError(f"{text!r} not logged {count} time(s):\n{gw.stderr()[-3000:]}")


def status_of(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def seconds_until(port: int, path: str, wanted: int, timeout: float = 5.0) -> float:
    """How long until `path` answers `wanted` (polled every 20 ms)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if status_of(port, path) == wanted:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"{path} never answered {wanted} within {timeout}s")


def drive(port: int, stop: threading.Event, answered: list[int], failures: list[str]) -> None:
    """Requests back to back on one keep-alive connection until told to stop."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    while not stop.is_set():
        try:
            conn.request("GET", "/echo")
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            failures.append(repr(exc))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            continue
        if response.status == 200:
            answered.append(response.status)
        else:
            failures.append(str(response.status))
    conn.close()


def test_twenty_reloads_under_load_fail_no_request(make_gateway):
    gw = make_gateway()
    # two valid configs, alternated: different response headers and a limit on another path
    configs = [
        {"headers": {"hsts": "off"}},
        {"rate_limiting": {"limits": [{"name": "slow-path", "key": ["ip"], "rate": "1/m",
                                       "operations": ["slow"]}]}},
    ]
    stop = threading.Event()
    answered: list[int] = []
    failures: list[str] = []
    workers = [threading.Thread(target=drive, args=(gw.port, stop, answered, failures))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        for number in range(1, 21):
            change = configs[number % 2]
            write_config(gw, headers=change.get("headers"),
                         rate_limiting=change.get("rate_limiting"))
            before = len(answered)
            gw.process.send_signal(signal.SIGHUP)
            wait_for_log(gw, "reload (SIGHUP) succeeded", count=number)
            deadline = time.monotonic() + 2
            while len(answered) < before + 20 and time.monotonic() < deadline:
                time.sleep(0.01)  # traffic on the new pipeline before the next reload
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert gw.process.poll() is None, gw.stderr()
    assert failures == []
    assert len(answered) > 400
    stderr = gw.stderr()
    assert stderr.count("reload (SIGHUP) succeeded") == 20
    assert "changed rate_limiting" in stderr  # the line says what changed
    assert "kept counters, bans" in stderr
    assert gw.stop() == 0, gw.stderr()[-3000:]  # every replaced pipeline was closed cleanly


def test_a_rate_limit_added_by_reload_applies_within_a_second(make_gateway):
    gw = make_gateway()
    assert all(status_of(gw.port, "/echo/1") == 200 for _ in range(5))
    write_config(gw, rate_limiting={"limits": [
        {"name": "items", "key": ["ip"], "rate": "2/m", "operations": ["echoItem"]}]})
    gw.process.send_signal(signal.SIGHUP)
    assert seconds_until(gw.port, "/echo/1", 429) < 1.0
    assert status_of(gw.port, "/echo") == 200  # only the operation it names


def test_operations_added_and_removed_by_reload(make_gateway):
    gw = make_gateway()
    contract_path = gw.config_path.parent / "contract.yaml"
    contract = yaml.safe_load(contract_path.read_text())
    assert status_of(gw.port, "/hop") == 200
    contract["paths"]["/added"] = {"get": {"operationId": "added",
                                           "responses": {"200": {"description": "ok"}}}}
    del contract["paths"]["/hop"]
    assert status_of(gw.port, "/added") == 404
    contract_path.write_text(yaml.safe_dump(contract))
    gw.process.send_signal(signal.SIGHUP)
    # the upstream answers 404 to paths it does not know: /added reaches it when the
    # gateway forwards; apishield's own 404 is a problem document
    start = time.monotonic()
    while time.monotonic() - start < 5:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
        conn.request("GET", "/added")
        response = conn.getresponse()
        response.read()
        conn.close()
        if response.getheader("Content-Type") != "application/problem+json":
            break
        time.sleep(0.02)
    assert time.monotonic() - start < 1.0
    assert seconds_until(gw.port, "/hop", 404) < 1.0
    assert "changed contract" in wait_for_log(gw, "reload (SIGHUP) succeeded")


def test_a_broken_config_keeps_the_running_one_and_names_each_problem(make_gateway):
    gw = make_gateway({"rate_limiting": {"limits": [
        {"name": "items", "key": ["ip"], "rate": "2/m", "operations": ["echoItem"]}]}})
    write_config(gw, rate_limiting={"limits": [
        {"name": "items", "key": ["ip"], "rate": "lots", "operations": ["echoItem"]}]},
        timeouts={"header": "forever"})
    gw.process.send_signal(signal.SIGHUP)
    stderr = wait_for_log(gw, "reload (SIGHUP) failed")
    problems = [line for line in stderr.splitlines() if "reload (SIGHUP) problem:" in line]
    assert len(problems) == 2, stderr
    assert any("apishield.yaml: rate_limiting.limits.0.rate" in line for line in problems)
    assert any("apishield.yaml: timeouts.header" in line for line in problems)
    assert "2 problem(s), the running config is kept" in stderr
    # still serving, with the old limit
    assert [status_of(gw.port, "/echo/1") for _ in range(3)] == [200, 200, 429]
    assert gw.process.poll() is None


def test_a_broken_contract_keeps_the_running_one(make_gateway):
    gw = make_gateway()
    contract_path = gw.config_path.parent / "contract.yaml"
    contract = yaml.safe_load(contract_path.read_text())
    contract["paths"]["/echo"]["get"]["parameters"] = [{"$ref": "#/components/parameters/Nope"}]
    contract["paths"]["/hop"]["get"]["parameters"] = [{"$ref": "#/components/parameters/Gone"}]
    contract_path.write_text(yaml.safe_dump(contract))
    gw.process.send_signal(signal.SIGHUP)
    stderr = wait_for_log(gw, "reload (SIGHUP) failed")
    problems = [line for line in stderr.splitlines() if "reload (SIGHUP) problem:" in line]
    assert any("contract.yaml#/paths/~1echo/get/parameters/0" in line and "Nope" in line
               for line in problems), stderr
    assert any("contract.yaml#/paths/~1hop/get/parameters/0" in line and "Gone" in line
               for line in problems), stderr
    assert status_of(gw.port, "/echo") == 200
    assert status_of(gw.port, "/hop") == 200  # the old contract still declares it


def test_a_consumed_budget_survives_a_reload_that_keeps_the_limits(make_gateway):
    limits = {"limits": [{"name": "items", "key": ["ip"], "rate": "3/m",
                          "operations": ["echoItem"]}]}
    gw = make_gateway({"rate_limiting": limits})
    assert [status_of(gw.port, "/echo/1") for _ in range(4)] == [200, 200, 200, 429]
    write_config(gw, headers={"hsts": "off"})  # something else changes
    gw.process.send_signal(signal.SIGHUP)
    stderr = wait_for_log(gw, "reload (SIGHUP) succeeded")
    assert "kept counters" in stderr
    assert status_of(gw.port, "/echo/1") == 429  # still spent
    # unchanged files: nothing is rebuilt
    gw.process.send_signal(signal.SIGHUP)
    wait_for_log(gw, "reload (SIGHUP) unchanged")
    assert status_of(gw.port, "/echo/1") == 429


def test_a_listen_change_needs_a_restart_and_sighup_never_stops(tmp_path, upstream_url):
    for name in ("contract.yaml", "paths.yaml"):
        (tmp_path / name).write_bytes((Path(__file__).parent / "data" / name).read_bytes())
    port = free_port()
    config_path = tmp_path / "apishield.yaml"
    config: dict[str, Any] = {"contract": "contract.yaml", "upstream": {"url": upstream_url},
                              "access_log": {"enabled": False},
                              "listen": {"host": "127.0.0.1", "port": port}}
    config_path.write_text(yaml.safe_dump(config))
    stderr_path = tmp_path / "gateway.stderr"
    with stderr_path.open("wb") as stderr_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "apishield", "serve", "--config", str(config_path)],
            stdout=subprocess.DEVNULL, stderr=stderr_file)
    gw = RunningGateway(f"http://127.0.0.1:{port}", port, process, tmp_path / "none",
                        stderr_path, config_path)
    try:
        wait_for_port(port, process)
        write_config(gw, listen={"host": "127.0.0.1", "port": free_port()},
                     headers={"hsts": "off"})
        process.send_signal(signal.SIGHUP)
        stderr = wait_for_log(gw, "reload (SIGHUP) succeeded")
        assert "listen: changed in apishield.yaml, but the running listener keeps its " \
               "settings: restart to apply" in stderr
        assert status_of(port, "/echo") == 200  # still on the old port
        gw.config_path.write_text("contract: [unclosed")
        for count in range(1, 4):  # (signals sent at once may arrive as one)
            process.send_signal(signal.SIGHUP)
            wait_for_log(gw, "reload (SIGHUP) failed", count=count)
        assert re.search(r"problem: .*apishield\.yaml:\d+:\d+: invalid YAML", gw.stderr())
        assert process.poll() is None
        assert status_of(port, "/echo") == 200
    finally:
        gw.stop()


def docs_example() -> dict[str, Any]:
    """The YAML example of docs/reload.md, exactly as written."""
    text = (DOCS / "reload.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block is not None
    loaded = yaml.safe_load(block.group(1))
    assert isinstance(loaded, dict)
    return loaded


def test_the_documented_file_watch_reloads_a_changed_config(make_gateway):
    example = docs_example()
    assert example == {"reload": {"watch": True, "interval": "1s"}}
    gw = make_gateway(example)
    time.sleep(0.3)
    write_config(gw, rate_limiting={"limits": [
        {"name": "items", "key": ["ip"], "rate": "1/m", "operations": ["echoItem"]}]})
    stderr = wait_for_log(gw, "reload (watch) succeeded", timeout=6)
    assert "changed rate_limiting" in stderr
    assert [status_of(gw.port, "/echo/1") for _ in range(2)] == [200, 429]


AUTH_CONTRACT = """\
openapi: 3.0.3
info: {title: reload auth, version: "1"}
components:
  securitySchemes:
    bearer: {type: http, scheme: bearer, bearerFormat: JWT}
paths:
  /echo:
    get: {operationId: echoGet, security: [{bearer: []}], responses: {"200": {description: ok}}}
"""


def test_a_reload_keeps_the_jwks_key_set_unless_auth_changes(tmp_path, upstream_url):
    issuer = start_issuer()
    contract = tmp_path / "auth.yaml"
    contract.write_text(AUTH_CONTRACT)
    auth = {"issuers": {"corp": {"issuer": issuer.issuer, "jwks_url": f"{issuer.url}/jwks.json",
                                 "audiences": [AUDIENCE], "algorithms": ["RS256"]}}}
    gw = start_gateway(tmp_path, upstream_url, {"auth": auth}, contract=contract)
    try:
        token = issuer.mint("RS256")

        def status(path: str) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            response = conn.getresponse()
            response.read()
            conn.close()
            return response.status

        assert status("/echo") == 200
        fetched = issuer.count("/jwks.json")
        assert fetched >= 1
        # a new operation, the same auth: key set and token cache carried over
        contract.write_text(AUTH_CONTRACT + '  /hop:\n    get: {operationId: hop, security: '
                            '[{bearer: []}], responses: {"200": {description: ok}}}\n')
        (tmp_path / "contract.yaml").write_text(contract.read_text())  # the one served
        gw.process.send_signal(signal.SIGHUP)
        line = [text for text in wait_for_log(gw, "reload (SIGHUP) succeeded").splitlines()
                if "reload (SIGHUP) succeeded" in text][-1]
        assert "changed contract" in line and "auth" in line.split("kept")[1].split(";")[0]
        assert status("/hop") == 200 and status("/echo") == 200
        assert issuer.count("/jwks.json") == fetched  # not fetched again
        # auth changes: a new service, which fetches the keys before it is swapped in
        auth["issuers"]["corp"]["leeway"] = "5s"
        write_config(gw, auth=auth)
        gw.process.send_signal(signal.SIGHUP)
        line = [text for text in wait_for_log(gw, "reload (SIGHUP) succeeded", count=2)
                .splitlines() if "reload (SIGHUP) succeeded" in text][-1]
        assert "auth" in line.split("replaced")[1]
        assert issuer.count("/jwks.json") == fetched + 1
        assert status("/echo") == 200
    finally:
        gw.stop()
        stop_issuer(issuer)
