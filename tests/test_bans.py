"""Temporary bans (A9, D5): the BanStore contract on SQLite and on a real redis-server,
the rule engine, and the real `apishield bans` CLI run as a subprocess against the same
state the stores read."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from apishield.abuse.bans import BanRules, ban_duration, human_duration
from apishield.config import BanRule, ConfigError, load_config
from apishield.state.bans import HISTORY_SECONDS, BanRecord, BanStoreError, canonical_value
from apishield.state.open import open_ban_store
from apishield.state.redis_store import RedisBanStore, redact_url
from apishield.state.sqlite import SqliteKeyStore
from apishield.state.sqlite_bans import SCHEMA_VERSION, SqliteBanStore
from tests.conftest import json_lines
from tests.redis_server import RedisServer, running_redis

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

StoreFactory = Callable[[], Any]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(Path(tmp_path_factory.mktemp("redis"))) as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens stores on one backend; each call is another process's view of the same
    state (its own connection and mirror). Redis stores run without the background
    thread here, so `refresh()` is deterministic; the thread has its own tests."""
    opened: list[Any] = []
    if request.param == "sqlite":
        def make() -> Any:
            opened.append(SqliteBanStore(tmp_path / "state.db"))
            return opened[-1]
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        namespace = f"test-{uuid.uuid4().hex}"

        def make() -> Any:
            opened.append(RedisBanStore(server.url, namespace=namespace, background=False))
            return opened[-1]
    yield make
    for store in opened:
        store.close()


def record(kind: str, value: str, now: float, seconds: float = 60.0, *, rule: str = "r",
           offense: int = 1) -> BanRecord:
    return BanRecord(kind=kind, value=value, until=now + seconds, rule=rule,  # type: ignore[arg-type]
                     reason="test", created_at=now, offense=offense)


# -- the BanStore contract -----------------------------------------------------------------


def test_ban_lift_list_and_expiry(open_store):
    store = open_store()
    now = time.time()
    assert store.banned("ip", "198.51.100.7", now) is None
    assert store.list(now) == []
    first = record("ip", "198.51.100.7", now, 60)
    second = record("subject", "alice", now + 1, 30)
    store.ban(first)
    store.ban(second)
    assert store.banned("ip", "198.51.100.7", now) == first
    assert store.banned("subject", "alice", now) == second
    assert store.banned("subject", "198.51.100.7", now) is None  # kinds do not mix
    assert store.banned("ip", "198.51.100.8", now) is None
    assert store.banned("ip", None, now) is None
    assert store.list(now) == [first, second]  # oldest first
    # expiry: over at `until`, gone from the list
    assert store.banned("subject", "alice", now + 31) is None
    assert store.list(now + 40) == [first]
    assert store.list(now + 61) == []
    # replaced by a new ban on the same value
    longer = record("ip", "198.51.100.7", now + 2, 3600, rule="other", offense=2)
    store.ban(longer)
    assert store.banned("ip", "198.51.100.7", now + 100) == longer
    assert store.lift("ip", "198.51.100.7")
    assert not store.lift("ip", "198.51.100.7")
    assert store.banned("ip", "198.51.100.7", now) is None
    assert store.list(now) == [second]


def test_networks_and_address_spellings(open_store):
    store = open_store()
    now = time.time()
    store.ban(record("ip", "203.0.113.0/24", now))
    store.ban(record("ip", "2001:db8:abcd::/48", now))
    store.ban(record("ip", "198.51.100.9", now))
    assert store.banned("ip", "203.0.113.200", now).value == "203.0.113.0/24"
    assert store.banned("ip", "203.0.114.1", now) is None
    assert store.banned("ip", "2001:db8:abcd:12::1", now).value == "2001:db8:abcd::/48"
    assert store.banned("ip", "2001:db8:abce::1", now) is None
    # IPv4-mapped IPv6 counts as IPv4 (no bypass through a dual-stack socket)
    assert store.banned("ip", "::ffff:203.0.113.5", now).value == "203.0.113.0/24"
    assert store.banned("ip", "::ffff:198.51.100.9", now).value == "198.51.100.9"
    # another spelling of a banned IPv6 address
    store.ban(record("ip", "2001:DB8:0:0::7", now))
    assert store.banned("ip", "2001:db8::7", now).value == "2001:db8::7"
    assert store.banned("ip", "2001:0db8::0007", now).value == "2001:db8::7"
    # a network is found, and lifted, by its CIDR
    assert store.banned("ip", "203.0.113.0/24", now).value == "203.0.113.0/24"
    assert store.lift("ip", "203.0.113.0/24")
    assert store.banned("ip", "203.0.113.200", now) is None
    # a network ban expires like any other
    assert store.banned("ip", "2001:db8:abcd::1", now + 61) is None
    # not an address (a unix-socket peer): matched exactly, never parsed as one
    store.ban(record("ip", "unix:/run/sock", now))
    assert store.banned("ip", "unix:/run/sock", now) is not None
    assert store.banned("ip", "junk::", now) is None


def test_offenses_count_the_last_30_days(open_store):
    store = open_store()
    now = time.time()
    old = now - HISTORY_SECONDS - 10
    store.ban(record("ip", "192.0.2.1", old, 60))  # long over, and out of the history
    store.ban(record("ip", "192.0.2.1", now - 86400, 60))
    assert store.offenses("ip", "192.0.2.1", now) == 1
    store.ban(record("ip", "192.0.2.1", now, 60))
    assert store.offenses("ip", "192.0.2.1", now) == 2
    assert store.lift("ip", "192.0.2.1")
    assert store.offenses("ip", "192.0.2.1", now) == 2  # lifting does not forgive
    assert store.offenses("ip", "192.0.2.2", now) == 0
    assert store.offenses("subject", "192.0.2.1", now) == 0
    # a fresh view of the same state agrees
    assert open_store().offenses("ip", "192.0.2.1", now) == 2


def test_another_instance_sees_changes_after_refresh(open_store):
    mine, theirs = open_store(), open_store()
    now = time.time()
    assert not theirs.changed() and not theirs.refresh()
    mine.ban(record("ip", "192.0.2.50", now))
    mine.ban(record("subject", "mallory", now))
    assert not mine.refresh()  # its own writes are not news
    assert theirs.banned("ip", "192.0.2.50", now) is None  # from memory: not yet
    assert theirs.changed()
    assert theirs.refresh()
    assert theirs.banned("ip", "192.0.2.50", now).rule == "r"
    assert theirs.banned("subject", "mallory", now) is not None
    assert theirs.offenses("subject", "mallory", now) == 1
    assert not theirs.changed() and not theirs.refresh()
    theirs.lift("subject", "mallory")
    assert mine.refresh()
    assert mine.banned("subject", "mallory", now) is None
    assert mine.banned("ip", "192.0.2.50", now) is not None
    # and a store opened afterwards loads everything at once
    assert [r.value for r in open_store().list(now)] == ["192.0.2.50"]


def test_canonical_values():
    assert canonical_value("ip", "2001:DB8::0:1") == "2001:db8::1"
    assert canonical_value("ip", "::ffff:192.0.2.1") == "192.0.2.1"
    assert canonical_value("ip", "192.0.2.0/32") == "192.0.2.0"
    assert canonical_value("ip", "192.0.2.7/24") == "192.0.2.0/24"
    assert canonical_value("ip", "not an ip") == "not an ip"
    assert canonical_value("subject", "Alice ") == "Alice "
    with pytest.raises(ValueError):
        canonical_value("user", "x")


# -- SQLite specifics ----------------------------------------------------------------------


def test_sqlite_shares_the_key_state_file_private_and_versioned(tmp_path):
    path = tmp_path / "state.db"
    keys = SqliteKeyStore(path)
    bans = SqliteBanStore(path)
    bans.ban(record("ip", "192.0.2.1", time.time()))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as conn:
        versions = dict(conn.execute("SELECT component, version FROM schema_version"))
        assert versions == {"api_keys": 1, "bans": SCHEMA_VERSION}
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute("UPDATE schema_version SET version = 99 WHERE component = 'bans'")
    keys.close()
    bans.close()
    with pytest.raises(ConfigError, match="ban tables have schema version 99"):
        SqliteBanStore(path)
    with pytest.raises(ConfigError, match="does not exist"):
        SqliteBanStore(tmp_path / "missing" / "state.db")


def test_sqlite_prunes_expired_rows(tmp_path):
    store = SqliteBanStore(tmp_path / "state.db")
    now = time.time()
    store.ban(record("ip", "192.0.2.1", now - 100, 10))  # already over
    store.ban(record("ip", "192.0.2.2", now))
    with sqlite3.connect(tmp_path / "state.db") as conn:
        assert [row[0] for row in conn.execute("SELECT value FROM bans")] == ["192.0.2.2"]
    store.close()


# -- Redis specifics -----------------------------------------------------------------------


def wait_for(condition: Callable[[], Any], timeout: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_redis_background_store_follows_other_writers(redis_server):
    namespace = f"test-{uuid.uuid4().hex}"
    gateway = RedisBanStore(redis_server.url, namespace=namespace, poll_interval=0.05)
    cli = RedisBanStore(redis_server.url, namespace=namespace, background=False)
    try:
        now = time.time()
        cli.ban(record("ip", "192.0.2.9", now))
        started = time.monotonic()
        wait_for(gateway.changed)
        assert gateway.refresh()  # cheap: the thread already loaded it
        assert time.monotonic() - started < 1.0
        assert gateway.banned("ip", "192.0.2.9", now) is not None
        # the gateway's own bans: applied at once, written by the thread
        gateway.ban(record("subject", "eve", now))
        assert gateway.banned("subject", "eve", now) is not None
        wait_for(lambda: gateway.pending == 0)
        assert cli.refresh() and cli.banned("subject", "eve", now) is not None
        assert gateway.lift("ip", "192.0.2.9")
        wait_for(lambda: cli.refresh() and cli.banned("ip", "192.0.2.9", now) is None)
    finally:
        gateway.close()
        cli.close()


def test_redis_outage_keeps_the_mirror_and_queues_bans(tmp_path, caplog):
    with running_redis(tmp_path) as server:
        gateway = RedisBanStore(server.url, poll_interval=0.05)
        try:
            now = time.time()
            with RedisBanStore(server.url, background=False) as cli:
                cli.ban(record("ip", "192.0.2.1", now))
            wait_for(lambda: gateway.banned("ip", "192.0.2.1", now))
            assert gateway.refresh()
            caplog.set_level(logging.WARNING, logger="apishield.state")
            server.stop()
            time.sleep(0.3)  # several failed polls
            assert gateway.banned("ip", "192.0.2.1", now) is not None  # the last mirror
            assert not gateway.refresh()  # never raises, never blocks
            gateway.ban(record("ip", "192.0.2.2", now))  # the engine keeps banning
            assert gateway.banned("ip", "192.0.2.2", now) is not None
            assert gateway.pending == 1
            unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(unreachable) == 1  # logged once, not per poll
            server.start()  # same port, empty (the test server does not persist)
            wait_for(lambda: gateway.pending == 0)
            with RedisBanStore(server.url, background=False) as cli:
                assert [r.value for r in cli.list(now)] == ["192.0.2.2"]
            assert any("reachable again" in r.getMessage() for r in caplog.records)
        finally:
            gateway.close()


def test_redis_never_logs_the_password_and_fails_clearly(redis_server):
    url = "redis://:s3cret-pass@127.0.0.1:1/0"
    assert "s3cret" not in redact_url(url) and redact_url(url).startswith("redis://:***@")
    assert redact_url(redis_server.url) == redis_server.url
    with pytest.raises(BanStoreError) as caught:
        RedisBanStore(url, background=False)
    assert "s3cret" not in str(caught.value) and "127.0.0.1:1" in str(caught.value)
    # the gateway's store starts anyway (no bans known yet) and keeps trying
    store = RedisBanStore(url, poll_interval=0.05)
    assert store.banned("ip", "192.0.2.1", time.time()) is None
    store.close()


# -- the rule engine -----------------------------------------------------------------------


def rule(**overrides: Any) -> BanRule:
    settings: dict[str, Any] = {"name": "stuffing", "on": "authn-failure", "threshold": 3,
                                "window": 60, "duration": 10}
    settings.update(overrides)
    return BanRule.model_validate(settings)


@pytest.fixture
def bans_store(tmp_path: Path) -> Iterator[SqliteBanStore]:
    store = SqliteBanStore(tmp_path / "state.db")
    yield store
    store.close()


def test_threshold_within_window_bans(bans_store):
    engine = BanRules((rule(),), bans_store)
    t = 1_000_000.0
    assert engine.observe("authn-failure", "192.0.2.1", None, t) is None
    assert engine.observe("not-found", "192.0.2.1", None, t + 1) is None  # not listened to
    assert engine.observe("authn-failure", "192.0.2.1", None, t + 2) is None
    assert engine.observe("authn-failure", "192.0.2.2", None, t + 3) is None  # another IP
    ban = engine.observe("authn-failure", "192.0.2.1", None, t + 59)
    assert ban is not None
    assert (ban.kind, ban.value, ban.rule, ban.offense) == ("ip", "192.0.2.1", "stuffing", 1)
    assert ban.until == t + 59 + 10 and ban.created_at == t + 59
    assert ban.reason == "3 authn-failure event(s) within 1m"
    assert engine.check("192.0.2.1", None, t + 60) == ban
    assert engine.check("192.0.2.1", "someone", t + 70) is None  # over
    assert engine.check("192.0.2.2", None, t + 60) is None
    assert engine.tracked() == 1  # the banned source's counter starts again from zero


def test_events_spread_beyond_the_window_do_not_ban(bans_store):
    engine = BanRules((rule(),), bans_store)
    t = 1_000_000.0
    for step in range(20):  # 20 failures, but never 3 within 60 s
        assert engine.observe("authn-failure", "192.0.2.1", None, t + step * 30.5) is None
    assert engine.check("192.0.2.1", None, t + 700) is None


def test_by_subject_counts_one_account_across_addresses(bans_store):
    engine = BanRules((rule(name="account", by="subject"),), bans_store)
    t = 1_000_000.0
    for _ in range(10):
        assert engine.observe("authn-failure", "192.0.2.1", None, t) is None  # anonymous
    assert engine.observe("authn-failure", "192.0.2.1", "alice", t) is None
    assert engine.observe("authn-failure", "192.0.2.2", "alice", t + 1) is None
    ban = engine.observe("authn-failure", "2001:db8::3", "alice", t + 2)
    assert (ban.kind, ban.value, ban.rule) == ("subject", "alice", "account")
    assert engine.check(None, "alice", t + 3) == ban
    assert engine.check("192.0.2.1", None, t + 3) is None  # the addresses are not banned
    assert engine.check("192.0.2.1", "bob", t + 3) is None


def test_escalation_doubles_and_caps(bans_store):
    engine = BanRules((rule(duration=10, escalation=2, max_duration=35),), bans_store)
    t = 1_000_000.0
    lengths = []
    for _ in range(4):
        for _ in range(3):
            ban = engine.observe("authn-failure", "192.0.2.1", None, t)
            t += 1
        assert ban is not None
        lengths.append((ban.until - ban.created_at, ban.offense))
        t = ban.until + 1
    assert lengths == [(10, 1), (20, 2), (35, 3), (35, 4)]
    assert ban_duration(rule(max_duration=3600), 10_000) == 3600  # no overflow
    assert human_duration(90) == "90s" and human_duration(7200) == "2h"


def test_a_banned_source_is_not_banned_again(bans_store):
    engine = BanRules((rule(threshold=1),), bans_store)
    t = 1_000_000.0
    first = engine.observe("authn-failure", "192.0.2.1", None, t)
    assert first is not None
    assert engine.observe("authn-failure", "192.0.2.1", None, t + 1) is None
    assert bans_store.offenses("ip", "192.0.2.1", t + 1) == 1
    bans_store.ban(record("ip", "198.51.100.0/24", t))  # a CLI ban on a network
    assert engine.observe("authn-failure", "198.51.100.7", None, t + 1) is None


def test_one_event_can_complete_two_rules(bans_store):
    engine = BanRules((rule(name="ip"), rule(name="acct", by="subject")), bans_store)
    t = 1_000_000.0
    for _ in range(2):
        assert engine.observe_all("authn-failure", "192.0.2.1", "alice", t) == []
    made = engine.observe_all("authn-failure", "192.0.2.1", "alice", t)
    assert [(ban.kind, ban.rule) for ban in made] == [("ip", "ip"), ("subject", "acct")]


def test_memory_is_bounded_under_address_rotation(bans_store):
    engine = BanRules((rule(threshold=5, window=600),), bans_store, max_keys=1000)
    t = 1_000_000.0
    for i in range(20_000):
        engine.observe("authn-failure", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", None, t)
        if i > 19_000 and i % 200 == 0:  # an attacker seen recently is not the one evicted
            assert engine.observe("authn-failure", "192.0.2.66", None, t) is None
    assert engine.tracked() == 1000
    assert engine.observe("authn-failure", "192.0.2.66", None, t + 1) is not None  # 5th
    assert engine.observe("authn-failure", "10.0.0.0", None, t + 1) is None  # evicted: 1st
    # a threshold of 100 gets fewer sources: the bound is on timestamps too
    wide = BanRules((rule(threshold=100),), bans_store, max_timestamps=10_000)
    for i in range(500):
        wide.observe("authn-failure", f"10.0.{i >> 8}.{i & 255}", None, t)
    assert wide.tracked() == 100


def test_sweep_drops_idle_sources_only(bans_store):
    engine = BanRules((rule(window=60),), bans_store)
    t = 1_000_000.0
    for i in range(100):
        engine.observe("authn-failure", f"10.0.0.{i}", None, t)
    engine.observe("authn-failure", "10.0.0.5", None, t + 50)  # still active
    assert engine.sweep(t + 30) == 0
    assert engine.sweep(t + 61) == 99
    assert engine.tracked() == 1
    assert engine.sweep(t + 111) == 1 and engine.tracked() == 0


def test_a_store_failure_still_bans_here(bans_store, caplog):
    class Failing:
        def __init__(self, inner: SqliteBanStore) -> None:
            self.inner = inner

        def ban(self, record: BanRecord) -> None:
            self.inner._mirror.put(record)  # applies here, as the real stores do
            raise BanStoreError("disk full")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    engine = BanRules((rule(threshold=1),), Failing(bans_store))  # type: ignore[arg-type]
    t = time.time()
    with caplog.at_level(logging.WARNING, logger="apishield.abuse.bans"):
        ban = engine.observe("authn-failure", "192.0.2.1", None, t)
    assert ban is not None and engine.check("192.0.2.1", None, t) == ban
    assert "could not be stored" in caplog.text and "disk full" in caplog.text


# -- the CLI -------------------------------------------------------------------------------


def write_config(folder: Path, state: str = "state/state.db") -> Path:
    (folder / "state").mkdir(exist_ok=True)
    path = folder / "apishield.yaml"
    path.write_text(f"contract: contract.yaml\nstate: {state}\n")
    return path


def bans(config_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apishield", "bans", *args, "--config", str(config_file)],
        capture_output=True, text=True, timeout=30, env=ENV, check=False,
    )


def audit_lines(stderr: str) -> list[dict[str, Any]]:
    return json_lines(stderr, "audit")


def test_cli_add_list_remove_seen_by_an_open_store(tmp_path):
    config_file = write_config(tmp_path)
    empty = bans(config_file, "list")
    assert empty.returncode == 0 and "no bans in force" in empty.stderr
    assert not (tmp_path / "state" / "state.db").exists()  # reading creates nothing

    added = bans(config_file, "add", "--ip", "203.0.113.0/24", "--duration", "1h",
                 "--reason", "scraper\nforged line")
    assert added.returncode == 1 and "--reason" in added.stderr  # no control characters
    added = bans(config_file, "add", "--ip", "203.0.113.0/24", "--duration", "1h",
                 "--reason", "scraper")
    assert added.returncode == 0, added.stderr
    assert [(a["event"], a["target"], a["value"], a["reason"]) for a in
            audit_lines(added.stderr)] == [("ban-added", "ip", "203.0.113.0/24", "scraper")]

    config = load_config(config_file)
    store = open_ban_store(config)  # the gateway's view, opened before the next change
    now = time.time()
    assert store.banned("ip", "203.0.113.77", now).rule == "manual"
    subject = bans(config_file, "add", "--subject", "mallory", "--duration", "30m")
    assert subject.returncode == 0, subject.stderr
    assert store.banned("subject", "mallory", now) is None  # until the next refresh
    assert store.refresh()
    assert store.banned("subject", "mallory", now).reason == ""

    listed = bans(config_file, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(row["kind"], row["value"], row["rule"], row["offense"]) for row in rows] == [
        ("ip", "203.0.113.0/24", "manual", 1), ("subject", "mallory", "manual", 1)]
    assert 3590 <= rows[0]["remaining_seconds"] <= 3600
    table = bans(config_file, "list")
    assert table.stdout.splitlines()[0].split() == [
        "KIND", "VALUE", "UNTIL", "RULE", "OFFENSE", "REASON"]
    assert table.stdout.splitlines()[1].split()[:2] == ["ip", "203.0.113.0/24"]

    inside = bans(config_file, "remove", "--ip", "203.0.113.9")
    assert inside.returncode == 1 and "inside the ban on 203.0.113.0/24" in inside.stderr
    removed = bans(config_file, "remove", "--ip", "203.0.113.0/24")
    assert removed.returncode == 0, removed.stderr
    assert [a["event"] for a in audit_lines(removed.stderr)] == ["ban-removed"]
    assert store.refresh()
    assert store.banned("ip", "203.0.113.77", time.time()) is None
    again = bans(config_file, "remove", "--ip", "203.0.113.0/24")
    assert again.returncode == 1 and "no ban in force on ip 203.0.113.0/24" in again.stderr
    store.close()


def test_cli_errors_and_exit_codes(tmp_path):
    config_file = write_config(tmp_path)
    cases = [
        (("add", "--ip", "300.1.2.3", "--duration", "1h"), "is not an IP address or CIDR"),
        (("add", "--ip", "203.0.113.7/24", "--duration", "1h"), "did you mean 203.0.113.0/24"),
        (("add", "--ip", "16.0.0.0/4", "--duration", "1h"), "wider than /8"),
        (("add", "--ip", "192.0.2.1", "--duration", "forever"), "is not a duration"),
        (("add", "--ip", "192.0.2.1", "--duration", "0"), "longer than zero"),
        (("remove", "--subject", "nobody"), "no ban in force on subject nobody"),
    ]
    for args, message in cases:
        result = bans(config_file, *args)
        assert result.returncode == 1, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert result.stdout == ""
    both = bans(config_file, "add", "--ip", "192.0.2.1", "--subject", "x", "--duration", "1h")
    assert both.returncode == 2  # argparse: one target
    broken = tmp_path / "broken.yaml"
    broken.write_text("contract: c.yaml\nrate_limiting: {bans: {rules: [{name: x}]}}\n")
    result = bans(broken, "list")
    assert result.returncode == 2 and "rate_limiting.bans.rules.0" in result.stderr


def test_cli_with_redis_state(redis_server, tmp_path):
    config_file = write_config(tmp_path, redis_server.url.replace("/0", "/3"))
    config = load_config(config_file)
    store = open_ban_store(config)  # background thread, as in the gateway
    try:
        added = bans(config_file, "add", "--ip", "2001:db8::/32", "--duration", "2h")
        assert added.returncode == 0, added.stderr
        ban = wait_for(lambda: store.banned("ip", "2001:db8:1::5", time.time()))
        assert ban.value == "2001:db8::/32"
        listed = json.loads(bans(config_file, "list", "--json").stdout)
        assert [row["value"] for row in listed] == ["2001:db8::/32"]
        removed = bans(config_file, "remove", "--ip", "2001:db8::/32")
        assert removed.returncode == 0, removed.stderr
        wait_for(lambda: store.banned("ip", "2001:db8:1::5", time.time()) is None)
    finally:
        store.close()
