"""Every worker's figures added up (observe/figures.py, observe/figures_channel.py): the
sum of documents, and the supervisor's hub with workers' links on a real Unix socket.

Each link here reports its own `View` (`source=`), not this process's globals, so the
sums are known exactly; tests/test_workers.py checks the same end to end with real
worker processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest

from apishield.config import worker_role
from apishield.observe import figures_channel
from apishield.observe.alert_feed import AlertFeed, FiredAlert
from apishield.observe.figures import View, add, take, view
from apishield.observe.figures_channel import FiguresHub, FiguresLink
from apishield.observe.logjson import FIELDS
from apishield.observe.metrics import DURATION_BUCKETS, Metrics, registry
from apishield.observe.refusers import Refusers
from apishield.observe.usage import Usage

HOUR = 3600.0
NOW = 1_800_000_000.0  # on the hour


def worker_view(requests: int, *, refused: int = 0, started: float = NOW,
                restarts: int = 0) -> View:
    """The figures of a worker that served `requests` GETs, `refused` of them refused."""
    metrics = Metrics()
    usage = Usage(now=started)
    refusers = Refusers()
    for index in range(requests):
        no = index < refused
        metrics.request("getItem", "GET", 403 if no else 200, "refused" if no else "allowed",
                        0.002 if no else 0.02, "ip-denied" if no else None)
        usage.count("alice", "getItem", no, started + 1)
        if no:
            refusers.count("203.0.113.9", "ip-denied", started + index)
    metrics.upstream_duration.observe(0.01)
    metrics.worker_restarts = restarts
    alerts = AlertFeed()
    alerts.add(FiredAlert("burst", "failed-auth-burst", "203.0.113.9", started + requests,
                          f"after {requests}"))
    return View(metrics, usage, refusers, alerts)


def test_counters_and_histograms_are_summed_bucket_by_bucket() -> None:
    summed = view([take(worker_view(30, refused=5)), take(worker_view(70, refused=1))])
    m = summed.metrics
    assert m.requests[("getItem", "GET", 200, "allowed")] == 25 + 69
    assert m.requests[("getItem", "GET", 403, "refused")] == 6
    assert m.refusals == {"ip-denied": 6}
    histogram = m.durations["getItem"]
    assert sum(histogram.counts) == 100
    assert histogram.counts[DURATION_BUCKETS.index(0.0025)] == 6  # 2 ms: refusals
    assert histogram.counts[DURATION_BUCKETS.index(0.025)] == 94  # 20 ms
    assert histogram.sum == pytest.approx(6 * 0.002 + 94 * 0.02)
    assert sum(m.upstream_duration.counts) == 2
    text = generate_latest(registry(m)).decode()
    assert 'apishield_request_duration_seconds_count{operation="getItem"} 100.0' in text
    assert 'apishield_request_duration_seconds_bucket{le="0.0025",operation="getItem"} 6.0' \
        in text


def test_the_restart_count_is_the_supervisors_one_not_a_sum() -> None:
    parts = [take(worker_view(1, restarts=3)), take(worker_view(1, restarts=3))]
    assert view(parts).metrics.worker_restarts == 3


def test_usage_intervals_with_the_same_start_are_summed() -> None:
    """An idle worker still on the hour before: its current hour is the previous one of
    the sum; an interval older than that is over."""
    busy = take(worker_view(10, refused=2, started=NOW))
    idle = take(worker_view(4, started=NOW - HOUR))
    ancient = take(worker_view(7, started=NOW - 2 * HOUR))
    usage = view([busy, idle, ancient]).usage
    assert usage.started == NOW
    assert usage.current == {("alice", "getItem"): [10, 2]}
    assert usage.previous_started == NOW - HOUR
    assert usage.previous == {("alice", "getItem"): [4, 0]}
    report = usage.report(10, now=NOW + 5)
    assert report["current"]["top"] == [{"identity": "alice", "operation": "getItem",
                                         "requests": 10, "refusals": 2}]


def test_refusers_and_alerts_are_merged() -> None:
    summed = view([take(worker_view(5, refused=5)), take(worker_view(3, refused=2))])
    (top,) = summed.refusers.top(10)
    assert (top.ip, top.refusals) == ("203.0.113.9", 7)
    assert summed.alerts.fired == 2
    assert [alert.summary for alert in summed.alerts.recent(5)] == ["after 5", "after 3"]


def test_a_sum_of_sums_is_the_sum() -> None:
    """The hub keeps the figures of gone workers as one running sum (`add`)."""
    parts = [take(worker_view(n, refused=n // 3)) for n in (4, 9, 13)]
    once = view(parts).metrics
    twice = view([add(parts[:2]), parts[2]]).metrics
    assert once.requests == twice.requests and once.refusals == twice.refusals
    assert once.durations["getItem"].counts == twice.durations["getItem"].counts


def test_the_default_number_of_workers_is_the_usable_cores(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_role.os, "sched_getaffinity", lambda pid: {0, 2, 5},
                        raising=False)
    monkeypatch.setattr(worker_role.os, "cpu_count", lambda: 64)
    assert worker_role.usable_cores() == 3  # a taskset of 3 cores on a 64-core host
    monkeypatch.delattr(worker_role.os, "sched_getaffinity")  # macOS
    assert worker_role.usable_cores() == 64
    monkeypatch.setattr(worker_role.os, "cpu_count", lambda: None)  # unknown: one
    assert worker_role.usable_cores() == 1


# ---------------------------------------------------------------- the hub and its links
async def until(predicate: Callable[[], bool]) -> None:
    """Wait (up to 10 s) for the hub to have seen a connection or its end."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the hub never got there")


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a log line (`logjson.fields`)."""
    _kind, _request_id, values = getattr(record, FIELDS, (None, None, {}))
    return dict(values)


@contextlib.asynccontextmanager
async def hub() -> AsyncIterator[tuple[FiguresHub, Path]]:
    with tempfile.TemporaryDirectory(prefix="fig-") as folder:  # a short socket path
        path = Path(folder) / "figures.sock"
        server = FiguresHub()
        await server.start(path)
        try:
            yield server, path
        finally:
            await server.close()


async def test_worker_0_gets_the_sum_and_a_gone_worker_still_counts() -> None:
    async with hub() as (server, path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        views = [worker_view(10), worker_view(20), worker_view(40)]
        links = [FiguresLink(path, i, source=lambda v=v: v) for i, v in enumerate(views)]
        for link in links:
            await link.connect()
        await until(lambda: sum(peer.index is not None for peer in server.peers) == 3)
        summed = await links[0].gather()
        assert sum(summed.metrics.requests.values()) == 70
        views[2].metrics.request("getItem", "GET", 200, "allowed", 0.02, None)  # 41 now
        assert sum((await links[0].gather()).metrics.requests.values()) == 71
        links[2].close()  # worker 2 is gone (killed): its last figures are kept
        await until(lambda: len(server.peers) == 2)
        assert sum((await links[0].gather()).metrics.requests.values()) == 71
        again = FiguresLink(path, 2, source=lambda: worker_view(5))  # started again
        await again.connect()
        await until(lambda: any(peer.index == 2 for peer in server.peers))
        assert sum((await links[0].gather()).metrics.requests.values()) == 76
        for link in (*links, again):
            link.close()


async def test_a_worker_that_does_not_answer_is_not_waited_for(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A stalled worker: the answer comes after the deadline, with that worker's last
    figures (none yet here), and the hub logs which worker was late."""
    monkeypatch.setattr(figures_channel, "GATHER_DEADLINE", 0.2)
    async with hub() as (server, path):
        own = worker_view(10)
        link = FiguresLink(path, 0, source=lambda: own)
        await link.connect()
        with socket.socket(socket.AF_UNIX) as stalled:  # says hello, never answers
            stalled.connect(str(path))
            body = b'{"hello":1}'
            stalled.sendall(len(body).to_bytes(4, "big") + body)
            await until(lambda: any(peer.index == 1 for peer in server.peers))
            with caplog.at_level(logging.WARNING, "apishield"):
                summed = await asyncio.wait_for(link.gather(), 10)
        assert sum(summed.metrics.requests.values()) == 10
        (values,) = [v for v in map(fields_of, caplog.records)
                     if v.get("event") == "figures-late"]
        assert values["late"] == [1]
        assert own.metrics.figures_late == 1  # apishield_worker_figures_late_total
        link.close()


async def test_without_the_hub_worker_0_shows_its_own_figures(
        caplog: pytest.LogCaptureFixture) -> None:
    with tempfile.TemporaryDirectory(prefix="fig-") as folder:
        own = worker_view(12)
        link = FiguresLink(Path(folder) / "none.sock", 0, source=lambda: own)
        with caplog.at_level(logging.WARNING, "apishield"):
            assert (await link.gather()) is own
        (values,) = [v for v in map(fields_of, caplog.records)
                     if v.get("event") == "figures-late"]
        assert values["reason"] == "supervisor"


async def test_when_the_hub_stops_answering_worker_0_keeps_the_last_sum(
        caplog: pytest.LogCaptureFixture) -> None:
    """Not its own figures alone: a scrape would read that as every counter reset."""
    async with hub() as (server, path):
        own = worker_view(10)
        link = FiguresLink(path, 0, source=lambda: own)
        other = FiguresLink(path, 1, source=lambda: worker_view(30))
        await link.connect()
        await other.connect()
        await until(lambda: sum(peer.index is not None for peer in server.peers) == 2)
        assert sum((await link.gather()).metrics.requests.values()) == 40
        other.close()
    with caplog.at_level(logging.WARNING, "apishield"):
        stale = await link.gather()  # the hub is closed
    assert sum(stale.metrics.requests.values()) == 40
    assert own.metrics.figures_late == 1  # no sum from the hub counts as one
    (values,) = [v for v in map(fields_of, caplog.records) if v.get("event") == "figures-late"]
    assert values["reason"] == "supervisor"
    link.close()


async def test_a_malformed_message_drops_that_connection_alone() -> None:
    async with hub() as (_server, path):
        link = FiguresLink(path, 0, source=lambda: worker_view(3))
        await link.connect()
        frames = [b"[]", b'{"hello":"x"}', b'{"answer":1}',  # valid JSON, not our messages
                  b'{"answer":1,"figures":{"metrics":5}}']
        for body in (b"\xff\xff\xff\xff garbage",
                     *(len(frame).to_bytes(4, "big") + frame for frame in frames)):
            with socket.socket(socket.AF_UNIX) as rogue:
                rogue.connect(str(path))
                rogue.sendall(body)
                rogue.settimeout(5)
                assert await asyncio.to_thread(rogue.recv, 100) == b""  # closed by the hub
        assert sum((await link.gather()).metrics.requests.values()) == 3
        link.close()
