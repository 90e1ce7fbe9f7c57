"""Fixtures that start real servers on 127.0.0.1: the test upstream and the gateway CLI."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.upstream_server import UpstreamServer, start_upstream, stop

pytest_plugins = ["tests.secret_scan"]  # the suite's logs are scanned for its secrets
DATA = Path(__file__).parent / "data"

# `apishield serve` runs one worker per usable core by default (docs/workers.md). The
# suite pins one process for every gateway it starts (here and in the tests that run
# `serve` themselves, which inherit this environment): most tests are about one process's
# behaviour, a supervisor and N workers cost N interpreters each, and CI runs two test
# processes on two cores. tests/test_workers.py runs the default on purpose
# (`start_gateway(workers=None)`).
os.environ["APISHIELD_WORKERS"] = "1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"gateway did not listen on {port} within {timeout}s")


def json_lines(text: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The apishield log lines (one JSON object each) in `text`, of `kind` if given; a
    CLI's stderr also holds messages for people, which are not log lines."""
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [line for line in lines if kind is None or line["kind"] == kind]


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll `predicate` every 50 ms until it returns something true; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


@dataclass
class RunningGateway:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    access_log: Path
    stderr_path: Path
    config_path: Path

    def log_lines(self) -> list[dict[str, Any]]:
        """The access log so far (it is flushed every 100 ms, so wait a little)."""
        time.sleep(0.25)
        if not self.access_log.exists():
            return []
        text = self.access_log.read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def log_entry(self, request_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for entry in self.log_lines():
                if entry["request_id"] == request_id:
                    return entry
        raise AssertionError(f"no access-log line for request {request_id}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def security_events(self, event: str) -> list[dict[str, Any]]:
        """The security events of this kind the gateway logged so far (docs/logging.md)."""
        return [line for line in json_lines(self.stderr(), "security")
                if line["event"] == event]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


@pytest.fixture(scope="session")
def upstream() -> Iterator[UpstreamServer]:
    server, _ = start_upstream()
    yield server
    stop(server)


@pytest.fixture(scope="session")
def upstream_url(upstream: UpstreamServer) -> str:
    host, port = upstream.server_address[:2]
    return f"http://{host}:{port}"


def start_gateway(
    workdir: Path, upstream_url: str, overrides: dict[str, Any] | None = None,
    contract: Path | None = None, workers: int | None = 1, stdout: int = subprocess.DEVNULL,
) -> RunningGateway:
    """Copy the test contract to `workdir`, write a config and run `apishield serve`
    (with `--workers N` when `workers` is not 1: a supervisor and N worker processes;
    None: the default, one worker per usable core)."""
    for name in ("contract.yaml", "paths.yaml"):
        shutil.copy(DATA / name, workdir / name)
    if contract is not None:
        shutil.copy(contract, workdir / "contract.yaml")
    port = free_port()
    access_log = workdir / "access.log"
    config: dict[str, Any] = {
        "contract": "contract.yaml",
        "upstream": {"url": upstream_url},
        "access_log": {"path": str(access_log)},
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    config_path = workdir / "apishield.yaml"
    config_path.write_text(yaml.safe_dump(config))
    stderr_path = workdir / "gateway.stderr"
    with stderr_path.open("wb") as stderr_file:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "apishield", "serve", "--config", str(config_path),
             "--port", str(port), *(["--workers", str(workers)] if workers else [])],
            stdout=stdout,
            stderr=stderr_file,
            env={**{name: value for name, value in os.environ.items()
                    if name != "APISHIELD_WORKERS" or workers is not None},
                 "PYTHONUNBUFFERED": "1"},
        )
    try:
        wait_for_port(port, process)
        admin = config.get("admin")
        if isinstance(admin, dict) and admin.get("port"):
            # the admin listener starts after the public one: a test that calls it at once
            # met a refused connection on a loaded machine
            wait_for_port(int(admin["port"]), process)
    except RuntimeError as exc:
        process.kill()
        process.wait()
        raise RuntimeError(f"{exc}\n{stderr_path.read_text()}") from None
    return RunningGateway(f"http://127.0.0.1:{port}", port, process, access_log, stderr_path,
                          config_path)


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, upstream_url: str
) -> Iterator[RunningGateway]:
    """One gateway with the default test config, shared by a module's tests."""
    running = start_gateway(tmp_path_factory.mktemp("gw"), upstream_url)
    yield running
    running.stop()


@pytest.fixture
def make_gateway(tmp_path: Path, upstream_url: str) -> Iterator[Any]:
    """Start a gateway with config overrides; stopped at the end of the test."""
    started: list[RunningGateway] = []

    def make(overrides: dict[str, Any] | None = None, **kwargs: Any) -> RunningGateway:
        workdir = tmp_path / f"gw{len(started)}"
        workdir.mkdir()
        running = start_gateway(workdir, kwargs.pop("upstream", upstream_url), overrides,
                                **kwargs)
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


def raw_exchange(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes or goes quiet; return what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        chunks = []
        sock.settimeout(timeout)
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except TimeoutError:
            pass
        return b"".join(chunks)
