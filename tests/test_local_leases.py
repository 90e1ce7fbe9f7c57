"""The supervisor's lease server (`state/local_leases.py`) beyond the shared counters
contract (tests/test_counters_contract.py runs that against it too): the Python port of
the Lua scripts on a controlled clock, the socket's permissions, accuracy across two
worker processes, a worker that dies holding leases, a worker that breaks the framing.

Everything talks to a real `LeaseServer` on a Unix socket (run in a thread with its own
event loop, so worker processes can be started beside it).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from apishield.state.counters import Decision, StoreUnavailable
from apishield.state.leases import QUOTA_LEASE, QUOTA_RELEASE, RATE_LEASE, RATE_RELEASE
from apishield.state.local_leases import LeaseBook, LeaseServer, LocalLeaseCounters

ROOT = Path(__file__).resolve().parent.parent


class Clock:
    """The book's clock, moved by the test (microseconds, like Redis's TIME)."""

    def __init__(self) -> None:
        self.now = 1_000_000_000

    def __call__(self) -> int:
        return self.now


@contextmanager
def lease_server() -> Iterator[tuple[LeaseServer, Path]]:
    """A real LeaseServer on a socket in a private temporary folder, served by a thread."""
    folder = tempfile.TemporaryDirectory(prefix="apishield-test-")
    path = Path(folder.name) / "leases.sock"
    loop = asyncio.new_event_loop()
    server = LeaseServer()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(path), loop).result(10)
    try:
        yield server, path
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        folder.cleanup()


async def take(counters: LocalLeaseCounters, key: str, interval: float,
               burst: int) -> Decision:
    while True:
        decision = counters.take(key, interval, burst, time.monotonic())
        if decision is not None:
            return decision
        await counters.prepare(key, interval, burst)


# ---------------------------------------------------------------- the port of the scripts
def test_rate_lease_grants_what_fits_and_says_when_more_will() -> None:
    clock = Clock()
    book = LeaseBook(clock)
    interval = 10_000.0  # us: 100 a second
    assert book.rate_lease("k", interval, 5, 3, 1) == [3, 30_000]
    assert book.rate_lease("k", interval, 5, 3, 1) == [2, 50_000]  # only 2 fit
    # full: refused, with the TAT ahead and when `least` = 2 tokens fit again
    assert book.rate_lease("k", interval, 5, 3, 2) == [0, 50_000, 20_000]
    clock.now += 20_000
    assert book.rate_lease("k", interval, 5, 3, 2) == [2, 50_000]


def test_rate_release_moves_the_tat_back_and_forgets_a_full_bucket() -> None:
    clock = Clock()
    book = LeaseBook(clock)
    book.rate_lease("k", 10_000.0, 5, 4, 1)
    assert book.rate_release("k", 20_000.0) == [1]
    assert book.rate_lease("k", 10_000.0, 5, 5, 1) == [3, 50_000]  # 2 given back + 1 left
    assert book.rate_release("k", 50_000.0) == [1]
    assert len(book) == 0  # TAT <= now: DEL, as the script does
    assert book.rate_release("absent", 1.0) == [0]


def test_rate_keys_expire_when_their_bucket_is_full_again() -> None:
    clock = Clock()
    book = LeaseBook(clock)
    book.rate_lease("k", 10_000.0, 5, 5, 1)  # TAT 50 ms ahead: PX 51 ms
    clock.now += 50_000
    assert book.sweep() == 0
    clock.now += 1_000
    assert book.sweep() == 1
    assert len(book) == 0


def test_quota_lease_is_capped_at_the_limit_and_released_tokens_come_back() -> None:
    clock = Clock()
    book = LeaseBook(clock, wall=lambda: 1_000.0)
    expire_ms = 1_060_000  # one minute after the book's wall clock
    assert book.quota_lease("q", 10, 4, expire_ms) == [4, 4]
    assert book.quota_lease("q", 10, 8, expire_ms) == [6, 10]
    assert book.quota_lease("q", 10, 1, expire_ms) == [0, 10]
    assert book.quota_release("q", 3) == [7]
    assert book.quota_release("q", 30) == [0]  # never below zero
    assert book.quota_release("absent", 3) == [0]
    clock.now += 60_000_000
    assert book.sweep() == 1  # expired at the PEXPIREAT time


def test_run_dispatches_the_operation_numbers_the_client_sends() -> None:
    book = LeaseBook(Clock(), wall=lambda: 0.0)
    assert book.run(RATE_LEASE, "r", ["10000.0", 5, 1, 1]) == [1, 10_000]
    assert book.run(RATE_RELEASE, "r", ["10000.0"]) == [1]
    assert book.run(QUOTA_LEASE, "q", [5, 2, 60_000]) == [2, 2]
    assert book.run(QUOTA_RELEASE, "q", [1]) == [1]
    with pytest.raises(Exception, match="unknown operation"):
        book.run(9, "x", [])


# ---------------------------------------------------------------- the server
def test_socket_is_private() -> None:
    with lease_server() as (_server, path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


async def test_a_client_breaking_the_framing_is_dropped_alone() -> None:
    with lease_server() as (server, path):
        counters = LocalLeaseCounters(path)
        try:
            key = f"frame|{uuid.uuid4().hex}"
            assert (await take(counters, key, 0.01, 5)).allowed
            with socket.socket(socket.AF_UNIX) as rogue:
                rogue.connect(str(path))
                rogue.sendall(b"\xff\xff\xff\xff garbage")
                rogue.settimeout(5)
                assert rogue.recv(100) == b""  # closed by the server
            with socket.socket(socket.AF_UNIX) as rogue:  # valid frame, wrong arguments
                rogue.connect(str(path))
                body = json.dumps([[RATE_LEASE, "k", ["x"]]]).encode()
                rogue.sendall(len(body).to_bytes(4, "big") + body)
                rogue.settimeout(5)
                answer = rogue.recv(1000)
                assert b"error" in answer
            for _ in range(4):  # the well-behaved client is served as before
                await take(counters, key, 0.01, 5)
            assert server.connections == 3
        finally:
            await counters.close()


async def test_no_server_fails_fast_with_store_unavailable(tmp_path: Path) -> None:
    counters = LocalLeaseCounters(tmp_path / "none.sock", down_for=0.2)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="FileNotFoundError"):
            await counters.prepare("k", 0.01, 5)
        with pytest.raises(StoreUnavailable):  # the circuit is open: no new attempt
            await counters.prepare("k", 0.01, 5)
        assert time.monotonic() - started < 1.0
        assert counters.round_trips == 1
        assert counters.outage.ongoing
    finally:
        await counters.close()


async def test_held_leases_bound_the_burst() -> None:
    """The bound of the module docstring with G = 2: tokens the workers hold when the
    bucket is full again come on top of the burst, nothing else does."""
    key, interval, burst = f"bound|{uuid.uuid4().hex}", 0.002, 100
    with lease_server() as (_server, path):
        workers = [LocalLeaseCounters(path, lease_fraction=0.1, lease_ttl=30.0)
                   for _ in range(2)]  # n = 10, L = 15
        try:
            for _ in range(30):
                for worker in workers:
                    assert (await take(worker, key, interval, burst)).allowed
            await asyncio.sleep(0.01)  # refills in flight land
            held = sum(worker._rate[key].tokens for worker in workers)
            assert 0 < held <= 2 * (10 + 5)
            await asyncio.sleep(burst * interval + 0.05)
            started, admitted = time.monotonic(), 0
            for worker in workers:
                while (await take(worker, key, interval, burst)).allowed:
                    admitted += 1
            regenerated = (time.monotonic() - started) / interval + 1
            assert burst <= admitted <= burst + held + regenerated, (admitted, held)
        finally:
            for worker in workers:
                await worker.close()


WORKER = """
import asyncio, json, os, sys, time
from apishield.state.local_leases import LocalLeaseCounters

path, key, start, seconds, interval, burst, die = sys.argv[1:8]
start, seconds, interval, burst = float(start), float(seconds), float(interval), int(burst)

async def main():
    counters = LocalLeaseCounters(path, lease_fraction=0.5 if die == "die" else 0.02,
                                  lease_ttl=30.0 if die == "die" else 1.0)
    admitted = 0
    async def one():
        while True:
            decision = counters.take(key, interval, burst, time.monotonic())
            if decision is not None:
                return decision
            await counters.prepare(key, interval, burst)
    if die == "die":  # lease, spend tokens, and die holding the rest (no close)
        for _ in range(4):  # slow start: leases of 1, 2, 4
            assert (await one()).allowed
        print(json.dumps({"held": counters._rate[key].tokens}), flush=True)
        os._exit(0)
    await asyncio.sleep(max(0.0, start - time.time()))
    async def task():
        nonlocal admitted
        while time.time() < start + seconds:
            decision = await one()  # not `admitted += await ...`: that reads it first
            admitted += decision.allowed
            await asyncio.sleep(0)
    await asyncio.gather(*(task() for _ in range(10)))
    await counters.close()
    print(json.dumps({"admitted": admitted}))

asyncio.run(main())
"""


def run_worker(path: Path, key: str, start: float, seconds: float, interval: float,
               burst: int, die: bool = False) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(path), key, repr(start), repr(seconds),
         repr(interval), str(burst), "die" if die else "live"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)


def test_two_worker_processes_share_one_limit() -> None:
    """Two processes, each with its own client, hammer one key through one server:
    together they admit what one exact limiter would, within the bound (2 * L tokens)
    plus a margin for clients that could not offer the rate on a loaded machine."""
    key, seconds, interval, burst = f"two|{uuid.uuid4().hex}", 2.0, 0.004, 250
    with lease_server() as (_server, path):
        start = time.time() + 1.5  # both are up and waiting by then
        processes = [run_worker(path, key, start, seconds, interval, burst) for _ in range(2)]
        results = []
        for process in processes:
            out, err = process.communicate(timeout=30)
            assert process.returncode == 0, err.decode()
            results.append(json.loads(out))
    admitted = sum(result["admitted"] for result in results)
    exact = burst + seconds / interval
    n = int(burst * 0.02)
    assert admitted <= exact + 2 * (n + n // 2) + 1, (admitted, exact)  # the proven bound
    assert admitted >= 0.9 * exact, (admitted, exact)  # under-admission: see the docstring
    assert all(result["admitted"] > 0.1 * exact for result in results), results


async def test_a_worker_dying_with_leases_does_not_hurt_the_server() -> None:
    """A worker leases half the burst and dies without giving it back: the server keeps
    serving the others, and the dead worker's tokens are back once their time passed
    (the TAT they reserved runs out; nothing waits for the dead connection)."""
    key, interval, burst = f"dead|{uuid.uuid4().hex}", 0.02, 10
    with lease_server() as (server, path):
        process = run_worker(path, key, 0.0, 0.0, interval, burst, die=True)
        out, err = await asyncio.to_thread(process.communicate, timeout=30)
        assert process.returncode == 0, err.decode()
        held = json.loads(out)["held"]
        assert held >= 1
        survivor = LocalLeaseCounters(path)
        try:
            admitted = 0
            while (await take(survivor, key, interval, burst)).allowed:
                admitted += 1
            assert admitted <= burst - held  # the dead worker's tokens are still reserved
            await asyncio.sleep(burst * interval + 0.05)  # their reservation has run out
            admitted = 0
            while (await take(survivor, key, interval, burst)).allowed:
                admitted += 1
            assert admitted >= burst
            assert server.connections == 2
        finally:
            await survivor.close()


def test_the_client_and_the_server_work_on_uvloop() -> None:
    """The workers and the supervisor run on uvloop, whose transports are not
    `asyncio.Transport` subclasses (an isinstance check there failed every lease)."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[bool]:
        with tempfile.TemporaryDirectory(prefix="apishield-test-") as folder:
            server = LeaseServer()
            await server.start(Path(folder) / "leases.sock")
            counters = LocalLeaseCounters(Path(folder) / "leases.sock")
            try:
                return [(await take(counters, "k", 0.01, 3)).allowed for _ in range(4)]
            finally:
                await counters.close()
                await server.close()

    assert uvloop.run(main()) == [True, True, True, False]
