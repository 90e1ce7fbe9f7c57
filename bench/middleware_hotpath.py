#!/usr/bin/env python3
"""CPU per request of the ASGI middleware, in memory (issue 18): no server, no wrk.

`bench/middleware` measures ApiShieldMiddleware under uvicorn next to its peers; this tool
isolates the middleware's own cost: the same contract, config, app answers and requests
(bench/middleware_harness.py's), driven straight through `ApiShieldMiddleware.__call__`
around a raw ASGI app that answers with ready-made bytes, after a lifespan startup (as
uvicorn sends one). Reported per operation: the median over `--rounds` of CPU
microseconds per request (`time.process_time` over `--number` requests), and with
`--profile` the functions with the most own time (cProfile).

With `--instructions`, it runs itself again under valgrind's callgrind and reports
instructions per request instead (counted only around `--number` requests per operation,
with the loop given no turn inside and the long-lived heap frozen first, as
`bench/hotpath.py --instructions` does): a figure that does not move with the machine's
load, for judging a change while the machine is shared.

Which build it measures is the one the interpreter imports: run it with a venv where the
compiled wheel is installed, from outside the repository (so `src/` is not on sys.path),
to measure the compiled build (docs/performance.md); the output says which.

    .venv/bin/python bench/middleware_hotpath.py [--rounds 5] [--number 20000] [--profile]
    .venv/bin/python bench/middleware_hotpath.py --instructions [--number 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import callgrind  # bench/callgrind.py
import middleware_harness as mh

from apishield import ApiShieldMiddleware
from apishield.compiled import build_kind

Message = dict[str, Any]
UNDER_VALGRIND = "MW_HOTPATH_CALLGRIND_HELPER"
GET_BODY = mh.UPSTREAM_BODY.encode()
CREATED = json.dumps(mh.CREATED_BODY, separators=(",", ":")).encode()
POST_BODY = mh.BODY_1K


async def app(scope: Message, receive: Callable[[], Awaitable[Message]],
              send: Callable[[Message], Awaitable[None]]) -> None:
    """The bench apps' answers, with no framework: what is left is the middleware."""
    if scope["method"] == "POST":
        while (await receive()).get("more_body"):
            pass
        status, body = 201, CREATED
    else:
        status, body = 200, GET_BODY
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def scope_for(method: str, target: str, body: bytes) -> Message:
    path, _, query = target.partition("?")
    headers = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk")]
    if body:
        headers += [(b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body))]
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": query.encode(), "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}


class Driver:
    """One operation's requests, sent one after the other; the loop gets a turn every
    100 requests (the access log's timer runs as under a server)."""

    def __init__(self, middleware: Any, method: str, target: str, body: bytes) -> None:
        self.middleware = middleware
        self.scope = scope_for(method, target, body)
        self.request: Message = {"type": "http.request", "body": body, "more_body": False}
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        return self.request

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    async def run(self, number: int, turns: bool = True) -> None:
        middleware, scope, receive, send = self.middleware, self.scope, self.receive, self.send
        for i in range(number):
            await middleware(dict(scope), receive, send)
            if i % 100 == 99:
                self.sent.clear()
                if turns:
                    await asyncio.sleep(0)

    async def one(self) -> tuple[int, dict[bytes, bytes], bytes]:
        self.sent.clear()
        await self.run(1)
        start, *bodies = self.sent
        return (start["status"], dict(start["headers"]),
                b"".join(m.get("body", b"") for m in bodies))


async def build(d: Path) -> Any:
    (d / "openapi.yaml").write_text(yaml.safe_dump(mh.contract(), sort_keys=False))
    (d / "apishield.yaml").write_text(yaml.safe_dump(mh.apishield_config("apishield", d)))
    middleware = ApiShieldMiddleware(app, config=str(d / "apishield.yaml"))
    started = asyncio.Event()

    async def receive() -> Message:
        if not started.is_set():
            return {"type": "lifespan.startup"}
        await asyncio.sleep(3600)
        return {"type": "lifespan.shutdown"}

    async def send(message: Message) -> None:
        started.set()

    asyncio.get_running_loop().create_task(
        middleware({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send))
    await started.wait()
    return middleware


async def check(drivers: dict[str, Driver]) -> None:
    """The fast path is what is measured: 200/201 with the app's body and apishield's
    headers, and an invalid request refused (else the tool measures something else)."""
    for name, expected in (("get", 200), ("post", 201)):
        status, headers, body = await drivers[name].one()
        if status != expected or not all(h.encode() in headers for h in mh.APISHIELD_HEADERS):
            raise SystemExit(f"{name}: {status} {headers!r}: not the validated fast path")
        json.loads(body)
    invalid = Driver(drivers["get"].middleware, "GET", "/items/abc?limit=10", b"")
    status, _, _ = await invalid.one()
    if status < 400:
        raise SystemExit(f"an invalid path parameter was answered {status}")


async def count_instructions(drivers: dict[str, Driver], number: int) -> None:
    """Inside callgrind: instrument only the measured requests of each operation. The loop
    gets no turn inside: its timers (the access log's 100 ms flush) run by wall-clock time,
    ~50x more often per request under valgrind, and would make the count vary."""
    lib = callgrind.counting_lib(UNDER_VALGRIND)
    gc.collect()
    gc.freeze()  # no full collection of the start-up heap by chance inside a count
    for name, driver in drivers.items():
        await asyncio.sleep(0)
        lib.hp_start()
        await driver.run(number, turns=False)
        lib.hp_stop(name.encode())


def run_under_callgrind(argv: list[str], number: int) -> dict[str, int]:
    """This tool again under callgrind: instructions per request per operation."""
    totals = callgrind.run_counting(__file__, argv, UNDER_VALGRIND)
    return {name: round(total / number) for name, total in totals.items()}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mw-hotpath-") as tmp:
        middleware = await build(Path(tmp))
        drivers = {"get": Driver(middleware, "GET", mh.GET_PATH, b""),
                   "post": Driver(middleware, "POST", mh.POST_PATH, POST_BODY)}
        await check(drivers)
        for driver in drivers.values():
            await driver.run(min(2000, args.number))  # warm caches
        if os.environ.get(UNDER_VALGRIND):
            await count_instructions(drivers, args.number)
            await middleware.pipeline.stop()
            return {}
        rounds: dict[str, list[float]] = {name: [] for name in drivers}
        for _ in range(args.rounds):
            for name, driver in drivers.items():
                start = time.process_time()
                await driver.run(args.number)
                rounds[name].append((time.process_time() - start) / args.number * 1e6)
        result: dict[str, Any] = {
            "build": build_kind(), "python": sys.version.split()[0],
            "rounds": args.rounds, "number": args.number,
            "us_per_request": {name: round(statistics.median(v), 2)
                               for name, v in rounds.items()},
            "all_rounds": rounds}
        if args.profile:
            result["profile"] = {}
            for name, driver in drivers.items():
                profiler = cProfile.Profile()
                profiler.enable()
                await driver.run(args.number)
                profiler.disable()
                stats = pstats.Stats(profiler)
                rows = sorted(((tt, nc, f"{Path(file).name}:{line}({func})")
                               for (file, line, func), (_c, nc, tt, _ct, _cl)
                               in stats.stats.items()), reverse=True)  # type: ignore[attr-defined]
                result["profile"][name] = [
                    {"function": fn, "calls_per_request": round(nc / args.number, 2),
                     "tottime_us": round(tt / args.number * 1e6, 2)} for tt, nc, fn in rows[:15]]
        await middleware.pipeline.stop()
        return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--number", type=int, default=20000, help="requests per round and operation")
    ap.add_argument("--profile", action="store_true", help="cProfile's top 15 per operation")
    ap.add_argument("--json", type=Path, help="write the result here too")
    ap.add_argument("--instructions", action="store_true",
                    help="instructions per request under callgrind instead of CPU time "
                         "(use a smaller --number, e.g. 2000)")
    args = ap.parse_args(argv)
    if args.instructions:
        rest = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--instructions"]
        counted = run_under_callgrind(rest, args.number)
        print(f"build: {build_kind()}; instructions per request ({args.number} requests "
              "per operation, callgrind):")
        for name, value in counted.items():
            print(f"  {name:5s} {value:10,d}")
        if args.json:
            args.json.write_text(json.dumps({"build": build_kind(), "number": args.number,
                                             "instructions_per_request": counted}, indent=2)
                                 + "\n")
        return 0 if counted else 1
    result = asyncio.run(main_async(args))
    if not result:  # the run inside callgrind: the parent reports
        return 0
    print(f"build: {result['build']}; CPU us per request (median of {args.rounds} rounds of "
          f"{args.number}):")
    for name, value in result["us_per_request"].items():
        print(f"  {name:5s} {value:8.2f}")
    for name, rows in result.get("profile", {}).items():
        print(f"\n{name}: own time per request")
        for row in rows:
            print(f"  {row['tottime_us']:7.2f} us  {row['calls_per_request']:6.2f} calls  "
                  f"{row['function']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
