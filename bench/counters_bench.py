#!/usr/bin/env python3
"""What a rate-limit decision costs: `MemoryCounters.take` vs `RedisCounters.take`
(issue 5, D6). Stdlib timing; a real redis-server (tests/redis_server.py) on 127.0.0.1.

Measured in `--repeat` alternating rounds (figures: medians over rounds; ratios: medians
of the per-round ratios, since the machine's speed drifts within a session):
- memory: `MemoryCounters.take` on a key that always admits;
- lease hit: `RedisCounters.take` spending a lease already held (no I/O at all);
- refused (cached): `RedisCounters.take` on a key Redis refused, before its retry time;
- amortized: the step's loop (`take`, and `await prepare` when it answers None) on one
  hot key, everything included: leases of n = burst * lease_fraction tokens, refills run
  ahead in the background, pipelines, redis-py. Client CPU (`time.process_time`, so the
  redis-server process is not counted) per decision, for several lease sizes n. The
  driver yields to the event loop every 8 decisions, as a gateway serving many
  connections does; memory runs under the same driver for the ratio;
- many keys: 64 concurrent tasks, each on its own key with leases of 1 (per-IP limits
  with small bursts, many clients): every decision needs Redis, but the calls of one
  event-loop tick share one pipeline;
- naive: one EVALSHA round trip per decision (what leases avoid), for reference;
- local: the same loops and round trips against the lease server the supervisor of
  `serve --workers N` runs (`state/local_leases.py`), in its own process on a Unix
  socket as in production, plus the wall-clock time of one round trip (what a request
  that must wait for a lease waits), for Redis and for it.

    .venv/bin/python bench/counters_bench.py [--repeat 5] [--number 200000] [--url redis://...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.redis_server

from apishield.state.counters import MemoryCounters
from apishield.state.leases import LeaseCounters
from apishield.state.local_leases import LocalLeaseCounters
from apishield.state.redis_counters import RedisCounters
from tests.redis_server import running_redis

INTERVAL = 1e-7  # 10M/s: the bench key never runs out, so every decision admits
YIELD_EVERY = 8


def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


async def memory_take(number: int) -> float:
    counters = MemoryCounters()
    take = counters.take
    start = time.perf_counter()
    for _ in range(number):
        take("203.0.113.7", INTERVAL, 10**9, 1.0)
    return (time.perf_counter() - start) / number


async def lease_hit(url: str, number: int) -> float:
    """Grow a lease past `number` tokens (slow start), then time spending it."""
    counters = RedisCounters(url, lease_fraction=0.5, lease_ttl=30.0)
    key, burst = "lease-hit", 8 * number
    try:
        while True:
            decision = counters.take(key, INTERVAL, burst, 0.0)
            if decision is None:
                await counters.prepare(key, INTERVAL, burst)
            elif counters._rate[key].tokens >= number:
                break
        take = counters.take
        start = time.perf_counter()
        for _ in range(number):
            take(key, INTERVAL, burst, 0.0)
        elapsed = time.perf_counter() - start
    finally:
        await counters.close()
    return elapsed / number


async def refused_cached(url: str, number: int) -> float:
    counters = RedisCounters(url)
    key = "refused"
    try:
        while True:
            decision = counters.take(key, 60.0, 1, 0.0)
            if decision is None:
                await counters.prepare(key, 60.0, 1)
            elif not decision.allowed:
                break
        take = counters.take
        start = time.perf_counter()
        for _ in range(number):
            take(key, 60.0, 1, 0.0)
        elapsed = time.perf_counter() - start
    finally:
        await counters.close()
    return elapsed / number


async def amortized(counters: MemoryCounters | LeaseCounters, key: str, burst: int,
                    number: int) -> tuple[float, int]:
    """Client CPU per decision of the step's loop; and how many were admitted."""
    take, prepare = counters.take, counters.prepare
    admitted = 0
    start = time.process_time()
    for index in range(number):
        decision = take(key, INTERVAL, burst, 0.0)
        while decision is None:
            await prepare(key, INTERVAL, burst)
            decision = take(key, INTERVAL, burst, 0.0)
        admitted += decision.allowed
        if index % YIELD_EVERY == 0:
            await asyncio.sleep(0)
    return (time.process_time() - start) / number, admitted


async def many_keys(url: str, number: int, tasks: int = 64) -> float:
    """Client CPU per decision when every decision needs a lease (n = 1) on its own key,
    from `tasks` concurrent tasks: their calls are pipelined together."""
    counters = RedisCounters(url)
    stamp = time.time()

    async def client(index: int) -> None:
        key = f"ip-{index}-{stamp}"
        for _ in range(number // tasks):
            decision = counters.take(key, INTERVAL, 10, 0.0)
            while decision is None:
                await counters.prepare(key, INTERVAL, 10)
                decision = counters.take(key, INTERVAL, 10, 0.0)
            await asyncio.sleep(0)

    try:
        await counters.prepare("warm-up", 1.0, 10)
        start = time.process_time()
        await asyncio.gather(*(client(index) for index in range(tasks)))
        return (time.process_time() - start) / (number // tasks * tasks)
    finally:
        await counters.close()


async def naive(url: str, number: int) -> float:
    """One EVALSHA per decision: the design leases avoid."""
    counters = RedisCounters(url)
    try:
        await counters.prepare("naive-warm-up", 1.0, 10)  # scripts loaded
        start = time.process_time()
        for _ in range(number):
            await counters._pipeline([(0, "apishield:rl:naive", (repr(INTERVAL * 1e6),
                                                                  10**6, 1, 1))])
        return (time.process_time() - start) / number
    finally:
        await counters.close()


async def local_naive(path: str, number: int) -> float:
    """One lease round trip per decision to the supervisor's lease server."""
    counters = LocalLeaseCounters(path)
    try:
        await counters.prepare("naive-warm-up", 1.0, 10)
        start = time.process_time()
        for _ in range(number):
            await counters._execute([(0, "naive", (repr(INTERVAL * 1e6), 10**6, 1, 1))])
        return (time.process_time() - start) / number
    finally:
        await counters.close()


async def round_trip(counters: LeaseCounters, number: int) -> float:
    """Wall-clock seconds of one lease round trip (what a waiting request waits)."""
    try:
        await counters.prepare("rtt-warm-up", 1.0, 10)
        start = time.perf_counter()
        for _ in range(number):
            await counters._execute([(0, "rtt", (repr(INTERVAL * 1e6), 10**6, 1, 1))])
        return (time.perf_counter() - start) / number
    finally:
        await counters.close()


async def local_many_keys(path: str, number: int, tasks: int = 64) -> float:
    counters = LocalLeaseCounters(path)
    stamp = time.time()

    async def client(index: int) -> None:
        key = f"ip-{index}-{stamp}"
        for _ in range(number // tasks):
            decision = counters.take(key, INTERVAL, 10, 0.0)
            while decision is None:
                await counters.prepare(key, INTERVAL, 10)
                decision = counters.take(key, INTERVAL, 10, 0.0)
            await asyncio.sleep(0)

    try:
        await counters.prepare("warm-up", 1.0, 10)
        start = time.process_time()
        await asyncio.gather(*(client(index) for index in range(tasks)))
        return (time.process_time() - start) / (number // tasks * tasks)
    finally:
        await counters.close()


LEASE_SERVER = """
import asyncio, sys
from pathlib import Path
from apishield.state.local_leases import LeaseServer

async def main():
    server = LeaseServer()
    await server.start(Path(sys.argv[1]))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.close()

asyncio.run(main())
"""


@contextlib.contextmanager
def running_lease_server(folder: Path) -> Iterator[str]:
    """The supervisor's lease server in a process of its own (its CPU is not the
    client's, as in production); stops when its stdin closes."""
    path = str(folder / "leases.sock")
    process = subprocess.Popen([sys.executable, "-c", LEASE_SERVER, path],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        yield path
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--number", type=int, default=200_000)
    parser.add_argument("--url", help="an existing Redis (default: start redis-server)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="apishield-bench-") as workdir, \
            running_lease_server(Path(workdir)) as local:
        if args.url:
            report(args.url, local, args.repeat, args.number)
            return
        with running_redis(Path(workdir)) as server:
            report(server.url, local, args.repeat, args.number)


BURSTS = (10, 100, 1000, 10_000, 100_000)


def report(url: str, local: str, repeat: int, number: int) -> None:
    """Every measurement once per round, rounds alternating (the machine's speed drifts
    within a session); each figure is the median over rounds, each ratio the median of
    the per-round ratios."""
    trips: dict[int, list[int]] = {burst: [] for burst in BURSTS}
    local_trips: dict[int, list[int]] = {burst: [] for burst in BURSTS}

    async def memory_loop() -> float:
        return (await amortized(MemoryCounters(), "k", 10**9, number))[0]

    async def redis_loop(burst: int) -> float:
        counters = RedisCounters(url)
        try:
            cost, _ = await amortized(counters, f"hot-{burst}-{time.time()}", burst,
                                      number // 20 if burst < 1000 else number)
            trips[burst].append(counters.round_trips)
            return cost
        finally:
            await counters.close()

    async def local_loop(burst: int) -> float:
        counters = LocalLeaseCounters(local)
        try:
            cost, _ = await amortized(counters, f"hot-{burst}-{time.time()}", burst,
                                      number // 20 if burst < 1000 else number)
            local_trips[burst].append(counters.round_trips)
            return cost
        finally:
            await counters.close()

    measures: dict[str, Callable[[], Awaitable[float]]] = {
        "memory": lambda: memory_take(number),
        "hit": lambda: lease_hit(url, number),
        "refused": lambda: refused_cached(url, number),
        "loop memory": memory_loop,
        **{f"loop {burst}": (lambda burst=burst: redis_loop(burst)) for burst in BURSTS},
        "many keys": lambda: many_keys(url, max(6400, number // 10)),
        "naive": lambda: naive(url, max(2000, number // 50)),
        **{f"local loop {burst}": (lambda burst=burst: local_loop(burst)) for burst in BURSTS},
        "local many keys": lambda: local_many_keys(local, max(6400, number // 10)),
        "local naive": lambda: local_naive(local, max(2000, number // 50)),
        "rtt redis": lambda: round_trip(RedisCounters(url), max(2000, number // 50)),
        "rtt local": lambda: round_trip(LocalLeaseCounters(local), max(2000, number // 50)),
    }
    rounds: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeat):
        for name, measure in measures.items():
            rounds[name].append(asyncio.run(measure()))

    def line(label: str, name: str, base: str) -> str:
        ratios = [a / b for a, b in zip(rounds[name], rounds[base], strict=True)]
        return (f"{label:44} {median_us(rounds[name]):12.3f} "
                f"{statistics.median(ratios):10.2f}")

    print(f"{'operation':44} {'us/decision':>12} {'vs memory':>10}")
    print(line("MemoryCounters.take", "memory", "memory"))
    print(line("RedisCounters.take, lease hit", "hit", "memory"))
    print(line("RedisCounters.take, refused from cache", "refused", "memory"))
    print(f"\namortized, step loop, client CPU (process_time), yield every {YIELD_EVERY}:")
    print(line("MemoryCounters", "loop memory", "loop memory"))
    for burst in BURSTS:
        n = max(1, int(burst * 0.02))
        print(line(f"RedisCounters, burst {burst} (lease n={n})", f"loop {burst}",
                   "loop memory")
              + f"   round trips/run {statistics.median(trips[burst]):.0f}")
    print("\n" + line("64 keys at once, leases of 1, pipelined", "many keys", "loop memory"))
    print(line("naive: one EVALSHA round trip per decision", "naive", "loop memory"))
    print("\nthe supervisor's lease server (serve --workers N), same loops:")
    for burst in BURSTS:
        n = max(1, int(burst * 0.02))
        print(line(f"LocalLeaseCounters, burst {burst} (lease n={n})", f"local loop {burst}",
                   "loop memory")
              + f"   round trips/run {statistics.median(local_trips[burst]):.0f}")
    print(line("64 keys at once, leases of 1, batched", "local many keys", "loop memory"))
    print(line("naive: one lease round trip per decision", "local naive", "loop memory"))
    print(f"\nwall-clock per round trip (us): redis {median_us(rounds['rtt redis']):.1f}, "
          f"lease server {median_us(rounds['rtt local']):.1f}")


if __name__ == "__main__":
    main()
