"""Signals never stop the gateway silently (issue 11, must-fix 3).

SIGHUP killed a plain-HTTP gateway with no log line, breaking in-flight requests and losing
access-log lines of answered ones. Now SIGHUP reloads what can be reloaded and says so; every
signal that ends the process logs which one, after flushing the access log.
"""

from __future__ import annotations

import http.client
import signal
import threading
import time

import pytest

from tests.conftest import json_lines


def drive(port: int, stop: threading.Event, answered: list[str], failures: list[str]) -> None:
    """Sequential requests on keep-alive connections until told to stop."""
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
            answered.append(response.getheader("X-Request-Id"))
        else:
            failures.append(str(response.status))
    conn.close()


def test_sighup_under_load_neither_stops_nor_breaks_a_plain_gateway(make_gateway):
    gw = make_gateway()
    stop = threading.Event()
    answered: list[str] = []
    failures: list[str] = []
    workers = [threading.Thread(target=drive, args=(gw.port, stop, answered, failures))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        for _ in range(3):
            time.sleep(0.3)
            gw.process.send_signal(signal.SIGHUP)
        time.sleep(0.3)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert gw.process.poll() is None, gw.stderr()
    assert failures == []
    assert len(answered) > 50
    assert gw.stderr().count("SIGHUP: no TLS listener to reload") == 3
    # every answered request is in the access log
    assert gw.stop() == 0
    logged = {entry["request_id"] for entry in gw.log_lines()}
    assert set(answered) <= logged


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGQUIT"])
def test_a_stopping_signal_is_logged_and_the_access_log_flushed(make_gateway, name):
    gw = make_gateway()
    answered = []
    for _ in range(20):
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
        conn.request("GET", "/echo")
        response = conn.getresponse()
        response.read()
        answered.append(response.getheader("X-Request-Id"))
        conn.close()
    # at once: the access log batches lines every 100 ms, so these are not written yet
    gw.process.send_signal(getattr(signal, name))
    assert gw.process.wait(15) == 0
    stderr = gw.stderr()
    assert f"{name} received: shutting down" in stderr
    assert json_lines(stderr)[-1]["event"] == "stop"  # the last line: it stopped
    logged = {entry["request_id"] for entry in gw.log_lines()}
    assert set(answered) <= logged


@pytest.mark.parametrize("name", ["SIGUSR1", "SIGUSR2"])
def test_user_signals_are_logged_and_ignored(make_gateway, name):
    gw = make_gateway()
    gw.process.send_signal(getattr(signal, name))
    time.sleep(0.3)
    assert gw.process.poll() is None
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    conn.request("GET", "/echo")
    assert conn.getresponse().status == 200
    conn.close()
    assert f"{name} received: ignored" in gw.stderr()
