"""`RedisCounters` beyond the shared contract: accuracy under load from one and from two
gateway processes, store outages and recovery, what lands in Redis, lease bookkeeping.

Everything runs against a real redis-server (tests/redis_server.py), never a fake.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from apishield.state.counters import Decision, StoreUnavailable
from apishield.state.redis_counters import RedisCounters
from tests.redis_server import RedisServer, running_redis

ROOT = Path(__file__).resolve().parent.parent

# The load: more than the limit, from many concurrent tasks per process (so leases,
# single flight, refill-ahead and cached refusals all take part), for a bounded time.
INTERVAL = 0.001  # 1,000 requests a second
BURST = 1000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(Path(tmp_path_factory.mktemp("redis"))) as running:
        yield running


@pytest.fixture
async def counters(server: RedisServer) -> AsyncIterator[RedisCounters]:
    backend = RedisCounters(server.url)
    try:
        yield backend
    finally:
        await backend.close()


async def take(counters: RedisCounters, key: str, interval: float, burst: int) -> Decision:
    while True:
        decision = counters.take(key, interval, burst, time.monotonic())
        if decision is not None:
            return decision
        await counters.prepare(key, interval, burst)


async def hammer(counters: RedisCounters, key: str, until: float, tasks: int = 20,
                 interval: float = INTERVAL, burst: int = BURST) -> tuple[int, float]:
    """Requests as fast as `tasks` coroutines can send them until `until` (epoch s);
    returns how many were admitted, and when the last decision came (epoch s). The
    window the limit is judged over ends then, not at `until`: a lease round trip still
    in flight at `until` (tens of ms on a loaded machine) would otherwise count as tokens
    the limiter refused."""
    admitted = 0
    last = time.time()

    async def worker() -> None:
        nonlocal admitted, last
        while time.time() < until:
            decision = await take(counters, key, interval, burst)
            admitted += decision.allowed
            last = max(last, time.time())
            await asyncio.sleep(0)

    await asyncio.gather(*(worker() for _ in range(tasks)))
    return admitted, last


def allowed_over(seconds: float) -> float:
    """What an exact GCRA admits from a fresh key hammered for `seconds`."""
    return BURST + seconds / INTERVAL


async def test_one_process_admits_within_1_percent(counters: RedisCounters) -> None:
    key = f"one|{uuid.uuid4().hex}"
    start = time.time()
    admitted, last = await hammer(counters, key, start + 2.0)
    expected = allowed_over(last - start)
    assert abs(admitted - expected) <= 0.01 * expected, (admitted, expected)
    # the point of leases: far fewer round trips than admitted requests
    assert counters.round_trips < admitted / 5, (counters.round_trips, admitted)


GATEWAY = """
import asyncio, json, sys, time
from apishield.state.redis_counters import RedisCounters
from tests.test_redis_counters import hammer

async def main(url, key, seconds, interval, burst):
    counters = RedisCounters(url)
    print("ready", flush=True)  # imports done; the start time comes on stdin
    start = float(sys.stdin.readline())
    await asyncio.sleep(max(0.0, start - time.time()))
    admitted, last = await hammer(counters, key, start + seconds, interval=interval,
                                  burst=burst)
    print(json.dumps({"admitted": admitted, "last": last,
                      "round_trips": counters.round_trips}))
    await counters.close()

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]),
                 int(sys.argv[5])))
"""
# The two-process test's limit: 250/s with a burst of 250. Lower than the one-process
# test's so that two client processes sharing two cores with the rest of the suite still
# offer far more than the rate (at 1,000/s a CI run admitted 9% under: the clients, not
# the limiter, fell short). The documented bounds stay well inside 5%: n = 5 tokens per
# lease, L = 7, so held leases move the total by at most 2 * 7 = 14 of 1,000.
TWO_INTERVAL, TWO_BURST = 0.004, 250


def test_two_processes_admit_within_5_percent(server: RedisServer) -> None:
    """Two gateway processes, each with its own RedisCounters, share one key in one Redis
    and are driven together: together they admit what the limit allows, within 5%."""
    key, seconds = f"two|{uuid.uuid4().hex}", 3.0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", GATEWAY, server.url, key, repr(seconds),
             repr(TWO_INTERVAL), str(TWO_BURST)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
            env=env)
        for _ in range(2)
    ]
    # Both up (imports take seconds on a loaded machine) before the clock starts.
    for process in processes:
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    start = time.time() + 0.2
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(f"{start!r}\n".encode())
        process.stdin.flush()
    results = []
    for process in processes:
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err.decode()
        results.append(json.loads(out))
    admitted = sum(result["admitted"] for result in results)
    expected = TWO_BURST + (max(result["last"] for result in results) - start) / TWO_INTERVAL
    assert abs(admitted - expected) <= 0.05 * expected, (results, expected)
    assert all(result["admitted"] > 0.1 * expected for result in results), results


async def test_store_down_fails_fast_and_recovers(server: RedisServer) -> None:
    counters = RedisCounters(server.url, lease_fraction=0.5)
    try:
        # leases of 1, then 2 (slow start): one token of "before" is still held
        assert (await take(counters, "before", 1.0, 10)).allowed
        assert (await take(counters, "before", 1.0, 10)).allowed
        server.stop()
        try:
            started = time.monotonic()
            assert counters.take("during", 1.0, 5, time.monotonic()) is None
            with pytest.raises(StoreUnavailable):
                await counters.prepare("during", 1.0, 5)
            assert time.monotonic() - started < 0.3  # refused connection: at once
            # fail fast: no attempt per request while the store is down
            started = time.monotonic()
            for _ in range(100):
                with pytest.raises(StoreUnavailable):
                    await counters.prepare_count("quota", 10, time.time() + 60)
            assert time.monotonic() - started < 0.05
            # a lease granted before the outage is still spent, without I/O
            decision = counters.take("before", 1.0, 10, time.monotonic())
            assert decision is not None and decision.allowed
        finally:
            server.start()  # same port; it lost every key and every script
        await asyncio.sleep(1.05)  # the fail-fast window passes
        decision = await take(counters, "during", 1.0, 5)
        assert decision.allowed and decision.remaining == 4
        assert (await take(counters, "after", 1.0, 5)).allowed
    finally:
        await counters.close()


async def test_hung_store_times_out_quickly(server: RedisServer) -> None:
    counters = RedisCounters(server.url, down_for=0.2)
    try:
        assert (await take(counters, "hung-before", 1.0, 5)).allowed
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await counters.prepare("hung", 1.0, 5)
            assert time.monotonic() - started < 0.5  # the 250 ms socket timeout
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        await asyncio.sleep(0.25)
        assert (await take(counters, "hung", 1.0, 5)).allowed
    finally:
        await counters.close()


async def test_no_raw_identity_in_redis(server: RedisServer, counters: RedisCounters) -> None:
    client = redis.Redis.from_url(server.url)
    client.flushall()
    identity = "user:alice@example.com|203.0.113.7|op:getInvoice"
    assert (await take(counters, identity, 60.0, 5)).allowed
    expires_at = time.time() + 86400
    await counters.prepare_count(identity, 100, expires_at)
    decision = counters.count(identity, 100, expires_at, time.time())
    assert decision is not None and decision.allowed
    keys = [key.decode() for key in client.scan_iter(count=1000)]
    assert len(keys) == 2, keys
    for key in keys:
        assert re.fullmatch(r"apishield:(rl:[0-9a-f]{32}|q:[0-9a-f]{32}:\d+)", key), key
        for part in ("alice", "example.com", "203.0.113.7", "getInvoice"):
            assert part not in key
        # the values are numbers (a TAT in microseconds, a count): "203" alone can be digits
        # of one; the raw identity's address cannot
        assert not any(part.encode() in (client.get(key) or b"")
                       for part in ("alice", "203.0.113.7"))
    client.close()


async def test_idle_keys_expire(server: RedisServer, counters: RedisCounters) -> None:
    client = redis.Redis.from_url(server.url)
    key = f"idle|{uuid.uuid4().hex}"
    name = counters._name("rl", key)
    assert (await take(counters, key, 0.02, 5)).allowed  # a lease of 1, spent
    assert 0 < client.pttl(name) <= 25  # lives as long as the bucket is not full
    await asyncio.sleep(0.1)  # the bucket is full again: the key has no reason to exist
    assert not client.exists(name)
    expires_at = time.time() + 60
    await counters.prepare_count(key, 10, expires_at)
    quota = f"{counters._name('q', key)}:{round(expires_at * 1000)}"
    # a quota key lives until its period ends (plus an hour of clock-skew allowance)
    assert 3600_000 < client.pttl(quota) <= (60 + 3600) * 1000
    client.close()


async def test_single_flight_and_one_pipeline_per_tick(counters: RedisCounters) -> None:
    await counters.prepare("warm-up", 1.0, 5)  # scripts loaded
    before = counters.round_trips
    await asyncio.gather(*(counters.prepare("same", 1.0, 5) for _ in range(50)))
    assert counters.round_trips - before == 1  # 50 callers, one request
    before = counters.round_trips
    await asyncio.gather(*(counters.prepare(f"key-{i}", 1.0, 5) for i in range(50)))
    assert counters.round_trips - before == 1  # 50 keys, one pipeline
    assert all(counters.take(f"key-{i}", 1.0, 5, 0.0) is not None for i in range(50))


async def test_unspent_tokens_are_given_back(server: RedisServer) -> None:
    key, interval, burst = f"back|{uuid.uuid4().hex}", 10.0, 100
    first = RedisCounters(server.url, lease_fraction=0.5, lease_ttl=0.2)
    second = RedisCounters(server.url)
    try:
        for _ in range(10):  # leases of 1, 2, 4, 8 (slow start): 15 leased, 10 spent
            assert (await take(first, key, interval, burst)).allowed
        decision = await take(second, key, interval, burst)
        assert decision.remaining < burst - 11  # the other gateway's lease is reserved
        await asyncio.sleep(0.25)
        first.sweep(time.monotonic())  # expired: the unspent tokens go back
        await asyncio.sleep(0.05)
        await second.prepare(key, interval, burst)  # a fresh lease reads the server
        second.sweep(time.monotonic())
        decision = await take(second, key, interval, burst)
        assert decision.allowed
        assert decision.remaining in (burst - 13, burst - 12), decision
    finally:
        await first.close()
        await second.close()


async def test_saturated_key_costs_few_round_trips(counters: RedisCounters) -> None:
    """At saturation a gateway waits for ~10 ms of the rate (10 tokens here) before
    asking again, so a hot key costs ~100 round trips a second, not one per admitted
    request (1,000 a second here) nor one per round-trip time.

    The bucket is emptied by taking until a refusal, not for a fixed time: on a loaded
    machine (CI runs two test workers on two cores) half a second of hammering may not
    spend the burst plus the refill, and the measured half second then admitted the rest
    of the burst too (7,236 instead of ~5,000 in one CI run at 10,000/s). The rate is
    1,000/s so that one coroutine outpaces the refill even on a starved core."""
    key, interval, burst = f"sat|{uuid.uuid4().hex}", 0.001, 1000
    deadline = time.monotonic() + 30
    while (await take(counters, key, interval, burst)).allowed:
        assert time.monotonic() < deadline, "the bucket never emptied"
        await asyncio.sleep(0)
    before, start = counters.round_trips, time.monotonic()
    admitted, attempts = await hammer_key(counters, key, interval, burst, start + 0.5)
    rate_allows = (time.monotonic() - start) / interval
    # The module docstring's bound for one gateway: within L + least of an exact GCRA,
    # n = floor(burst * 0.02) = 20, L = n + n // 2 = 30, least = ceil(10 ms / T) = 10.
    slack = 30 + 10
    assert admitted <= rate_allows + slack, (admitted, rate_allows)
    assert admitted >= min(attempts, rate_allows) - slack, (admitted, attempts)
    assert counters.round_trips - before < 80, counters.round_trips - before


async def hammer_key(counters: RedisCounters, key: str, interval: float, burst: int,
                     until: float) -> tuple[int, int]:
    """Takes from one key as fast as one coroutine can until `until` (monotonic s);
    returns (admitted, attempts)."""
    admitted = attempts = 0
    while time.monotonic() < until:
        admitted += (await take(counters, key, interval, burst)).allowed
        attempts += 1
        await asyncio.sleep(0)
    return admitted, attempts


async def test_held_leases_bound_the_burst(server: RedisServer) -> None:
    """The documented over-admission bound: tokens gateways hold when the server's bucket
    is full again come on top of the burst, and nothing else does (each gateway holds at
    most n + n // 2 tokens)."""
    key, interval, burst = f"bound|{uuid.uuid4().hex}", 0.002, 100
    gateways = [RedisCounters(server.url, lease_fraction=0.1, lease_ttl=30.0)
                for _ in range(2)]  # n = 10
    try:
        for _ in range(30):
            for gateway in gateways:
                assert (await take(gateway, key, interval, burst)).allowed
        await asyncio.sleep(0.01)  # let refills in flight land
        held = sum(gateway._rate[key].tokens for gateway in gateways)
        assert 0 < held <= 2 * (10 + 5)
        await asyncio.sleep(burst * interval + 0.05)  # the server's bucket is full again
        started, admitted = time.monotonic(), 0
        for gateway in gateways:
            while (await take(gateway, key, interval, burst)).allowed:
                admitted += 1
        regenerated = (time.monotonic() - started) / interval + 1
        assert burst <= admitted <= burst + held + regenerated, (admitted, held, regenerated)
    finally:
        for gateway in gateways:
            await gateway.close()


async def test_quota_is_exact_across_gateways(server: RedisServer) -> None:
    """Quota leases are reservations: two gateways never admit more than the limit
    together, and once both have spent their leases they have admitted exactly it."""
    key, limit, expires_at = f"quota|{uuid.uuid4().hex}", 500, time.time() + 60
    gateways = [RedisCounters(server.url, lease_fraction=0.05) for _ in range(2)]
    try:
        admitted = [0, 0]
        refused = [False, False]
        while not all(refused):
            for index, gateway in enumerate(gateways):
                decision = await count_one(gateway, key, limit, expires_at)
                admitted[index] += decision.allowed
                refused[index] = not decision.allowed
        assert sum(admitted) == limit, admitted
        assert min(admitted) > 0.2 * limit, admitted
    finally:
        for gateway in gateways:
            await gateway.close()


async def count_one(counters: RedisCounters, key: str, limit: int,
                    expires_at: float) -> Decision:
    while True:
        decision = counters.count(key, limit, expires_at, time.time())
        if decision is not None:
            return decision
        await counters.prepare_count(key, limit, expires_at)


async def test_a_cancelled_waiter_does_not_fail_the_others(counters: RedisCounters) -> None:
    """Callers of one key share one request; a caller cancelled while waiting (its
    client went away) must not take the others down with it."""
    await counters.prepare("warm-up", 1.0, 5)
    waiters = [asyncio.create_task(take(counters, "shared", 1.0, 5)) for _ in range(3)]
    await asyncio.sleep(0)  # all three are waiting on the same flight now
    waiters[0].cancel()
    decisions = await asyncio.gather(*waiters[1:])
    assert waiters[0].cancelled()
    assert [d.allowed for d in decisions] == [True, True]


async def test_prepare_then_take_always_answers(counters: RedisCounters) -> None:
    """The rate-limit step prepares once, then takes without awaiting in between; a
    second None would be read as "store down". So concurrent callers of one key each get
    an answer from one prepare, even when leases are 1 token (burst 10, n = 1)."""

    async def step(key: str) -> Decision | None:
        decision = counters.take(key, 1.0, 10, time.time())
        if decision is None:
            await counters.prepare(key, 1.0, 10)
            decision = counters.take(key, 1.0, 10, time.time())
        return decision

    await counters.prepare("warm-up", 1.0, 10)
    before = counters.round_trips
    decisions = await asyncio.gather(*(step("crowd") for _ in range(25)))
    assert all(decision is not None for decision in decisions)
    assert sum(decision.allowed for decision in decisions if decision) == 10
    assert counters.round_trips - before == 1  # one lease of 10 for the 25 of them
    later = await asyncio.gather(*(step("late") for _ in range(3)),
                                 *(step("crowd") for _ in range(3)))
    assert all(decision is not None for decision in later)
