"""In the compiled build, a proxied request runs no interpreted apishield frame.

Issue 18 found interpreted code on the compiled request path three ways: a module missing
from `HOT_MODULES` (gateway.py), a property of an interpreted class read per response
(`Operation.public`), and dataclasses made per request inside compiled modules (mypyc keeps
a dataclass's generated `__init__` interpreted). Each cost more than the compiled code
around it. This test serves the demo contract in-process (a real listener and the real demo
upstream on 127.0.0.1), sends GETs and validated, scanned JSON POSTs through a rate limit
with response filtering, and records every interpreted frame the event loop's thread
enters while the requests run (`sys.setprofile` sees only interpreted frames).

Compiled (`APISHIELD_EXPECT_COMPILED=1`): no apishield frame at all. Pure Python: the same
probe must see the pipeline's frames, or it proves nothing. The ASGI middleware likewise,
driven as an ASGI server drives it (lifespan, then requests): its one interpreted frame per
request is `ApiShieldMiddleware.__call__`, by design (a thin class users may subclass).
"""

from __future__ import annotations

import asyncio
import collections
import http.client
import json
import os
import shutil
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from apishield import ApiShieldMiddleware
from apishield.config import load_config
from apishield.demo.api import make_server
from apishield.gateway import build_gateway, serve

EXPECT_COMPILED = os.environ.get("APISHIELD_EXPECT_COMPILED") == "1"
DEMO = Path(__file__).resolve().parents[1] / "src" / "apishield" / "demo" / "openapi.yaml"
PACKAGE = f"{os.sep}apishield{os.sep}"


def _requests(port: int, rounds: int) -> list[int]:
    statuses = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = json.dumps({"name": "Rex, a small brown dog and his friend", "tag": "dog"})
    for _ in range(rounds):
        conn.request("GET", "/pets?limit=5")
        response = conn.getresponse()
        response.read()
        statuses.append(response.status)
        conn.request("POST", "/pets", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        statuses.append(response.status)
    conn.close()
    return statuses


def test_a_proxied_request_runs_no_interpreted_apishield_frame(tmp_path):
    upstream = make_server("127.0.0.1", 0)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    shutil.copy(DEMO, tmp_path / "openapi.yaml")
    path = tmp_path / "apishield.yaml"
    path.write_text(
        "contract: openapi.yaml\n"
        f"upstream: {{url: 'http://127.0.0.1:{upstream.server_address[1]}'}}\n"
        "listen: {host: 127.0.0.1, port: 0}\n"
        f"access_log: {{path: '{tmp_path / 'access.log'}'}}\n"
        "responses: {mode: filter}\n"
        "rate_limiting:\n"
        "  limits: [{name: per-ip, key: [ip], rate: 100000/m}]\n"
    )
    gateway = build_gateway(load_config(path))
    seen: collections.Counter[str] = collections.Counter()
    statuses: dict[str, list[int]] = {}

    def probe(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and PACKAGE in frame.f_code.co_filename:
            code = frame.f_code
            where = code.co_filename.rsplit(PACKAGE, 1)[1]
            seen[f"{where}:{code.co_firstlineno}({code.co_name})"] += 1

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[tuple[str, int]] = loop.create_future()
        stop = asyncio.Event()
        task = asyncio.ensure_future(serve(gateway, "127.0.0.1", 0, ready=ready, stop=stop))
        _, port = await ready
        statuses["warm-up"] = await asyncio.to_thread(_requests, port, 5)
        sys.setprofile(probe)  # this thread only: the event loop's
        try:
            statuses["probed"] = await asyncio.to_thread(_requests, port, 20)
        finally:
            sys.setprofile(None)
        stop.set()
        await task

    try:
        asyncio.run(main())
    finally:
        upstream.shutdown()
        upstream.server_close()
    assert set(statuses["warm-up"]) == set(statuses["probed"]) == {200, 201}, statuses
    if EXPECT_COMPILED:
        assert dict(seen) == {}
    else:
        assert any(name.startswith("pipeline.py") for name in seen), seen


async def _pets(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A raw ASGI app behind the middleware: lifespan, and the demo's two pet routes."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    created = scope["method"] == "POST"
    body = json.dumps({"id": 1, "name": "Rex", "tag": "dog"} if created
                      else [{"id": 1, "name": "Rex"}]).encode()
    await send({"type": "http.response.start", "status": 201 if created else 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


async def _call(app: Any, method: str, path: str, query: bytes, body: bytes) -> int:
    """One request, as an ASGI server sends it; the response status."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": query, "root_path": "", "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 8000),
             "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                         (b"content-length", b"%d" % len(body))]}
    sent: list[dict[str, Any]] = []
    requests = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return requests.pop(0) if requests else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return int(sent[0]["status"])


def test_a_request_through_the_middleware_runs_only_its_thin_class_interpreted(tmp_path):
    shutil.copy(DEMO, tmp_path / "openapi.yaml")
    path = tmp_path / "apishield.yaml"
    path.write_text(
        "contract: openapi.yaml\n"
        f"access_log: {{path: '{tmp_path / 'access.log'}'}}\n"
        "responses: {mode: filter}\n"
        "rate_limiting:\n"
        "  limits: [{name: per-ip, key: [ip], rate: 100000/m}]\n"
    )
    app = ApiShieldMiddleware(_pets, config=path)
    seen: collections.Counter[str] = collections.Counter()
    statuses: list[int] = []
    body = json.dumps({"name": "Rex, a small brown dog and his friend", "tag": "dog"}).encode()

    def probe(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and PACKAGE in frame.f_code.co_filename:
            code = frame.f_code
            seen[f"{code.co_filename.rsplit(PACKAGE, 1)[1]}({code.co_name})"] += 1

    async def main() -> None:
        lifespan = [{"type": "lifespan.startup"}]
        started = asyncio.Event()
        stopping = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if lifespan:
                return lifespan.pop(0)
            await stopping.wait()
            return {"type": "lifespan.shutdown"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "lifespan.startup.complete":
                started.set()

        task = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}},
                                         receive, send))
        await started.wait()
        for _ in range(5):  # warm-up: what is made once per operation is made here
            statuses.append(await _call(app, "GET", "/pets", b"limit=5", b""))
            statuses.append(await _call(app, "POST", "/pets", b"", body))
        sys.setprofile(probe)
        try:
            for _ in range(20):
                statuses.append(await _call(app, "GET", "/pets", b"limit=5", b""))
                statuses.append(await _call(app, "POST", "/pets", b"", body))
        finally:
            sys.setprofile(None)
        stopping.set()
        await task

    asyncio.run(main())
    assert set(statuses) == {200, 201}, statuses
    if EXPECT_COMPILED:
        assert dict(seen) == {"middleware.py(__call__)": 40}
    else:
        assert any(name.startswith("pipeline.py") for name in seen), seen
