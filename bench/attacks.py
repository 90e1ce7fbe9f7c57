"""The two non-reading-client attacks of issue 11, at full scale, against default settings.

    .venv/bin/python bench/attacks.py [--attack pin|filter|both] [--seconds 40] [--json OUT]

`pin`: 300 connections from 127.0.0.1, each pipelining 4 GETs of a 4 MiB streamed response
and never reading (before the fix: the whole upstream pool held until `timeouts.write`,
every other client 503 for 29 s, RSS 85 -> 278 MB). `filter`: 20 connections pipelining 8
GETs of a ~4 MiB JSON response that the gateway filters (before: RSS 86 -> 738 MB, still
open after 70 s). Meanwhile 4 normal clients on 127.0.0.2 send GET /echo back to back;
the run reports their success ratio and latency, the gateway's RSS each second, and how
long the attacker's connections stayed open. Everything runs on 127.0.0.1/127.0.0.2, for a
bounded time, and stops by itself.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import start_gateway  # noqa: E402 - after the path is set

ATTACKER, NORMAL = "127.0.0.1", "127.0.0.2"
ATTACKS = {
    "pin": (300, 4, b"GET /big?bytes=4194304 HTTP/1.1\r\nHost: a\r\n\r\n"),
    "filter": (20, 8, b"GET /users?n=31000 HTTP/1.1\r\nHost: a\r\n\r\n"),
}
UPSTREAM = (
    "import sys, time\n"
    "from tests.upstream_server import start_upstream\n"
    "server, _ = start_upstream()\n"
    "print(server.server_address[1], flush=True)\n"
    "time.sleep(3600)\n"
)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def established_from(port: int, address: str) -> int:
    """Gateway-side connections on `port` from `address` that are still ESTABLISHED."""
    remote = f"{int.from_bytes(socket.inet_aton(address), 'little'):08X}"
    count = 0
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        local, peer, state = fields[1], fields[2], fields[3]
        if int(local.split(":")[1], 16) == port and peer.split(":")[0] == remote:
            count += state == "01"
    return count


def attack(port: int, connections: int, pipelined: int, request: bytes) -> list[socket.socket]:
    sockets = []
    for _ in range(connections):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind((ATTACKER, 0))
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        try:
            sock.send(request * pipelined)
        except BlockingIOError:
            pass
        sockets.append(sock)
    return sockets


def normal_client(port: int, stop: threading.Event, results: list[tuple[bool, float]]) -> None:
    conn = None
    while not stop.is_set():
        started = time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5,
                                                  source_address=(NORMAL, 0))
            conn.request("GET", "/echo")
            response = conn.getresponse()
            response.read()
            ok = response.status == 200
        except (OSError, http.client.HTTPException):
            ok = False
            conn = None
        results.append((ok, time.perf_counter() - started))


def run(name: str, seconds: float, upstream_url: str) -> dict:
    connections, pipelined, request = ATTACKS[name]
    workdir = Path(tempfile.mkdtemp(prefix=f"attack-{name}-"))
    gateway = start_gateway(workdir, upstream_url)
    try:
        pid = gateway.process.pid
        time.sleep(0.5)
        baseline = rss_mib(pid)
        stop = threading.Event()
        results: list[tuple[bool, float]] = []
        clients = [threading.Thread(target=normal_client, args=(gateway.port, stop, results))
                   for _ in range(4)]
        for thread in clients:
            thread.start()
        started = time.monotonic()
        sockets = attack(gateway.port, connections, pipelined, request)
        samples = []
        cut_after = None
        while time.monotonic() - started < seconds:
            time.sleep(1.0)
            open_now = established_from(gateway.port, ATTACKER)
            elapsed = round(time.monotonic() - started, 1)
            samples.append({"t": elapsed, "rss_mib": round(rss_mib(pid), 1),
                            "attacker_connections": open_now})
            if open_now == 0 and cut_after is None:
                cut_after = elapsed
        stop.set()
        for thread in clients:
            thread.join()
        for sock in sockets:
            sock.close()
        latencies = sorted(latency for _, latency in results)
        ok = sum(1 for success, _ in results if success)
        return {
            "attack": name,
            "connections": connections,
            "pipelined": pipelined,
            "seconds": seconds,
            "normal_requests": len(results),
            "normal_failures": len(results) - ok,
            "normal_success_ratio": round(ok / len(results), 4) if results else None,
            "normal_p50_ms": round(statistics.median(latencies) * 1000, 2) if results else None,
            "normal_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2)
            if results else None,
            "normal_max_ms": round(latencies[-1] * 1000, 1) if results else None,
            "rss_baseline_mib": round(baseline, 1),
            "rss_peak_mib": max(sample["rss_mib"] for sample in samples),
            "rss_end_mib": samples[-1]["rss_mib"],
            "attacker_connections_cut_after_s": cut_after,
            "samples": samples,
        }
    finally:
        gateway.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attack", choices=["pin", "filter", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM], cwd=ROOT,
                                stdout=subprocess.PIPE, env={**os.environ})
    try:
        assert upstream.stdout is not None
        port = int(upstream.stdout.readline())
        names = ["pin", "filter"] if args.attack == "both" else [args.attack]
        results = [run(name, args.seconds, f"http://127.0.0.1:{port}") for name in names]
    finally:
        upstream.kill()
        upstream.wait()
    for result in results:
        summary = {key: value for key, value in result.items() if key != "samples"}
        print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
