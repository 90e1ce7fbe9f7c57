"""The real `apishield` command, run as a subprocess (`python -m apishield ...`)."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import apishield.demo
from tests.conftest import DATA, free_port

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apishield", *args],
        capture_output=True, text=True, timeout=timeout, env=ENV, check=False,
    )


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def valid_config(tmp_path: Path) -> Path:
    for name in ("apishield.yaml", "contract.yaml", "paths.yaml"):
        shutil.copy(DATA / name, tmp_path / name)
    return tmp_path / "apishield.yaml"


# --- check ------------------------------------------------------------------------------


def test_check_valid_config_prints_ok(valid_config):
    result = run("check", "--config", str(valid_config))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{valid_config}: OK (19 operations from contract.yaml)\n"
    assert result.stderr == ""


def test_check_bundled_data_with_short_option_and_relative_path(valid_config):
    result = subprocess.run(
        [sys.executable, "-m", "apishield", "check", "-c", "apishield.yaml"],
        capture_output=True, text=True, timeout=30, env=ENV, cwd=valid_config.parent,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("apishield.yaml: OK (19 operations")


BROKEN_CONTRACT = """\
openapi: 3.0.3
info: {title: t, version: "1"}
paths:
  /pets:
    get:
      operationId: listPets
      x-apishield: {ratelimit: 5}
      responses: {}
    post:
      operationId: createPet
      requestBody: {$ref: "#/components/requestBodies/Missing"}
      responses: {}
  /pets/{id:
    get: {operationId: listPets, responses: {}}
"""

CONTRACT_PROBLEMS = [
    'contract.yaml#/paths/~1pets/get/x-apishield: unknown key "ratelimit"',
    "contract.yaml#/paths/~1pets/post/requestBody/$ref: '#/components/requestBodies/Missing' "
    "points at nothing",
    "contract.yaml#/paths/~1pets~1{id: malformed path template '/pets/{id'",
    "contract.yaml#/paths/~1pets~1{id/get/operationId: duplicate operationId 'listPets' "
    "(also at /paths/~1pets/get)",
    "operations.nope: no operation with this operationId in the contract",
]

CONFIG_PROBLEMS = [
    'limits: unknown key "max_body"',
    "upstream.url: 'ftp://example.com' must start with http:// or https://",
    "timeouts.header: 'soon' is not a duration; write e.g. 10, 10s, 500ms, 2m or 90d",
]


def broken(tmp_path: Path, *, config_problems: bool, port: int = 0) -> Path:
    (tmp_path / "contract.yaml").write_text(BROKEN_CONTRACT)
    if config_problems:
        upstream = "ftp://example.com"
        extra = "limits: {max_body: 1}\ntimeouts: {header: soon}\n"
    else:
        upstream, extra = "http://127.0.0.1:9", ""
    config = tmp_path / "apishield.yaml"
    config.write_text(
        f"contract: contract.yaml\nupstream: {{url: '{upstream}'}}\n"
        f"listen: {{port: {port}}}\noperations: {{nope: {{public: true}}}}\n{extra}"
    )
    return config


def reported(stderr: str, config: Path) -> list[str]:
    lines = stderr.splitlines()
    count = int(re.match(r"apishield: (\d+) problem\(s\) in (.*):$", lines[0]).group(1))
    assert lines[0] == f"apishield: {count} problem(s) in {config}:"
    problems = [line.removeprefix("  ") for line in lines[1:]]
    assert all(line.startswith("  ") for line in lines[1:])
    assert len(problems) == count
    return problems


def test_check_reports_every_contract_problem(tmp_path):
    config = broken(tmp_path, config_problems=False)
    result = run("check", "--config", str(config))
    assert result.returncode == 2
    assert result.stdout == ""
    problems = reported(result.stderr, config)
    for expected in CONTRACT_PROBLEMS:
        assert expected in problems, (expected, problems)


def test_check_reports_config_and_contract_problems_together(tmp_path):
    # One run must list everything: the config's own problems do not hide the contract's.
    config = broken(tmp_path, config_problems=True)
    result = run("check", "--config", str(config))
    assert result.returncode == 2
    problems = reported(result.stderr, config)
    for expected in CONFIG_PROBLEMS + CONTRACT_PROBLEMS:
        assert expected in problems, (expected, problems)


def test_check_reports_every_config_problem(tmp_path):
    config = broken(tmp_path, config_problems=True)
    result = run("check", "--config", str(config))
    assert result.returncode == 2
    problems = reported(result.stderr, config)
    for expected in CONFIG_PROBLEMS:
        assert expected in problems, (expected, problems)


def test_check_yaml_syntax_error(tmp_path):
    config = tmp_path / "apishield.yaml"
    config.write_text("contract: c.yaml\nlimits:\n  max_body_bytes: 10\n    oops: 1\n")
    result = run("check", "--config", str(config))
    assert result.returncode == 2
    assert reported(result.stderr, config) == [
        f"{config}:4:9: invalid YAML: mapping values are not allowed in this context"
    ]


def test_check_missing_config_file(tmp_path):
    config = tmp_path / "nope.yaml"
    result = run("check", "--config", str(config))
    assert result.returncode == 2
    assert reported(result.stderr, config) == [f"{config}: file not found"]


# --- serve ------------------------------------------------------------------------------


@pytest.mark.parametrize("config_problems", [False, True])
def test_serve_refuses_a_broken_config_with_the_same_messages(tmp_path, config_problems):
    port = free_port()
    config = broken(tmp_path, config_problems=config_problems, port=port)
    checked = run("check", "--config", str(config))
    served = run("serve", "--config", str(config), timeout=15)
    assert served.returncode == 2
    assert served.stderr == checked.stderr
    assert served.stdout == ""
    assert "listening" not in served.stderr
    assert not listening(port)


def test_serve_with_port_override_still_refuses(tmp_path):
    port = free_port()
    config = broken(tmp_path, config_problems=False)
    served = run("serve", "--config", str(config), "--port", str(port), timeout=15)
    assert served.returncode == 2
    problems = reported(served.stderr, config)
    for expected in CONTRACT_PROBLEMS:
        assert expected in problems, (expected, problems)
    assert not listening(port)


def test_serve_without_upstream_says_what_to_add(tmp_path):
    shutil.copy(DATA / "contract.yaml", tmp_path / "contract.yaml")
    shutil.copy(DATA / "paths.yaml", tmp_path / "paths.yaml")
    config = tmp_path / "apishield.yaml"
    port = free_port()
    config.write_text(f"contract: contract.yaml\nlisten: {{port: {port}}}\n")
    for command in ("serve", "check"):
        result = run(command, "--config", str(config), timeout=15)
        assert result.returncode == 2, command
        assert reported(result.stderr, config) == [
            "upstream: required key is missing (write e.g. upstream: {url: "
            "http://127.0.0.1:9000})"
        ]
    assert not listening(port)


# --- help -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [None, "serve", "check", "demo"])
def test_help(command):
    args = ["--help"] if command is None else [command, "--help"]
    result = run(*args)
    assert result.returncode == 0, result.stderr
    prefix = "usage: apishield" + ("" if command is None else f" {command}")
    assert result.stdout.startswith(prefix)
    assert "--config" in result.stdout or command in (None, "demo")
    if command is None:
        for name in ("serve", "check", "demo"):
            assert name in result.stdout


def test_no_command_is_a_usage_error():
    result = run()
    assert result.returncode == 2
    assert "usage: apishield" in result.stderr


# --- demo -------------------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_demo_serves_and_stops_on_sigint(tmp_path):
    port = free_port()
    started = time.time()
    process = subprocess.Popen(
        [sys.executable, "-m", "apishield", "demo", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    try:
        url = None
        deadline = time.monotonic() + 20
        while url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                assert process.poll() is None, process.stderr.read()
                continue
            match = re.search(r"gateway\s+\(protected\):\s+(http://\S+)", line)
            if match:
                url = match.group(1)
        assert url == f"http://127.0.0.1:{port}"

        response = httpx.get(f"{url}/pets/1", timeout=5)
        assert response.status_code == 200
        assert response.json()["id"] == 1
        assert response.headers["x-content-type-options"] == "nosniff"

        response = httpx.get(f"{url}/admin", timeout=5)
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.json()["status"] == 404

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=5) == 0
        assert not listening(port)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        pumper.join(5)  # the pipe is at its end once the process is gone
        process.stdout.close()
    stderr = process.stderr.read()
    process.stderr.close()
    assert "Traceback" not in stderr, stderr
    # its state (usage counts, the audit trail) went to a temporary folder, not into the
    # installed package: nothing written beside the demo's contract
    package = Path(apishield.demo.__file__).parent
    assert [path.name for path in package.iterdir()
            if path.stat().st_mtime >= started] == []
    assert "stopped" in stderr


@pytest.mark.parametrize("command", ["demo", "serve"])
def test_port_taken_exits_1_promptly(valid_config, command):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        args = [command, "--port", str(port)]
        if command == "serve":
            args += ["--config", str(valid_config)]
        try:
            result = run(*args, timeout=8)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`apishield {command}` on a taken port did not exit within 8 s")
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("apishield: ") and "address already in use" in last, result.stderr
    assert "Traceback" not in result.stderr
