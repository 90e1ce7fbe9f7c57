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
probe must see the pipeline's frames, or it proves nothing.
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
