"""ApiShieldMiddleware and the ASGI lifespan: the access log is flushed on shutdown.

The access log batches lines for up to 100 ms; a server that exits right after its last
response used to lose them. Under a real uvicorn, requests are sent and the process is
signalled within a few milliseconds of the last response: every request must have its
line. The app's own lifespan (FastAPI) keeps working, and an app that does not speak
lifespan, or a server that runs none, loses nothing either.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from apishield import ApiShieldMiddleware
from tests.conftest import DATA, free_port, wait_for_port
from tests.lifespan_apps import SLOW

REQUESTS = 40


def _config(tmp_path: Path) -> tuple[Path, Path]:
    access_log = tmp_path / "access.log"
    config = tmp_path / "apishield.yaml"
    config.write_text(yaml.safe_dump({
        "contract": str(DATA / "middleware_contract.yaml"),
        "access_log": {"path": str(access_log)},
    }))
    return config, access_log


def _run_uvicorn(tmp_path: Path, factory: str, lifespan: str) -> tuple[subprocess.Popen[bytes],
                                                                       int, Path, Path, Path]:
    config, access_log = _config(tmp_path)
    events = tmp_path / "events"
    stderr = tmp_path / "uvicorn.stderr"
    port = free_port()
    with stderr.open("wb") as stderr_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", f"tests.lifespan_apps:{factory}",
             "--port", str(port), "--log-level", "info", "--lifespan", lifespan],
            stdout=subprocess.DEVNULL, stderr=stderr_file,
            env={**os.environ, "LIFESPAN_TEST_CONFIG": str(config),
                 "LIFESPAN_TEST_EVENTS": str(events), "PYTHONUNBUFFERED": "1"},
            cwd=Path(__file__).parent.parent,
        )
    try:
        wait_for_port(port, process)
    except RuntimeError as exc:
        process.kill()
        raise RuntimeError(f"{exc}\n{stderr.read_text()}") from None
    return process, port, access_log, events, stderr


@pytest.mark.parametrize("last", ["answered", "in-flight"])
@pytest.mark.parametrize(("factory", "sig", "lifespan"), [
    ("fastapi_app", signal.SIGTERM, "auto"),
    ("fastapi_app", signal.SIGINT, "on"),
    ("raw_app", signal.SIGTERM, "auto"),  # the app refuses lifespan: the middleware answers
    ("raw_app", signal.SIGINT, "on"),
    ("fastapi_app", signal.SIGTERM, "off"),  # no lifespan at all: written when idle
    ("raw_app", signal.SIGINT, "off"),
])
def test_every_request_logged_when_signalled_at_the_end(tmp_path, factory, sig, lifespan,
                                                        last):
    """`answered`: the signal follows the last response within a few ms. `in-flight`: the
    last request is still running when the signal comes; it is answered during the
    shutdown, and its line is written less than 100 ms before the process exits (the case
    an unflushed batch loses)."""
    process, port, access_log, events, stderr = _run_uvicorn(tmp_path, factory, lifespan)
    ids: list[str] = []
    statuses: list[int] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            for i in range(REQUESTS):
                path = "/admin" if i % 4 == 3 else f"/items/{i}"  # /admin: refused, logged
                response = client.get(path)
                assert response.status_code == (404 if path == "/admin" else 200)
                if factory == "fastapi_app" and path != "/admin" and lifespan != "off":
                    # the lifespan state the app yielded reaches its requests
                    assert response.json() == {"item_id": str(i), "greeting": "hello"}
                ids.append(response.headers["x-request-id"])
                statuses.append(response.status_code)
            if last == "answered":
                answered = time.monotonic()
                process.send_signal(sig)
                assert time.monotonic() - answered < 0.05
            else:
                with ThreadPoolExecutor(1) as pool:
                    slow = pool.submit(client.get, "/items/slow")
                    time.sleep(SLOW / 3)
                    process.send_signal(sig)
                    response = slow.result()
                assert response.status_code == 200
                ids.append(response.headers["x-request-id"])
                statuses.append(200)
        process.wait(15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    log = stderr.read_text(errors="replace")
    assert "Traceback" not in log and "ERROR" not in log, log
    assert "unsupported" not in log, log  # the middleware spoke lifespan for a bare app
    if lifespan != "off":
        assert "Application shutdown complete" in log, log
    lines = [json.loads(line) for line in access_log.read_text().splitlines()]
    assert [line["request_id"] for line in lines] == ids  # every request, once, in order
    assert [line["status"] for line in lines] == statuses
    if factory == "fastapi_app":
        expected = [] if lifespan == "off" else ["startup", "shutdown"]
        noted = events.read_text().split() if events.exists() else []
        assert noted == expected  # the app's own lifespan handlers still ran


# In-process: the order of the protocol, and apps that do not follow it.

def _middleware(tmp_path: Path, app: Any) -> tuple[ApiShieldMiddleware, Path]:
    config, access_log = _config(tmp_path)
    return ApiShieldMiddleware(app, config=str(config)), access_log


async def _http_get(middleware: ApiShieldMiddleware, path: str) -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await middleware({"type": "http", "method": "GET", "path": path, "raw_path": path.encode(),
                      "query_string": b"", "headers": [], "client": ("127.0.0.1", 1)},
                     receive, send)
    return sent[0]["status"]


async def _ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def _lifespan_driver(sent: list[dict[str, Any]]) -> tuple[Any, Any]:
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive() -> dict[str, Any]:
        if not incoming:
            await asyncio.sleep(3600)
        if incoming[0]["type"] == "lifespan.shutdown" and not sent:
            raise AssertionError("shutdown sent before startup was answered")
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    return receive, send


async def test_pipeline_closed_after_the_app_shutdown_and_before_complete(tmp_path):
    order: list[str] = []
    holder: dict[str, ApiShieldMiddleware] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await _ok_app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                order.append("app startup")
                await send({"type": "lifespan.startup.complete"})
            else:
                # still open while the app shuts down: its last requests are logged
                assert await _http_get(holder["m"], "/items/last") == 200
                order.append(f"app shutdown, log closed: {holder['m']._closed}")
                await send({"type": "lifespan.shutdown.complete"})
                return

    middleware, access_log = _middleware(tmp_path, app)
    holder["m"] = middleware
    sent: list[dict[str, Any]] = []
    receive, send = _lifespan_driver(sent)

    async def watched_send(message: dict[str, Any]) -> None:
        order.append(f"{message['type']}, log closed: {middleware._closed}")
        await send(message)

    await middleware({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                     receive, watched_send)
    assert order == ["app startup", "lifespan.startup.complete, log closed: False",
                     "app shutdown, log closed: False",
                     "lifespan.shutdown.complete, log closed: True"]
    assert len(access_log.read_text().splitlines()) == 1  # flushed before "complete"


@pytest.mark.parametrize("refusal", ["raise", "return"])
async def test_app_without_lifespan_gets_it_answered(tmp_path, refusal):
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if refusal == "raise":
                raise ValueError("http only")
            return
        await _ok_app(scope, receive, send)

    middleware, access_log = _middleware(tmp_path, app)
    assert await _http_get(middleware, "/items/1") == 200
    sent: list[dict[str, Any]] = []
    receive, send = _lifespan_driver(sent)
    await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete",
                                         "lifespan.shutdown.complete"]
    assert middleware._closed and len(access_log.read_text().splitlines()) == 1


async def test_startup_failure_passes_through_untouched(tmp_path):
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database"})
        raise RuntimeError("no database")

    middleware, _ = _middleware(tmp_path, app)
    sent: list[dict[str, Any]] = []
    receive, send = _lifespan_driver(sent)
    with pytest.raises(RuntimeError, match="no database"):
        await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert sent == [{"type": "lifespan.startup.failed", "message": "no database"}]


async def test_app_failing_its_shutdown_still_gets_the_log_flushed(tmp_path):
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await _ok_app(scope, receive, send)
            return
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        raise RuntimeError("shutdown handler broke")

    middleware, access_log = _middleware(tmp_path, app)
    sent: list[dict[str, Any]] = []
    receive, send = _lifespan_driver(sent)
    assert await _http_get(middleware, "/items/1") == 200
    with pytest.raises(RuntimeError, match="shutdown handler broke"):
        await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert middleware._closed and len(access_log.read_text().splitlines()) == 1


async def test_a_second_lifespan_cycle_starts_a_fresh_pipeline(tmp_path):
    middleware, access_log = _middleware(tmp_path, _ok_app)
    for _ in range(2):
        sent: list[dict[str, Any]] = []
        receive, send = _lifespan_driver(sent)
        await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
        assert await _http_get(middleware, "/items/1") == 200
    middleware.pipeline.close()
    assert len(access_log.read_text().splitlines()) == 2


_NO_SHUTDOWN_SCRIPT = """
import asyncio, sys
sys.path.insert(0, sys.argv[2])
from apishield import ApiShieldMiddleware
from tests.test_middleware_lifespan import _http_get, _ok_app

middleware = ApiShieldMiddleware(_ok_app, config=sys.argv[1])
loop = asyncio.new_event_loop()
print(loop.run_until_complete(_http_get(middleware, "/items/1")), flush=True)
# no lifespan.shutdown, the loop never runs again: the batch is still pending here
"""


def test_pending_lines_written_when_the_interpreter_exits(tmp_path):
    """A server that never sends lifespan.shutdown and stops its loop at once: the line of
    the last request is still in the batch; the finalizer tied to the middleware writes it
    as the interpreter exits (also where Pipeline is compiled and has no __weakref__)."""
    config, access_log = _config(tmp_path)
    done = subprocess.run([sys.executable, "-c", _NO_SHUTDOWN_SCRIPT, str(config),
                           str(Path(__file__).parent.parent)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["200"]
    lines = [json.loads(line) for line in access_log.read_text().splitlines()]
    assert [(line["route"], line["status"]) for line in lines] == [("/items/{item_id}", 200)]


async def test_a_new_pipeline_closes_the_previous_log(tmp_path):
    """A second lifespan cycle makes a new pipeline: the previous one's log is closed then,
    not kept open until the middleware is dropped."""
    middleware, _ = _middleware(tmp_path, _ok_app)
    first = middleware.pipeline.access_log
    assert first is not None
    middleware._closed = True  # what a finished lifespan cycle leaves
    middleware._started = False
    assert await _http_get(middleware, "/items/2") == 200
    assert middleware.pipeline.access_log is not first
    assert first._stream.closed
    await middleware.pipeline.stop()
