#!/usr/bin/env python3
"""A bounded soak of the gateway: fixed-rate mixed traffic, RSS sampling, attack phases.

    python bench/soak.py                 # 3 minutes (default)
    python bench/soak.py --minutes 0.5   # a quick check

Starts, on 127.0.0.1, the test upstream (`tests/upstream_server.py`, in its own process)
and `apishield serve` in front of it with the test contract (`tests/data/contract.yaml`)
and the default limits and timeouts. A bounded asyncio client sends normal traffic at a
fixed rate the whole time (GETs, filtered JSON, POSTs with valid and invalid JSON, 404
probes, unauthenticated calls, an over-limit body: each kind has the status it must get),
while the phases run one after the other:

  baseline              normal traffic only
  slowloris             N connections sending one header byte a second
  slow_body             N connections trickling a body below `timeouts.min_body_rate`
  non_reading_stream    N connections pipelining GETs of a 4 MiB streamed response and
                        never reading
  non_reading_filtered  N connections pipelining GETs of a ~4 MB JSON response the gateway
                        filters, never reading
  recovery              normal traffic only again

The attackers connect from another loopback source address (127.0.0.2 by default, still
to 127.0.0.1): one abusive client next to normal ones. The gateway's RSS (VmRSS) and open
descriptors are sampled every 10 s and at each phase boundary. Per phase: the normal
traffic's success ratio (expected status / scheduled), its latency percentiles (from the
scheduled send time, so a stalled gateway cannot hide behind a waiting client), what the
attackers saw, the gateway's CPU. Writes bench/results/soak-<timestamp>.json and prints
a summary. Everything started is stopped at the end, on errors and on Ctrl-C; the whole
run is bounded by an alarm. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # bench/ is not a package: imported from beside this file
    HOST,
    REPO,
    RESULTS_DIR,
    BenchError,
    Processes,
    Service,
    apishield_argv,
    free_ports,
    log,
    proc_tree_cpu_seconds,
    run,
    wait_port,
)

DATA = REPO / "tests" / "data"
SAMPLE_EVERY = 10.0  # seconds between RSS samples
REQUEST_TIMEOUT = 10.0  # a normal request not answered within this is an error
SHUTDOWN_GRACE = 20.0  # SIGTERM to exit, before SIGKILL (the gateway's own budget: 10 s)
PHASES = ("baseline", "slowloris", "slow_body", "non_reading_stream", "non_reading_filtered",
          "recovery")
# share of the run each phase gets (the attacks equally, baseline and recovery a bit more)
PHASE_WEIGHTS = {"baseline": 0.2, "slowloris": 0.15, "slow_body": 0.15,
                 "non_reading_stream": 0.15, "non_reading_filtered": 0.15, "recovery": 0.2}
BIG_BYTES = 4 * 1024 * 1024
FILTERED_USERS = 30_000  # GET /users?n=30000: ~4 MB of JSON, filtered by the gateway
ATTACK_RCVBUF = 256 * 1024  # fixed receive buffer of a non-reading attacker's socket
PROBLEM_TYPE = re.compile(rb'"type":\s*"urn:apishield:problem:([a-z0-9-]+)"')
TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
              "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK",
              "0A": "LISTEN", "0B": "CLOSING"}


@dataclass(frozen=True)
class Kind:
    """One kind of normal request and the status it must get."""

    name: str
    weight: int
    expect: int
    method: str
    target: str
    body: bytes = b""
    content_type: str | None = None


KINDS = (
    Kind("get_item", 30, 200, "GET", "/echo/{n}"),
    Kind("get_filtered", 15, 200, "GET", "/users?n=5"),
    Kind("post_valid", 20, 200, "POST", "/echo", b'{"n": {n}, "name": "soak"}',
         "application/json"),
    Kind("post_invalid_json", 10, 400, "POST", "/echo", b'{"n": {n}, "name": ',
         "application/json"),
    Kind("probe_404", 10, 404, "GET", "/admin/{n}"),
    Kind("unauthenticated", 10, 401, "GET", "/cache-private"),
    Kind("body_over_limit", 5, 413, "POST", "/echo/small", b'{"n": {n}, "pad": "' + b"x" * 64
         + b'"}', "application/json"),
)


def phase_seconds(args: argparse.Namespace) -> dict[str, float]:
    weight = sum(PHASE_WEIGHTS[p] for p in args.phases)
    return {p: args.minutes * 60 * PHASE_WEIGHTS[p] / weight for p in args.phases}


def normal_sources(n: int) -> list[str]:
    """The source addresses of the normal clients (loopback: all reach 127.0.0.1)."""
    return [f"127.0.1.{i}" for i in range(1, n + 1)]


def build_request(kind: Kind, n: int) -> bytes:
    target = kind.target.replace("{n}", str(n))
    body = kind.body.replace(b"{n}", str(n).encode())
    head = f"{kind.method} {target} HTTP/1.1\r\nHost: soak.local\r\nAccept: */*\r\n"
    if kind.content_type:
        head += f"Content-Type: {kind.content_type}\r\n"
    if body or kind.method in ("POST", "PUT"):
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


# --------------------------------------------------------------------------- measurements


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99),
            "max": round(ordered[-1], 2)}


@dataclass
class NormalStats:
    scheduled: int = 0
    skipped: int = 0  # due while every client slot was busy: not sent, counted as failed
    ok: int = 0
    statuses: Counter = field(default_factory=Counter)
    unexpected: Counter = field(default_factory=Counter)  # "kind:status"
    errors: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)

    def report(self) -> dict:
        done = self.scheduled - self.skipped
        return {
            "scheduled": self.scheduled,
            "sent": done,
            "skipped_client_saturated": self.skipped,
            "ok": self.ok,
            "success_ratio": round(self.ok / self.scheduled, 5) if self.scheduled else None,
            "statuses": dict(sorted((str(k), v) for k, v in self.statuses.items())),
            "unexpected": dict(self.unexpected.most_common(20)),
            "errors": dict(self.errors.most_common(20)),
            "latency_ms": percentiles(self.latencies_ms),
        }


@dataclass
class AttackStats:
    connections_opened: int = 0
    connect_errors: int = 0
    cut_by_gateway: int = 0  # the gateway answered or closed while the attacker was mid-way
    answers: Counter = field(default_factory=Counter)
    seconds_to_cut: list[float] = field(default_factory=list)
    bytes_sent: int = 0
    requests_sent: int = 0

    def report(self) -> dict:
        cut = self.seconds_to_cut
        return {
            "connections_opened": self.connections_opened,
            "connect_errors": self.connect_errors,
            "cut_by_gateway": self.cut_by_gateway,
            "answers": dict(sorted((str(k), v) for k, v in self.answers.items())),
            "seconds_to_cut": ({"min": round(min(cut), 2),
                                "median": round(sorted(cut)[len(cut) // 2], 2),
                                "max": round(max(cut), 2)} if cut else None),
            "bytes_sent": self.bytes_sent,
            "requests_sent": self.requests_sent,
        }


def read_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM in KiB and the number of open descriptors of `pid` (0 if gone)."""
    out = {"rss_kb": 0, "hwm_kb": 0, "fds": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_kb"] = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                out["hwm_kb"] = int(line.split()[1])
    with contextlib.suppress(OSError):
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


# --------------------------------------------------------------------------- HTTP client


class Closed(Exception):
    """The connection ended before a complete response."""


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """One response: (status, the connection can be reused). Skips 1xx answers."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise Closed("closed before a response" if not exc.partial
                         else "closed in a response head") from None
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise Closed(f"bad status line {lines[0][:60]!r}")
        status = int(parts[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            if b":" in line:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip().lower()
        if 100 <= status < 200:
            continue
        keep = headers.get(b"connection") != b"close"
        try:
            if headers.get(b"transfer-encoding") == b"chunked":
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if size == 0:
                        while await reader.readuntil(b"\r\n") != b"\r\n":
                            pass
                        break
                    await reader.readexactly(size + 2)
            elif b"content-length" in headers:
                await reader.readexactly(int(headers[b"content-length"]))
            elif status not in (204, 304):
                await reader.read()  # delimited by the close
                keep = False
        except asyncio.IncompleteReadError:
            raise Closed("closed in a response body") from None
        return status, keep


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Client:
    """Normal traffic: keep-alive connections from each of `sources` (one pool each), at
    most `slots` requests in flight in all."""

    def __init__(self, port: int, sources: list[str], slots: int) -> None:
        self.port = port
        self.sources = sources
        self.slots = slots
        self.in_flight = 0
        self.idle: dict[str, list[Conn]] = {source: [] for source in sources}
        self.opened = 0
        self.retries = 0

    async def _connect(self, source: str) -> Conn:
        self.opened += 1
        return await asyncio.open_connection(HOST, self.port, local_addr=(source, 0))

    async def _once(self, payload: bytes, source: str, conn: Conn) -> int:
        reader, writer = conn
        writer.write(payload)
        await writer.drain()
        status, keep = await read_response(reader)
        if keep:
            self.idle[source].append(conn)
        else:
            writer.close()
        return status

    async def request(self, payload: bytes, source: str) -> int:
        """Send one request. A kept-alive connection that the gateway closed while it was
        idle (nothing at all came back) is retried once on a fresh connection, as any
        HTTP client does; `retries` counts them."""
        if self.idle[source]:
            conn = self.idle[source].pop()
            try:
                return await self._once(payload, source, conn)
            except (Closed, ConnectionError) as exc:
                conn[1].close()
                if isinstance(exc, Closed) and "before a response" not in str(exc):
                    raise
                self.retries += 1
        conn = await self._connect(source)
        try:
            return await self._once(payload, source, conn)
        except BaseException:
            conn[1].close()
            raise

    def close(self) -> None:
        for conns in self.idle.values():
            for _, writer in conns:
                writer.close()
            conns.clear()


async def normal_traffic(client: Client, rate: float, stop_at: float,
                         stats_for: Callable[[], NormalStats], seed: int) -> None:
    """Open loop: request i is due at start + i/rate whatever happened to the others."""
    rng = random.Random(seed)
    weights = [k.weight for k in KINDS]
    start = time.monotonic()
    tasks: set[asyncio.Task] = set()
    i = 0

    async def one(kind: Kind, payload: bytes, source: str, due: float,
                  stats: NormalStats) -> None:
        try:
            status = await asyncio.wait_for(client.request(payload, source), REQUEST_TIMEOUT)
        except TimeoutError:
            stats.errors[f"{kind.name}:timeout"] += 1
            return
        except (Closed, OSError) as exc:
            stats.errors[f"{kind.name}:{type(exc).__name__}:{str(exc)[:60]}"] += 1
            return
        finally:
            client.in_flight -= 1
        stats.latencies_ms.append((time.monotonic() - due) * 1000)
        stats.statuses[status] += 1
        if status == kind.expect:
            stats.ok += 1
        else:
            stats.unexpected[f"{kind.name}:{status}"] += 1

    while (now := time.monotonic()) < stop_at:
        while start + i / rate <= now:
            due = start + i / rate
            i += 1
            stats = stats_for()
            stats.scheduled += 1
            if client.in_flight >= client.slots:
                stats.skipped += 1
                continue
            kind = rng.choices(KINDS, weights)[0]
            client.in_flight += 1
            source = client.sources[i % len(client.sources)]
            task = asyncio.create_task(one(kind, build_request(kind, i), source, due, stats))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(0.005)
    if tasks:
        await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT + 1)


# --------------------------------------------------------------------------- attacks


async def open_attacker(port: int, source: str, stats: AttackStats,
                        rcvbuf: int | None = None) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
    except OSError:
        stats.connect_errors += 1
        sock.close()
        return None
    stats.connections_opened += 1
    return sock


async def _answer_or_close(sock: socket.socket, stats: AttackStats, opened: float,
                           wait: float) -> bool:
    """Wait up to `wait` s for the gateway to answer or close; True if it did."""
    loop = asyncio.get_running_loop()
    try:
        data = await asyncio.wait_for(loop.sock_recv(sock, 4096), wait)
    except TimeoutError:
        return False
    except OSError:
        data = b""
    stats.cut_by_gateway += 1
    stats.seconds_to_cut.append(time.monotonic() - opened)
    parts = data.split(b" ", 2)
    if len(parts) > 1 and parts[1].isdigit():
        slug = PROBLEM_TYPE.search(data)
        stats.answers[parts[1].decode() + (f" {slug.group(1).decode()}" if slug else "")] += 1
    else:
        stats.answers["closed"] += 1
    return True


async def slowloris(port: int, source: str, stop_at: float, stats: AttackStats) -> None:
    """One connection (reopened when cut): a request head, one more byte each second."""
    loop = asyncio.get_running_loop()
    while time.monotonic() < stop_at:
        sock = await open_attacker(port, source, stats)
        if sock is None:
            await asyncio.sleep(1)
            continue
        opened = time.monotonic()
        try:
            head = b"GET /echo HTTP/1.1\r\nHost: soak.local\r\nX-Slow: "
            await loop.sock_sendall(sock, head)
            stats.bytes_sent += len(head)
            stats.requests_sent += 1
            while time.monotonic() < stop_at:
                if await _answer_or_close(sock, stats, opened,
                                          min(1.0, max(0.0, stop_at - time.monotonic()))):
                    break
                await loop.sock_sendall(sock, b"a")
                stats.bytes_sent += 1
        except OSError:
            stats.cut_by_gateway += 1
            stats.seconds_to_cut.append(time.monotonic() - opened)
            stats.answers["reset"] += 1
        finally:
            sock.close()


async def slow_body(port: int, source: str, stop_at: float, stats: AttackStats,
                    streamed: bool) -> None:
    """One connection (reopened when cut): a 100 kB body sent 16 bytes a second, far
    below the default 256 B/s floor. `streamed`: PUT /echo with any body type (forwarded
    as it arrives); else POST /echo with JSON (buffered and validated)."""
    loop = asyncio.get_running_loop()
    if streamed:
        head = (b"PUT /echo HTTP/1.1\r\nHost: soak.local\r\nContent-Type: "
                b"application/octet-stream\r\nContent-Length: 100000\r\n\r\n")
    else:
        head = (b"POST /echo HTTP/1.1\r\nHost: soak.local\r\nContent-Type: application/json"
                b"\r\nContent-Length: 100000\r\n\r\n")
    while time.monotonic() < stop_at:
        sock = await open_attacker(port, source, stats)
        if sock is None:
            await asyncio.sleep(1)
            continue
        opened = time.monotonic()
        try:
            await loop.sock_sendall(sock, head)
            stats.bytes_sent += len(head)
            stats.requests_sent += 1
            while time.monotonic() < stop_at:
                if await _answer_or_close(sock, stats, opened,
                                          min(1.0, max(0.0, stop_at - time.monotonic()))):
                    break
                await loop.sock_sendall(sock, b"[" * 16)
                stats.bytes_sent += 16
        except OSError:
            stats.cut_by_gateway += 1
            stats.seconds_to_cut.append(time.monotonic() - opened)
            stats.answers["reset"] += 1
        finally:
            sock.close()


def tcp_states(local: set[tuple[str, int]]) -> dict:
    """The kernel's view of our sockets bound to `local` addresses (/proc/net/tcp): their
    TCP states (CLOSE_WAIT: the gateway closed; absent: reset by the gateway) and the
    bytes the gateway delivered that sit unread in their receive queues."""
    states: Counter = Counter()
    unread = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            ip_hex, port_hex = fields[1].split(":")
            address = (socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1]), int(port_hex, 16))
            if address in local:
                states[TCP_STATES.get(fields[3], fields[3])] += 1
                unread += int(fields[4].split(":")[1], 16)
    missing = len(local) - sum(states.values())
    return {**dict(states), "reset_or_gone": missing, "unread_bytes": unread}


async def non_reading(port: int, source: str, stop_at: float, stats: AttackStats,
                      target: bytes, pipeline: int, held: set[tuple[str, int]]) -> None:
    """One connection: `pipeline` GETs of `target` sent at once, then never a read.
    Its local address goes into `held` (for `tcp_states` before the phase ends)."""
    loop = asyncio.get_running_loop()
    sock = await open_attacker(port, source, stats, rcvbuf=ATTACK_RCVBUF)
    if sock is None:
        return
    held.add(sock.getsockname())
    try:
        payload = b"GET " + target + b" HTTP/1.1\r\nHost: soak.local\r\n\r\n"
        await loop.sock_sendall(sock, payload * pipeline)
        stats.bytes_sent += len(payload) * pipeline
        stats.requests_sent += pipeline
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
    except OSError:
        stats.answers["send-failed"] += 1
    finally:
        sock.close()


# --------------------------------------------------------------------------- processes


def serve_upstream(port: int) -> int:
    """`--serve-upstream PORT`: the test upstream in this process until SIGTERM.

    With a listen backlog of 1024 instead of socketserver's 5: a burst of new upstream
    connections (50 streamed slow bodies at once) otherwise overflows the accept queue,
    and the connections the kernel then resets are 502s that are the test server's, not
    the gateway's."""
    sys.path.insert(0, str(REPO))
    from functools import lru_cache

    from tests.upstream_server import UpstreamHandler, UpstreamServer, stop

    @lru_cache(maxsize=8)
    def users(n: int) -> bytes:
        return json.dumps([{"id": i, "name": f"user{i}", "password_hash": "$argon2id$secret",
                            "internal": {"shard": 7},
                            "profile": {"bio": "hi", "ssn": "123-45-6789"}}
                           for i in range(n)]).encode()

    class SoakHandler(UpstreamHandler):
        """The same answers; `/users` bodies made once per size (the test server builds
        them per request: ~4 MB of JSON under the GIL would make the upstream, not the
        gateway, the bottleneck of the filtered-response phase)."""

        def _route(self, path: str, query: dict, body: bytes) -> None:
            if path == "/users":
                self._send(200, users(int(query.get("n", ["3"])[0])))
            else:
                super()._route(path, query, body)

    class SoakUpstream(UpstreamServer):
        request_queue_size = 1024

    server = SoakUpstream((HOST, port))
    server.RequestHandlerClass = SoakHandler
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    print("ready", flush=True)
    while not stopping:
        time.sleep(0.2)
    stop(server)
    return 0


def write_config(d: Path, port: int, upstream_port: int) -> Path:
    for name in ("contract.yaml", "paths.yaml"):
        shutil.copy(DATA / name, d / name)
    config = (
        "contract: contract.yaml\n"
        f"listen: {{host: {HOST}, port: {port}}}\n"
        f"upstream: {{url: 'http://{HOST}:{upstream_port}'}}\n"
        f"access_log: {{path: '{d / 'access.log'}'}}\n"
    )
    path = d / "apishield.yaml"
    path.write_text(config)
    return path


def start_services(procs: Processes, tmp: Path, apishield_cmd: str | None
                   ) -> tuple[Service, Service]:
    up_port, gw_port = free_ports(2)
    python = REPO / ".venv" / "bin" / "python"
    python_argv = [str(python) if python.exists() else sys.executable]
    up_err = tmp / "upstream.stderr"
    with open(up_err, "wb") as err:
        proc = procs.start("upstream", [*python_argv, str(Path(__file__).resolve()),
                                        "--serve-upstream", str(up_port)],
                           subprocess.DEVNULL, err, cwd=REPO)
    upstream = Service("upstream", proc, up_port, up_err, None)
    wait_port(upstream, 15)
    config = write_config(tmp, gw_port, up_port)
    gw_err = tmp / "gateway.stderr"
    with open(gw_err, "wb") as err:
        proc = procs.start("apishield", [*apishield_argv(apishield_cmd), "serve", "--config",
                                         str(config), "--workers", "1"],  # one process
                           subprocess.DEVNULL, err, cwd=tmp)
    gateway = Service("apishield", proc, gw_port, gw_err, None)
    wait_port(gateway, 15)
    return upstream, gateway


def machine() -> dict:
    git, dirty = "unknown", []
    with contextlib.suppress(BenchError, FileNotFoundError):
        out = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], timeout=10)
        git = out.stdout.strip() if out.returncode == 0 else "no commit"
        out = run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"], timeout=10)
        dirty = [line[3:] for line in out.stdout.splitlines()] if out.returncode == 0 else []
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count()
    return {"nproc": cpus, "python": platform.python_version(), "kernel": platform.release(),
            "loadavg_at_start": os.getloadavg(), "git": git, "git_dirty_src": dirty}


# --------------------------------------------------------------------------- the soak


async def soak(args: argparse.Namespace, gateway: Service, upstream: Service) -> dict:
    phases = args.phases
    total = args.minutes * 60
    durations = phase_seconds(args)
    pid = gateway.proc.pid
    start = time.monotonic()
    phase_stats = {p: NormalStats() for p in phases}
    attack_stats = {p: AttackStats() for p in phases}
    current = {"phase": phases[0]}
    samples: list[dict] = []

    def sample(note: str = "") -> dict:
        entry = {"t_s": round(time.monotonic() - start, 1), "phase": current["phase"],
                 **read_status(pid)}
        if note:
            entry["at"] = note
        samples.append(entry)
        return entry

    async def sampler(stop_at: float) -> None:
        while (left := stop_at - time.monotonic()) > 0:
            await asyncio.sleep(min(SAMPLE_EVERY, left))
            if time.monotonic() < stop_at - 0.5:
                sample()

    client = Client(gateway.port, normal_sources(args.clients), args.client_slots)
    stop_all = start + total
    traffic = asyncio.create_task(normal_traffic(
        client, args.rate, stop_all, lambda: phase_stats[current["phase"]], args.seed))
    sampling = asyncio.create_task(sampler(stop_all))
    phases_out = []
    sample("start")
    for phase in phases:
        current["phase"] = phase
        phase_start = time.monotonic()
        phase_end = min(stop_all, phase_start + durations[phase])
        cpu_before = proc_tree_cpu_seconds(pid)
        upstream_cpu_before = proc_tree_cpu_seconds(upstream.proc.pid)
        begin = sample(f"{phase} start")
        stats = attack_stats[phase]
        ip = args.attacker_ip
        port = gateway.port
        held: set[tuple[str, int]] = set()
        attackers: list = []
        if phase == "slowloris":
            attackers = [slowloris(port, ip, phase_end, stats) for _ in range(args.slowloris)]
        elif phase == "slow_body":
            attackers = [slow_body(port, ip, phase_end, stats, streamed=i % 2 == 0)
                         for i in range(args.slow_body)]
        elif phase == "non_reading_stream":
            target = f"/big?bytes={BIG_BYTES}".encode()
            attackers = [non_reading(port, ip, phase_end, stats, target, args.stream_pipeline,
                                     held) for _ in range(args.non_reading)]
        elif phase == "non_reading_filtered":
            target = f"/users?n={FILTERED_USERS}".encode()
            attackers = [non_reading(port, ip, phase_end, stats, target,
                                     args.filtered_pipeline, held)
                         for _ in range(args.filtered_conns)]
        tasks = [asyncio.create_task(a) for a in attackers]
        sockets_at_end = None
        if held or attackers:
            await asyncio.sleep(max(0.0, phase_end - 0.3 - time.monotonic()))
            if held:
                sockets_at_end = tcp_states(held)
        if tasks:
            await asyncio.gather(*tasks)
        await asyncio.sleep(max(0.0, phase_end - time.monotonic()))
        end = sample(f"{phase} end")
        elapsed = time.monotonic() - phase_start
        cpu = proc_tree_cpu_seconds(pid) - cpu_before
        upstream_cpu = proc_tree_cpu_seconds(upstream.proc.pid) - upstream_cpu_before
        so_far = phase_stats[phase].report()  # its last requests may still be in flight
        entry = {"name": phase, "start_s": round(phase_start - start, 1),
                 "duration_s": round(elapsed, 1),
                 "normal": None,  # filled in once every request of the phase is done
                 "gateway_cpu_pct": round(100 * cpu / elapsed, 1) if elapsed else None,
                 "upstream_cpu_pct": round(100 * upstream_cpu / elapsed, 1) if elapsed else None,
                 "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
                 "rss_kb": {"start": begin["rss_kb"], "end": end["rss_kb"],
                            "max": max(s["rss_kb"] for s in samples
                                       if s["t_s"] >= begin["t_s"])},
                 "fds": {"start": begin["fds"], "end": end["fds"],
                         "max": max(s["fds"] for s in samples if s["t_s"] >= begin["t_s"])}}
        if phase not in ("baseline", "recovery"):
            entry["attack"] = stats.report()
        if sockets_at_end is not None:
            entry["attack"]["sockets_before_phase_end"] = sockets_at_end
        phases_out.append(entry)
        log(f"  {phase:<21} normal ok so far {so_far['ok']}/{so_far['scheduled']}"
            f"  rss {end['rss_kb'] // 1024} MiB  fds {end['fds']}")
    await traffic  # it waits for the requests still in flight (REQUEST_TIMEOUT at most)
    for entry in phases_out:
        entry["normal"] = phase_stats[entry["name"]].report()
    sampling.cancel()
    client.close()
    sample("end")
    return {"phases": phases_out, "rss_samples": samples,
            "client_connections_opened": client.opened, "client_retries": client.retries}


def summary_table(result: dict) -> str:
    rows = [f"apishield soak: {result['config']['rate']:g} req/s for "
            f"{result['config']['minutes']:g} min ({result['command']})",
            f"{'phase':<21} {'dur s':>6} {'sched':>6} {'ok %':>8} {'p50 ms':>8} {'p99 ms':>8}"
            f" {'max ms':>8} {'rss MiB':>8} {'fds':>5} {'gw cpu%':>7} {'up cpu%':>7}  attack"]
    for p in result["phases"]:
        n = p["normal"]
        lat = n["latency_ms"]
        ratio = f"{100 * n['success_ratio']:.2f}" if n["success_ratio"] is not None else "-"
        attack = ""
        if "attack" in p:
            a = p["attack"]
            attack = (f"{a['connections_opened']} conns, {a['cut_by_gateway']} cut "
                      f"{a['answers']}")
        rows.append(f"{p['name']:<21} {p['duration_s']:>6} {n['scheduled']:>6} {ratio:>8} "
                    f"{lat['p50']!s:>8} {lat['p99']!s:>8} {lat['max']!s:>8} "
                    f"{p['rss_kb']['max'] / 1024:>8.1f} {p['fds']['max']:>5} "
                    f"{p['gateway_cpu_pct']!s:>7} {p['upstream_cpu_pct']!s:>7}  {attack}")
        if n["unexpected"] or n["errors"] or n["skipped_client_saturated"]:
            rows.append(f"{'':<21} skipped (all client slots busy) "
                        f"{n['skipped_client_saturated']}, unexpected {n['unexpected']}, "
                        f"errors {n['errors']}")
    rows.append("(ok %: expected status / scheduled; latency from the scheduled send time; "
                "rss and fds: the gateway's maximum in the phase)")
    rss = result["rss_kb"]
    rows.append(f"gateway RSS: start {rss['start'] / 1024:.1f} MiB, max {rss['max'] / 1024:.1f} "
                f"MiB, end {rss['end'] / 1024:.1f} MiB (peak VmHWM {rss['hwm'] / 1024:.1f} MiB)")
    rows.append(f"errors: {result['errors'] or 'none'}")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench/soak.py",
        description="Bounded soak of apishield on 127.0.0.1: fixed-rate mixed traffic, RSS "
                    "samples, slowloris / slow-body / non-reading-client phases.")
    ap.add_argument("--minutes", type=float, default=3.0, help="whole run (default 3)")
    ap.add_argument("--rate", type=float, default=500.0, help="normal requests/s (default 500)")
    ap.add_argument("--client-slots", type=int, default=256,
                    help="normal requests in flight at most (default 256); a request due "
                         "while all are busy is skipped and counted as failed")
    ap.add_argument("--slowloris", type=int, default=200, help="slowloris connections")
    ap.add_argument("--slow-body", type=int, default=100, help="slow-body connections")
    ap.add_argument("--non-reading", type=int, default=300,
                    help="non-reading connections on the 4 MiB stream (default 300)")
    ap.add_argument("--stream-pipeline", type=int, default=4,
                    help="GETs each of them pipelines (default 4)")
    ap.add_argument("--filtered-conns", type=int, default=20,
                    help="non-reading connections on the filtered ~4 MB JSON (default 20)")
    ap.add_argument("--filtered-pipeline", type=int, default=8,
                    help="GETs each of them pipelines (default 8)")
    ap.add_argument("--clients", type=int, default=16,
                    help="normal clients: distinct source addresses 127.0.1.1, 127.0.1.2, "
                         "... the normal traffic is spread over (default 16)")
    ap.add_argument("--attacker-ip", default="127.0.0.2",
                    help="source address of the attackers (default 127.0.0.2; a loopback "
                         "address: everything still goes to 127.0.0.1)")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"comma list, run in this order (default {','.join(PHASES)}); the "
                         "run's time is shared in the same proportions")
    ap.add_argument("--seed", type=int, default=1, help="request mix seed")
    ap.add_argument("--apishield-cmd", help="command to run apishield (default: "
                    "<repo>/.venv/bin/apishield, else apishield on PATH)")
    ap.add_argument("--output", help="result file (default bench/results/soak-<timestamp>.json)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (config, logs)")
    ap.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_upstream is not None:
        return serve_upstream(args.serve_upstream)
    if args.minutes <= 0 or args.rate <= 0:
        ap.error("--minutes and --rate must be > 0")
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in args.phases if p not in PHASES]
    if unknown or not args.phases:
        ap.error(f"--phases: unknown {unknown}; choose from {', '.join(PHASES)}")
    if not 1 <= args.clients <= 254:
        ap.error("--clients must be between 1 and 254")
    if not args.attacker_ip.startswith("127.") or args.attacker_ip.startswith("127.0.1."):
        ap.error(f"{args.attacker_ip}: a loopback address outside 127.0.1.0/24 (the normal "
                 "clients' range)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.client_slots + args.slowloris + args.slow_body + args.non_reading \
        + args.filtered_conns + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))

    limit = int(args.minutes * 60 + 120)

    def on_alarm(signum, frame):
        raise BenchError(f"the soak exceeded its {limit} s bound")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(limit)
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="apishield-soak-"))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    try:
        log(f"temp dir: {tmp}")
        upstream, gateway = start_services(procs, tmp, args.apishield_cmd)
        log(f"soak: {args.rate:g} req/s for {args.minutes:g} min; phases "
            + ", ".join(f"{p} {s:.0f}s" for p, s in phase_seconds(args).items()))
        try:
            import uvloop  # the gateway's own loop, if this python has it

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        measured = runner(soak(args, gateway, upstream))
        errors = []
        alive = gateway.alive()
        if not alive:
            errors.append(f"the gateway exited with {gateway.proc.returncode}")
        if not upstream.alive():
            errors.append(f"the upstream exited with {upstream.proc.returncode}")
        final = read_status(gateway.proc.pid) if alive else {"hwm_kb": 0}
        shutdown = None
        if alive:  # SIGTERM: in-flight requests get timeouts.shutdown (10 s) to finish
            stop_start = time.monotonic()
            Processes.stop("apishield", gateway.proc, grace=SHUTDOWN_GRACE)
            shutdown = {"seconds": round(time.monotonic() - stop_start, 2),
                        "exit_code": gateway.proc.returncode,
                        "killed": gateway.proc.returncode == -signal.SIGKILL}
            if shutdown["killed"]:
                errors.append(f"the gateway did not exit within {SHUTDOWN_GRACE:g} s of "
                              "SIGTERM")
        stderr = gateway.stderr_path.read_text(errors="replace")
        tracebacks = stderr.count("Traceback")
        if tracebacks:
            errors.append(f"{tracebacks} tracebacks in the gateway's stderr")
        for p in measured["phases"]:
            if p["normal"]["errors"]:
                errors.append(f"{p['name']}: {sum(p['normal']['errors'].values())} normal "
                              f"requests failed without a status")
        rss = [s["rss_kb"] for s in measured["rss_samples"] if s["rss_kb"]]
        result = {
            "command": "python bench/soak.py " + " ".join(argv if argv is not None
                                                          else sys.argv[1:]),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "config": {
                "minutes": args.minutes, "rate": args.rate, "client_slots": args.client_slots,
                "request_timeout_s": REQUEST_TIMEOUT,
                "mix": [{"kind": k.name, "weight": k.weight, "request": f"{k.method} "
                         f"{k.target}", "expect": k.expect} for k in KINDS],
                "phases_s": {p: round(s, 1) for p, s in phase_seconds(args).items()},
                "attacks": {
                    "slowloris": {"connections": args.slowloris,
                                  "how": "request head, then one header byte per second; "
                                         "reconnects when cut"},
                    "slow_body": {"connections": args.slow_body,
                                  "how": "Content-Length 100000, 16 bytes per second; half "
                                         "PUT /echo octet-stream (streamed), half POST /echo "
                                         "JSON; reconnects when cut"},
                    "non_reading_stream": {"connections": args.non_reading,
                                           "pipelined": args.stream_pipeline,
                                           "request": f"GET /big?bytes={BIG_BYTES}",
                                           "client_rcvbuf": ATTACK_RCVBUF},
                    "non_reading_filtered": {"connections": args.filtered_conns,
                                             "pipelined": args.filtered_pipeline,
                                             "request": f"GET /users?n={FILTERED_USERS}",
                                             "client_rcvbuf": ATTACK_RCVBUF},
                },
                "normal_client_ips": normal_sources(args.clients),
                "attacker_ip": args.attacker_ip,
                "gateway": "apishield serve, test contract (tests/data/contract.yaml), "
                           "default limits and timeouts",
                "upstream": "tests/upstream_server.py (ThreadingHTTPServer) in its own process",
                "rss_sample_every_s": SAMPLE_EVERY,
            },
            "phases": measured["phases"],
            "rss_kb": {"start": rss[0] if rss else None, "max": max(rss, default=None),
                       "end": rss[-1] if rss else None, "hwm": final["hwm_kb"]},
            "rss_samples": measured["rss_samples"],
            "client_connections_opened": measured["client_connections_opened"],
            "client_stale_connection_retries": measured["client_retries"],
            "gateway_alive_at_end": alive,
            "gateway_shutdown": shutdown,
            "errors": errors,
            "machine": machine(),
        }
        out = Path(args.output) if args.output else RESULTS_DIR / f"soak-{stamp}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(summary_table(result), end="")
        log(f"wrote {out}")
        return 0 if alive else 3
    except BenchError as exc:
        log(f"\nsoak FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        log("\ninterrupted; stopping everything")
        return 130
    finally:
        signal.alarm(0)
        procs.stop_all()
        if args.keep_tmp:
            log(f"kept temp dir {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
