#!/usr/bin/env python3
"""CPU per request of the whole request path, in memory (issue 18): no sockets, no wrk.

wrk figures on a shared 2-core machine move by more than the changes being judged, so
this tool measures the gateway's own work with the noise taken out: the REAL code path
of `apishield serve` (a `Gateway` built from a config and a contract as `cli/main.py`
builds it, an `HttpConnection`, a pooled `UpstreamConnection`) is driven with fake
transports that only record what is written. One iteration:

    client request bytes -> HttpConnection.data_received -> llhttp callbacks -> pipeline
    -> Gateway.forward_nowait -> UpstreamConnection.send_nowait (write captured)
    -> upstream response bytes -> UpstreamConnection.data_received -> llhttp callbacks
    -> HttpConnection._on_upstream -> response head + body written to the client transport

On the callback fast path this is synchronous (no task, no future); the tool checks it
before measuring (the client transport holds the expected 200 and body after the two
`data_received` calls) and gives the event loop one turn every BATCH iterations, as a
loaded server would between socket reads (access-log flushes, housekeeping run there).

Targets:
- `passthrough`: bench/harness.py's pass-through contract (GET /item, public), access log
  to a file, metrics on (the default);
- `full`: the full pipeline of issue 18: POST /item with the harness's 1 KB JSON body
  validated against its 20-property schema with the injection scan, a bearer JWT (RS256,
  static keys, the same token every request: a token-cache hit), a per-identity rate
  limit that never refuses, the 200 response filtered against a declared schema (parsed,
  pruned, re-serialized), security headers, access log, metrics: exactly bench/run
  --full's apishield_full (`harness.full_contract`/`full_config`: 5 of the upstream
  body's 9 properties kept);
- `floor`: bench/floor_proxy.py's Client/Upstream driven the same way: the leanest
  uvloop + httptools proxy, no logic (the reference the ratios are taken to).

The request bytes are those wrk sends (captured from wrk 4: the request line and `Host`
only; `Content-Type`/`Content-Length` for a POST from a Lua script, `Authorization` for
the JWT); `--client-headers` adds a curl-like `User-Agent` and `Accept`. The upstream's
answer is the bench upstream's (nginx `return 200` with the harness's ~200 B body).

Reported per target: the median over `--rounds` alternating rounds of CPU microseconds
per request (`time.process_time` over `--number` iterations; GC as in production), the
ratio to the floor, Python-level calls per request and the top functions by own time
(cProfile over `--profile-number` iterations). For scale only: nginx `proxy_pass` spends
~9.6 us of CPU per request in situ (bench/RESULTS.md, TLS section), and Python work in
situ costs ~3x its in-memory figure (cache pressure from the kernel's socket work).

With `--instructions`, the tool runs itself under valgrind's callgrind instead and
reports instructions per request (`Ir`, counted only around the measured iterations via
callgrind's client requests): a figure that does not move with the machine's load, for
judging a change of a few percent that the noise of a shared machine hides in CPU time.
It needs valgrind and gcc (a 10-line helper library is compiled into a temp dir).
Before counting, what the setup and warm-up left is moved out of the collector's reach
(`gc.collect(); gc.freeze()`): the young generations are still collected as the requests
allocate, but a full collection scanning the whole long-lived heap (contract, config,
models) no longer lands, or not, inside the 2,000 counted requests. It did by chance:
the same code counted 108,846 or 117,221 instructions per pass-through request depending
on which other targets ran before (bench/RESULTS.md, "Issue 18: fewer objects").

    .venv/bin/python bench/hotpath.py [--rounds 7] [--number 20000] [--only passthrough,floor]
                                      [--json bench/results/hotpath.json] [--top 25]
    .venv/bin/python bench/hotpath.py --instructions [--number 2000] [--only full]
                                      [--keep-callgrind DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import callgrind  # noqa: E402  (bench/callgrind.py)
import floor_proxy  # noqa: E402  (bench/ modules, not a package)
import harness  # noqa: E402

from apishield.config import load_config  # noqa: E402
from apishield.gateway import Gateway, build_gateway  # noqa: E402
from apishield.http.server import HttpConnection  # noqa: E402
from apishield.http.upstream import UpstreamConnection  # noqa: E402

TARGETS = ("floor", "passthrough", "full")
BATCH = 64  # iterations between two turns of the event loop
PEER = ("127.0.0.1", 51234)
HOST_HEADER = b"127.0.0.1:8080"
UPSTREAM_BODY = harness.UPSTREAM_BODY.encode()


def upstream_response(body: bytes) -> bytes:
    """What the bench upstream (nginx 1 worker, `server_tokens off`, `return 200`) sends."""
    return (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 06 Dec 2026 12:00:00 GMT\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: keep-alive\r\n\r\n%b" % (len(body), body))


def request_bytes(method: bytes, extra: list[tuple[bytes, bytes]], body: bytes,
                  client_headers: bool) -> bytes:
    headers = [(b"Host", HOST_HEADER)]
    if client_headers:
        headers += [(b"User-Agent", b"curl/8.5.0"), (b"Accept", b"*/*")]
    headers += extra
    if body:
        headers.append((b"Content-Length", b"%d" % len(body)))
    head = b"".join(b"%b: %b\r\n" % pair for pair in headers)
    return b"%b /item HTTP/1.1\r\n%b\r\n%b" % (method, head, body)


class FakeTransport:
    """An `asyncio.Transport` that records writes (`out`) and nothing else: the protocols
    under test see a live, never-paused socket."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.out: list[bytes] = []
        self.write = self.out.append  # a C call, as cheap as a transport's write can be
        self._extra = {"peername": peer, "sockname": ("127.0.0.1", 8080), "peercert": None}
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        return None

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        raise AssertionError("reading paused: the measured path left the fast path")

    def resume_reading(self) -> None:
        return None

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


@dataclass
class Target:
    name: str
    step: Callable[[], None]  # one request, synchronously
    client: FakeTransport
    upstream: FakeTransport
    expect_body: bytes
    close: Callable[[], Any]


def build_floor(request: bytes, response: bytes) -> Target:
    proxy = floor_proxy.Proxy(0)
    up = floor_proxy.Upstream(proxy.pool)
    up_transport = FakeTransport(("127.0.0.1", 8082))
    up.connection_made(up_transport)  # type: ignore[arg-type]
    proxy.pool.append(up)
    client = floor_proxy.Client(proxy)
    transport = FakeTransport(PEER)
    client.connection_made(transport)  # type: ignore[arg-type]
    client_feed, up_feed = client.data_received, up.data_received

    def step() -> None:
        client_feed(request)
        up_feed(response)

    return Target("floor", step, transport, up_transport, UPSTREAM_BODY, lambda: None)


def write_files(d: Path, target: str, access_log: str) -> Path:
    """The contract and config of `target` in `d` (as bench/harness.py writes them)."""
    extra: dict[str, Any] = {}
    if target == "passthrough":
        contract = harness.passthrough_contract()
    else:  # bench/run --full's apishield_full, as it is
        contract = harness.full_contract()
        extra.update(harness.full_config(8083))  # admin listener configured, never started
    config_path, _ = harness.write_apishield_config(d, target, contract, 8080, 8082,
                                                    extra=extra)
    if access_log != "file":
        text = config_path.read_text().replace(str(d / "access.log"), access_log)
        config_path.write_text(text)
    return config_path


def mint_token(d: Path) -> str:
    """The RS256 key set beside the config and the token auth_jwt_hit sends."""
    argv = [sys.executable, str(BENCH_DIR / "auth_tokens.py"), "--dir", str(d),
            "--issuer", harness.AUTH_ISSUER, "--audience", harness.AUTH_AUDIENCE,
            "--count", "1", "--algorithms", "RS256"]
    subprocess.run(argv, check=True, capture_output=True, timeout=120)
    return (d / "token-hit.txt").read_text().strip()


async def build_gateway_target(name: str, d: Path, access_log: str,
                               client_headers: bool) -> Target:
    config_dir = d / name
    config_path = write_files(config_dir, name, access_log)
    if name == "full":
        token = mint_token(config_dir)
        request = request_bytes(
            b"POST",
            [(b"Content-Type", b"application/json"),
             (b"Authorization", b"Bearer " + token.encode())],
            harness.BODY_1K, client_headers)
    else:
        request = request_bytes(b"GET", [], b"", client_headers)
    cwd = os.getcwd()
    os.chdir(config_dir)  # relative paths in the config (contract, keys) as `serve` has them
    try:
        gateway: Gateway = build_gateway(load_config(str(config_path)))
    finally:
        os.chdir(cwd)
    gateway.start_pool()
    await gateway.pipeline.start()
    assert gateway.pool is not None
    up = UpstreamConnection(gateway.pool)
    up_transport = FakeTransport(("127.0.0.1", 8082))
    up.connection_made(up_transport)  # type: ignore[arg-type]
    gateway.pool.idle.append(up)
    conn = HttpConnection(gateway)
    transport = FakeTransport(PEER)
    conn.connection_made(transport)  # type: ignore[arg-type]
    response = upstream_response(UPSTREAM_BODY)
    client_feed, up_feed = conn.data_received, up.data_received

    def step() -> None:
        client_feed(request)
        up_feed(response)

    async def close() -> None:
        conn.connection_lost(None)
        gateway.pipeline.close()
        await gateway.close()

    expect = UPSTREAM_BODY
    if name == "full":
        expect = json.dumps(harness.FULL_FILTERED_BODY, separators=(",", ":")).encode()
    return Target(name, step, transport, up_transport, expect, close)


def check(target: Target) -> dict[str, Any]:
    """One request, synchronously: the upstream got one request, the client one 200 with
    the upstream's body (else the tool would measure something else than the fast path)."""
    target.client.out.clear()
    target.upstream.out.clear()
    target.step()
    sent = b"".join(target.upstream.out)
    got = b"".join(target.client.out)
    if len(target.upstream.out) != 1 or not sent.endswith(b"\r\n\r\n" + (
            harness.BODY_1K if target.name == "full" else b"")):
        raise SystemExit(f"{target.name}: the upstream did not get one whole request: "
                         f"{target.upstream.out!r}")
    head, _, body = got.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 ") or json.loads(body) != json.loads(
            target.expect_body):
        raise SystemExit(f"{target.name}: the client did not get the 200 and the upstream "
                         f"body synchronously (the fast path was not taken): {got[:600]!r}")
    target.client.out.clear()
    target.upstream.out.clear()
    return {"request_bytes": len(sent), "response_bytes": len(got),
            "response_head": head.decode("latin-1").split("\r\n")}


async def run_iterations(target: Target, number: int, turns: bool = True) -> float:
    """CPU seconds for `number` requests (the loop gets a turn every BATCH unless not
    `turns`: then the access log flushes on its size bound only, as under load)."""
    step = target.step
    client_out, up_out = target.client.out, target.upstream.out
    start = time.process_time()
    done = 0
    while done < number:
        n = min(BATCH, number - done)
        for _ in range(n):
            step()
        client_out.clear()
        up_out.clear()
        done += n
        if turns:
            await asyncio.sleep(0)
    return time.process_time() - start


async def profile(target: Target, number: int, top: int) -> dict[str, Any]:
    """Calls per request and the functions with the most own time, from cProfile."""
    profiler = cProfile.Profile()
    profiler.enable()
    await run_iterations(target, number)
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((tt, nc, ct, f"{_short(filename)}:{line}({func})"))
    rows.sort(reverse=True)
    total_calls = stats.total_calls  # type: ignore[attr-defined]
    return {
        "calls_per_request": round(total_calls / number, 1),
        "top": [{"function": name, "calls_per_request": round(nc / number, 2),
                 "tottime_us": round(tt / number * 1e6, 3),
                 "cumtime_us": round(ct / number * 1e6, 3)}
                for tt, nc, ct, name in rows[:top]],
    }


UNDER_VALGRIND = "HOTPATH_CALLGRIND_HELPER"


def run_under_callgrind(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run this tool again under callgrind and read instructions per request per target."""
    totals = callgrind.run_counting(__file__, argv, UNDER_VALGRIND, args.keep_callgrind)
    return {name: round(ir / args.number) for name, ir in totals.items()}


async def count_instructions(targets: dict[str, Target], number: int) -> None:
    """Inside callgrind: instrument only the measured iterations of each target. The
    event loop gets no turn inside: its timers (housekeeping each second, the access
    log's 100 ms flush) run by wall-clock time, ~50x more often per request under
    valgrind than at full speed, and would make the count vary from run to run."""
    lib = callgrind.counting_lib(UNDER_VALGRIND)
    for name, target in targets.items():
        await asyncio.sleep(0)
        lib.hp_start()
        await run_iterations(target, number, turns=False)
        lib.hp_stop(name.encode())


def _short(filename: str) -> str:
    for marker in ("/src/apishield/", "/bench/", "/site-packages/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename if filename != "~" else "<builtin>"


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    names = [t.strip() for t in args.only.split(",")] if args.only else list(TARGETS)
    for name in names:
        if name not in TARGETS:
            raise SystemExit(f"unknown target {name!r}; use {', '.join(TARGETS)}")
    if "floor" not in names:
        names.insert(0, "floor")  # the reference every ratio is taken to
    with tempfile.TemporaryDirectory(prefix="hotpath-") as tmp:
        d = Path(tmp)
        targets: dict[str, Target] = {}
        checks: dict[str, Any] = {}
        for name in names:
            if name == "floor":
                targets[name] = build_floor(request_bytes(b"GET", [], b"", args.client_headers),
                                            upstream_response(UPSTREAM_BODY))
            else:
                targets[name] = await build_gateway_target(name, d, args.access_log,
                                                           args.client_headers)
            checks[name] = check(targets[name])
        for target in targets.values():  # warm-up: what a server has after its first seconds
            await run_iterations(target, args.number // 4)
        if os.environ.get(UNDER_VALGRIND):
            gc.collect()
            gc.freeze()  # see the module docstring: no full collection by chance
            await count_instructions(targets, args.number)
            return {}
        samples: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.rounds):
            for name, target in targets.items():
                samples[name].append(await run_iterations(target, args.number)
                                     / args.number * 1e6)
        profiles = {name: await profile(target, args.profile_number, args.top)
                    for name, target in targets.items()}
        for name, target in targets.items():
            checks[name]["after"] = check(target)["response_bytes"]
            result = target.close()
            if asyncio.iscoroutine(result):
                await result
    floor = statistics.median(samples["floor"])
    out: dict[str, Any] = {
        "tool": "bench/hotpath.py",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "method": {"rounds": args.rounds, "number": args.number,
                   "profile_number": args.profile_number, "batch": BATCH,
                   "access_log": args.access_log, "client_headers": args.client_headers},
        "targets": {},
    }
    for name in names:
        us = samples[name]
        out["targets"][name] = {
            "cpu_us_per_request": round(statistics.median(us), 3),
            "cpu_us_min": round(min(us), 3),
            "cpu_us_max": round(max(us), 3),
            "ratio_to_floor": round(statistics.median(us) / floor, 2),
            "calls_per_request": profiles[name]["calls_per_request"],
            "check": checks[name],
            "profile_top": profiles[name]["top"],
        }
    return out


def render(result: dict[str, Any], top: int) -> str:
    lines = [f"bench/hotpath.py: CPU per request in memory, median of "
             f"{result['method']['rounds']} rounds x {result['method']['number']:,} requests "
             f"(python {result['python']})", ""]
    lines.append(f"{'target':<12} {'us/req':>8} {'min':>8} {'max':>8} {'x floor':>8} "
                 f"{'calls/req':>10}")
    for name, t in result["targets"].items():
        lines.append(f"{name:<12} {t['cpu_us_per_request']:8.2f} {t['cpu_us_min']:8.2f} "
                     f"{t['cpu_us_max']:8.2f} {t['ratio_to_floor']:8.2f} "
                     f"{t['calls_per_request']:10.1f}")
    lines.append("(nginx proxy_pass in situ: ~9.6 us CPU/request incl. kernel; Python in situ "
                 "costs ~3x its in-memory figure: compare ratios, not absolutes)")
    for name, t in result["targets"].items():
        if name == "floor":
            continue
        lines += ["", f"{name}: top {top} by own time (cProfile, us per request under the "
                      "profiler; calls per request)"]
        for row in t["profile_top"][:top]:
            lines.append(f"  {row['tottime_us']:7.2f} {row['cumtime_us']:8.2f} "
                         f"{row['calls_per_request']:6.2f}  {row['function']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--number", type=int, default=20_000, help="requests per round")
    ap.add_argument("--profile-number", type=int, default=3_000)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--only", help=f"comma-separated of {', '.join(TARGETS)} (floor always)")
    ap.add_argument("--access-log", default="file",
                    help="'file' (beside the config, as bench/run), '/dev/null' or '-'")
    ap.add_argument("--client-headers", action="store_true",
                    help="add User-Agent and Accept to the requests (wrk sends Host only)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--instructions", action="store_true",
                    help="instructions per request under callgrind instead of CPU time "
                         "(slow: use --number 2000)")
    ap.add_argument("--keep-callgrind", type=Path, metavar="DIR",
                    help="with --instructions: keep each target's callgrind output here "
                         "(DIR/callgrind.<target>), to read with callgrind_annotate")
    args = ap.parse_args()
    if os.environ.get(UNDER_VALGRIND):
        uvloop.run(main_async(args))
        return 0
    if args.instructions:
        argv = [a for a in sys.argv[1:] if a != "--instructions"]
        if args.keep_callgrind is not None:
            args.keep_callgrind = args.keep_callgrind.resolve()
        counted = run_under_callgrind(args, argv)
        floor = counted.get("floor")
        print(f"instructions per request (callgrind Ir, {args.number:,} requests each):")
        for name, ir in counted.items():
            ratio = f"  {ir / floor:6.2f} x floor" if floor else ""
            print(f"  {name:<12} {ir:>10,}{ratio}")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"instructions_per_request": counted,
                                             "number": args.number}, indent=2) + "\n")
        return 0
    result = uvloop.run(main_async(args))
    print(render(result, args.top))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
