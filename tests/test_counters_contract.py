"""One contract for every `Counters` backend: what the rate-limit step relies on.

Each test runs against `MemoryCounters`, against `RedisCounters` on a real
redis-server (tests/redis_server.py) and against `LocalLeaseCounters` on a real
`LeaseServer` (the supervisor's end of `serve --workers N`) on a Unix socket. Time is
real (the lease backends decide on the server's clock), so intervals are tens of
milliseconds and checks allow a few ms of slack.
Backends are driven the way the step drives them: `take`, and when it answers None,
`await prepare(...)` and `take` again.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from apishield.state.counters import Counters, Decision, MemoryCounters
from apishield.state.local_leases import LeaseServer, LocalLeaseCounters
from apishield.state.redis_counters import RedisCounters
from tests.redis_server import RedisServer, running_redis

SLACK = 0.02  # seconds of scheduling / round-trip jitter tolerated in timing checks


async def take(counters: Counters, key: str, interval: float, burst: int) -> Decision:
    """One request against a rate limit, preparing as often as the backend asks."""
    for _ in range(100):
        decision = counters.take(key, interval, burst, time.monotonic())
        if decision is not None:
            return decision
        await counters.prepare(key, interval, burst)
    raise AssertionError("take() still answers None after 100 prepare() calls")


async def count(counters: Counters, key: str, limit: int, expires_at: float) -> Decision:
    """One request against a quota, preparing as often as the backend asks."""
    for _ in range(100):
        decision = counters.count(key, limit, expires_at, time.time())
        if decision is not None:
            return decision
        await counters.prepare_count(key, limit, expires_at)
    raise AssertionError("count() still answers None after 100 prepare_count() calls")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(Path(tmp_path_factory.mktemp("redis"))) as server:
        yield server


@pytest.fixture(params=["memory", "redis", "local"])
async def counters(request: pytest.FixtureRequest) -> AsyncIterator[Counters]:
    backend: Counters
    lease_server: LeaseServer | None = None
    folder: tempfile.TemporaryDirectory[str] | None = None
    if request.param == "memory":
        backend = MemoryCounters()
    elif request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        backend = RedisCounters(server.url)
    else:  # a short private folder: a Unix socket path must fit in 108 bytes
        folder = tempfile.TemporaryDirectory(prefix="apishield-test-")
        lease_server = LeaseServer()
        await lease_server.start(Path(folder.name) / "leases.sock")
        backend = LocalLeaseCounters(Path(folder.name) / "leases.sock")
    try:
        yield backend
    finally:
        await backend.close()
        if lease_server is not None:
            await lease_server.close()
        if folder is not None:
            folder.cleanup()


def fresh() -> str:
    """A key no other test (or earlier run against the same server) has touched."""
    return f"203.0.113.7|{uuid.uuid4().hex}"


async def test_admits_exactly_burst_at_once_then_refuses(counters: Counters) -> None:
    key, interval, burst = fresh(), 0.5, 5
    decisions = [await take(counters, key, interval, burst) for _ in range(burst + 3)]
    assert [d.allowed for d in decisions] == [True] * burst + [False] * 3
    assert [d.remaining for d in decisions[:burst]] == [4, 3, 2, 1, 0]
    assert all(d.limit == burst for d in decisions)


async def test_refills_at_the_rate(counters: Counters) -> None:
    key, interval, burst = fresh(), 0.05, 4
    for _ in range(burst):
        assert (await take(counters, key, interval, burst)).allowed
    assert not (await take(counters, key, interval, burst)).allowed
    await asyncio.sleep(2 * interval + 0.4 * interval)  # 2.4 tokens' worth
    after = [(await take(counters, key, interval, burst)).allowed for _ in range(4)]
    assert after == [True, True, False, False]
    await asyncio.sleep(burst * interval + 0.02)  # full again, and no more than full
    again = [(await take(counters, key, interval, burst)).allowed for _ in range(burst + 1)]
    assert again == [True] * burst + [False]


async def test_refused_requests_do_not_consume(counters: Counters) -> None:
    """A client hammering while refused is admitted again right at retry_after, and over
    time gets exactly the rate: refusals never cost it quota (no lock-out by retrying)."""
    key, interval, burst = fresh(), 0.1, 1
    assert (await take(counters, key, interval, burst)).allowed
    refused = await take(counters, key, interval, burst)
    refused_at = time.monotonic()
    assert not refused.allowed and 0 < refused.retry_after <= interval
    admitted_at: list[float] = []
    start = time.monotonic()
    while time.monotonic() - start < 0.55:
        decision = await take(counters, key, interval, burst)
        if decision.allowed:
            admitted_at.append(time.monotonic())
        await asyncio.sleep(0.002)
    # the first admission comes right at the retry time the refusal announced
    assert abs(admitted_at[0] - (refused_at + refused.retry_after)) <= SLACK
    # hammering every 2 ms for 0.55 s: one admission per interval, none lost
    assert len(admitted_at) in (5, 6)
    gaps = [b - a for a, b in itertools.pairwise(admitted_at)]
    assert all(interval - SLACK <= gap <= interval + SLACK for gap in gaps)


async def test_decision_fields_are_consistent(counters: Counters) -> None:
    key, interval, burst = fresh(), 0.05, 4
    decisions = [await take(counters, key, interval, burst) for _ in range(burst + 2)]
    for index, decision in enumerate(decisions[:burst]):
        assert decision.allowed and decision.retry_after == 0.0
        assert decision.remaining == burst - index - 1
        # full capacity is back after the admitted requests' intervals have passed
        expected = (index + 1) * interval
        assert expected - SLACK <= decision.reset_after <= expected + SLACK / 4
        assert decision.reset_after <= burst * interval + 1e-9
    for decision in decisions[burst:]:
        assert not decision.allowed and decision.remaining == 0
        assert 0 < decision.retry_after <= interval
        assert decision.retry_after <= decision.reset_after <= burst * interval + 1e-9
        # one more request passes once one interval of the spent capacity is back
        assert abs(decision.reset_after - decision.retry_after - (burst - 1) * interval) <= SLACK


async def test_independent_keys(counters: Counters) -> None:
    first, second, interval, burst = fresh(), fresh(), 1.0, 2
    for _ in range(burst):
        assert (await take(counters, first, interval, burst)).allowed
    assert not (await take(counters, first, interval, burst)).allowed
    decision = await take(counters, second, interval, burst)
    assert decision.allowed and decision.remaining == burst - 1
    expires_at = time.time() + 60
    assert (await count(counters, first, 1, expires_at)).allowed
    assert not (await count(counters, first, 1, expires_at)).allowed
    assert (await count(counters, second, 1, expires_at)).allowed


async def test_quota_counts_and_resets_at_expires_at(counters: Counters) -> None:
    key, limit = fresh(), 3
    expires_at = time.time() + 0.4
    decisions = [await count(counters, key, limit, expires_at) for _ in range(limit + 2)]
    assert [d.allowed for d in decisions] == [True] * limit + [False] * 2
    assert [d.remaining for d in decisions] == [2, 1, 0, 0, 0]
    for decision in decisions:
        assert decision.limit == limit
        assert 0 < decision.reset_after <= 0.4
    for decision in decisions[limit:]:
        assert decision.retry_after == pytest.approx(decision.reset_after, abs=1e-3)
    await asyncio.sleep(max(0.0, expires_at - time.time()) + 0.01)
    next_period = expires_at + 0.4
    decision = await count(counters, key, limit, next_period)
    assert decision.allowed and decision.remaining == limit - 1
    assert decision.reset_after == pytest.approx(next_period - time.time(), abs=SLACK)


async def test_sweep_forgets_nothing_that_matters(counters: Counters) -> None:
    key, interval, burst = fresh(), 0.5, 2
    for _ in range(burst):
        assert (await take(counters, key, interval, burst)).allowed
    counters.sweep(time.monotonic())
    assert not (await take(counters, key, interval, burst)).allowed
