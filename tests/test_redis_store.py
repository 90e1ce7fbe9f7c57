"""The Redis key store (`state: redis://...`) behaves as the SQLite one: the same store
tests run on both, on a real redis-server; then what only Redis has (the in-memory mirror
and its background thread, outages), `apishield keys` against Redis, and a real gateway
sharing keys and bans through Redis with the CLI."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from apishield.auth.apikey_verifier import ApiKeyVerifier
from apishield.auth.apikeys import issue_key, parse_key
from apishield.auth.principal import AuthFailure
from apishield.config import ConfigError, load_config
from apishield.state.keys import DuplicateKeyId, KeyRecord, KeyStoreError
from apishield.state.open import open_ban_store, open_key_store
from apishield.state.redis_store import RedisBanStore, RedisKeyStore
from apishield.state.sqlite import SqliteKeyStore
from apishield.state.sqlite_bans import SqliteBanStore
from tests.conftest import start_gateway
from tests.redis_server import RedisServer, running_redis

PEPPER = b"p" * 32
PEPPER_TEXT = "x" * 40
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "APISHIELD_TEST_PEPPER": PEPPER_TEXT}

StoreFactory = Callable[[], Any]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(Path(tmp_path_factory.mktemp("redis"))) as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Each call opens another connection to the same key state (another process's
    view). Redis stores without the background thread: every call is answered now."""
    opened: list[Any] = []
    if request.param == "sqlite":
        def make() -> Any:
            opened.append(SqliteKeyStore(tmp_path / "keys.db"))
            return opened[-1]
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        namespace = f"test-{uuid.uuid4().hex}"

        def make() -> Any:
            opened.append(RedisKeyStore(server.url, namespace=namespace, background=False))
            return opened[-1]
    yield make
    for store in opened:
        store.close()


def failure(verifier: ApiKeyVerifier, key: str, now: float) -> AuthFailure:
    with pytest.raises(AuthFailure) as caught:
        verifier.verify(key, now)
    return caught.value


def wait_for(condition: Callable[[], Any], timeout: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


# -- the same behaviours as the SQLite store -------------------------------------------------


def test_store_roundtrip_and_compare_and_set(open_store):
    store = open_store()
    record = KeyRecord(id="aaaaaaaaaaaa", name="svc", hash=b"h" * 32, scopes=("a", "b"),
                       roles=("r",), created_at=1718000000.123456, expires_at=10.0)
    store.create(record)
    with pytest.raises(DuplicateKeyId):
        store.create(record)
    assert store.get("aaaaaaaaaaaa") == record  # floats and bytes round-trip exactly
    assert store.get("bbbbbbbbbbbb") is None
    assert store.set_expiry("aaaaaaaaaaaa", 5.0, "cccccccccccc")
    assert not store.set_expiry("aaaaaaaaaaaa", 6.0, "dddddddddddd")  # already rotated
    assert store.get("aaaaaaaaaaaa").expires_at == 5.0
    assert store.revoke("aaaaaaaaaaaa", 7.0)
    assert not store.revoke("aaaaaaaaaaaa", 8.0)  # the first revocation time is kept
    assert store.get("aaaaaaaaaaaa").revoked_at == 7.0
    assert not store.revoke("bbbbbbbbbbbb", 8.0)
    assert not store.set_expiry("bbbbbbbbbbbb", 1.0, None)
    fresh = KeyRecord(id="eeeeeeeeeeee", name="x", hash=b"e" * 32, created_at=0.5)
    store.create(fresh)
    assert not store.set_expiry("aaaaaaaaaaaa", 9.0, None)  # revoked: no rotation
    assert [r.id for r in store.list()] == ["eeeeeeeeeeee", "aaaaaaaaaaaa"]  # oldest first
    other = open_store()
    assert other.get("aaaaaaaaaaaa") == store.get("aaaaaaaaaaaa")
    assert "hash" not in repr(record)


def test_changed_sees_other_connections_only(open_store):
    store = open_store()
    assert not store.changed()
    issue_key(store, PEPPER, name="own", now=time.time(), expires_at=None)
    assert not store.changed()  # its own writes are not news
    other = open_store()
    issue_key(other, PEPPER, name="other", now=time.time(), expires_at=None)
    assert store.changed()
    assert not store.changed()
    assert {r.name for r in store.list()} == {"own", "other"}


def test_revocation_in_another_connection_seen_after_one_poll(open_store):
    store = open_store()
    now = time.time()
    key, record = issue_key(store, PEPPER, name="svc", now=now, expires_at=None)
    verifier = ApiKeyVerifier(store, PEPPER, 3600.0, "k")
    assert verifier.verify(key, now).subject == "svc"
    assert not verifier.poll()
    assert open_store().revoke(record.id, time.time())
    assert verifier.verify(key, now).subject == "svc"  # still cached until the poll
    assert verifier.poll()
    error = failure(verifier, key, now)
    assert (error.reason, error.key_id, error.subject) == ("api-key-revoked", record.id, "svc")


def test_concurrent_rotations_and_revocations_have_one_winner(open_store):
    setup = open_store()
    record = KeyRecord(id="aaaaaaaaaaaa", name="svc", hash=b"h" * 32, created_at=1.0)
    setup.create(record)
    stores = [open_store() for _ in range(8)]
    results: list[tuple[str, bool]] = []
    barrier = threading.Barrier(len(stores))

    def rotate(index: int) -> None:
        barrier.wait()
        successor = chr(ord("b") + index) * 12
        results.append((successor, stores[index].set_expiry(record.id, 100.0 + index,
                                                            successor)))

    threads = [threading.Thread(target=rotate, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [successor for successor, won in results if won]
    assert len(winners) == 1
    assert setup.get(record.id).rotated_to == winners[0]

    revoked: list[bool] = []
    barrier = threading.Barrier(len(stores))

    def revoke(index: int) -> None:
        barrier.wait()
        revoked.append(stores[index].revoke(record.id, 1000.0 + index))

    threads = [threading.Thread(target=revoke, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert revoked.count(True) == 1
    assert 1000.0 <= setup.get(record.id).revoked_at < 1000.0 + len(stores)


# -- Redis only ----------------------------------------------------------------------------


def test_redis_holds_only_the_peppered_hash(redis_server):
    namespace = f"test-{uuid.uuid4().hex}"
    with RedisKeyStore(redis_server.url, namespace=namespace, background=False) as store:
        key, record = issue_key(store, PEPPER, name="svc", now=time.time(), expires_at=None)
    raw = redis.Redis.from_url(redis_server.url).hgetall(f"{namespace}:keys")
    data = b"".join([*raw.keys(), *raw.values()])
    assert key.encode() not in data and key[17:].encode() not in data
    assert record.hash.hex().encode() in data  # the check looks at the right bytes


def test_redis_gateway_store_reads_from_memory(tmp_path, caplog):
    with running_redis(tmp_path) as server:
        gateway = RedisKeyStore(server.url, poll_interval=0.05)
        cli = RedisKeyStore(server.url, background=False)
        try:
            now = time.time()
            key, record = issue_key(cli, PEPPER, name="svc", now=now, expires_at=None)
            started = time.monotonic()
            wait_for(gateway.changed)  # the thread loaded the CLI's write
            assert time.monotonic() - started < 1.0
            verifier = ApiKeyVerifier(gateway, PEPPER, 0.001, "k")  # no caching to speak of
            assert verifier.verify(key, now).key_id == record.id
            caplog.set_level(logging.WARNING, logger="apishield.state")
            server.stop()
            time.sleep(0.2)
            # Redis is down: keys still verify from the mirror, the poll does not fail,
            # and nothing waits on the network
            started = time.monotonic()
            for _ in range(100):
                assert verifier.verify(key, time.time()).subject == "svc"
                assert not gateway.changed()
            assert time.monotonic() - started < 0.5
            with pytest.raises(KeyStoreError):  # the CLI, which talks to Redis, fails
                cli.revoke(record.id, time.time())
            assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1
            server.start()  # empty: the test server does not persist
            wait_for(gateway.changed)
            assert failure(verifier, key, time.time()).reason == "api-key-unknown"
        finally:
            gateway.close()
            cli.close()


def test_redis_store_that_never_loaded_refuses_to_answer(tmp_path):
    url = "redis://:hunter2@127.0.0.1:1/0"
    with pytest.raises(KeyStoreError) as caught:
        RedisKeyStore(url, background=False)
    assert "hunter2" not in str(caught.value)
    gateway = RedisKeyStore(url, poll_interval=0.05)
    try:
        with pytest.raises(KeyStoreError, match="not loaded yet"):
            gateway.get("aaaaaaaaaaaa")  # 503, never a 401 or a pass
        assert not gateway.changed()
    finally:
        gateway.close()


def test_open_picks_the_backend(tmp_path, redis_server, monkeypatch):
    (tmp_path / "c.yaml").write_text("contract: contract.yaml\n")
    sqlite_config = load_config(tmp_path / "c.yaml")
    keys, bans = open_key_store(sqlite_config), open_ban_store(sqlite_config)
    assert isinstance(keys, SqliteKeyStore) and isinstance(bans, SqliteBanStore)
    assert keys.path == bans.path == tmp_path / "apishield-state.db"
    keys.close()
    bans.close()

    (tmp_path / "r.yaml").write_text(f"contract: contract.yaml\nstate: {redis_server.url}\n")
    redis_config = load_config(tmp_path / "r.yaml")
    with pytest.raises(ConfigError, match=r"auth\.api_keys\.pepper: required with state: redis"):
        open_key_store(redis_config)
    bans = open_ban_store(redis_config)
    assert isinstance(bans, RedisBanStore) and bans.background
    bans.close()
    (tmp_path / "p.yaml").write_text(f"contract: contract.yaml\nstate: {redis_server.url}\n"
                                     "auth: {api_keys: {pepper: {env: PEPPER}}}\n")
    keys = open_key_store(load_config(tmp_path / "p.yaml"), background=False)
    assert isinstance(keys, RedisKeyStore) and not keys.background
    keys.close()
    (tmp_path / "bad.yaml").write_text("contract: contract.yaml\n"
                                       "state: 'redis://:pw@127.0.0.1:notaport/0'\n")
    with pytest.raises(ConfigError, match="not a usable Redis URL") as caught:
        open_ban_store(load_config(tmp_path / "bad.yaml"))
    assert ":pw@" not in str(caught.value)


# -- `apishield keys` against Redis --------------------------------------------------------


def redis_config(folder: Path, url: str, pepper: bool = True) -> Path:
    path = folder / "apishield.yaml"
    text = f"contract: contract.yaml\nstate: {url}\n"
    if pepper:
        text += "auth: {api_keys: {pepper: {env: APISHIELD_TEST_PEPPER}}}\n"
    path.write_text(text)
    return path


def keys(config_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apishield", "keys", *args, "--config", str(config_file)],
        capture_output=True, text=True, timeout=30, env=ENV, check=False,
    )


def test_keys_cli_with_redis_state(redis_server, tmp_path):
    config_file = redis_config(tmp_path, redis_server.url.replace("/0", "/5"))
    redis.Redis.from_url(redis_server.url.replace("/0", "/5")).flushdb()
    store = RedisKeyStore(redis_server.url.replace("/0", "/5"), background=False)
    try:
        created = keys(config_file, "create", "--name", "billing", "--scope", "reports")
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()
        verifier = ApiKeyVerifier(store, PEPPER_TEXT.encode(), 3600.0, "k")
        assert verifier.poll()  # another process wrote
        assert verifier.verify(key, time.time()).scopes == frozenset({"reports"})
        rotated = keys(config_file, "rotate", parse_key(key), "--grace", "1h")
        assert rotated.returncode == 0, rotated.stderr
        listed = json.loads(keys(config_file, "list", "--json").stdout)
        assert sorted(row["state"] for row in listed) == ["active", "rotating"]
        assert not (tmp_path / "redis:").exists()  # no stray files named after the URL
        revoked = keys(config_file, "revoke", parse_key(key))
        assert revoked.returncode == 0, revoked.stderr
        assert verifier.poll()
        assert failure(verifier, key, time.time()).reason == "api-key-revoked"
        no_pepper = keys(redis_config(tmp_path / "..", redis_server.url, pepper=False), "list")
        assert no_pepper.returncode == 2 and "auth.api_keys.pepper" in no_pepper.stderr
        down = keys(redis_config(tmp_path, "redis://127.0.0.1:1/0"), "list")
        assert down.returncode == 1 and "the key store failed" in down.stderr
    finally:
        store.close()


# -- a real gateway sharing keys and bans through Redis --------------------------------------

GATEWAY_CONTRACT = """
openapi: 3.1.0
info: {title: redis state, version: "1"}
paths:
  /echo/key:
    get:
      operationId: key
      security: [{apiKey: []}]
      responses: {"200": {description: ok}}
components:
  securitySchemes:
    apiKey: {type: apiKey, in: header, name: X-Api-Key}
"""


def test_gateway_shares_keys_and_bans_through_redis(redis_server, tmp_path, upstream_url,
                                                    monkeypatch):
    monkeypatch.setenv("APISHIELD_TEST_PEPPER", PEPPER_TEXT)
    url = redis_server.url.replace("/0", "/6")
    contract = tmp_path / "redis-contract.yaml"
    contract.write_text(GATEWAY_CONTRACT)
    gateway = start_gateway(tmp_path, upstream_url, {
        "state": url, "auth": {"api_keys": {"pepper": {"env": "APISHIELD_TEST_PEPPER"}}},
    }, contract=contract)
    try:
        created = keys(gateway.config_path, "create", "--name", "svc")
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()
        endpoint = f"{gateway.url}/echo/key"
        wait_for(lambda: httpx.get(endpoint, headers={"X-Api-Key": key}).status_code == 200)
        banned = subprocess.run(
            [sys.executable, "-m", "apishield", "bans", "add", "--ip", "127.0.0.1",
             "--duration", "1h", "--config", str(gateway.config_path)],
            capture_output=True, text=True, timeout=30, env=ENV, check=False)
        assert banned.returncode == 0, banned.stderr
        started = time.monotonic()
        response = wait_for(lambda: (r := httpx.get(endpoint, headers={"X-Api-Key": key}))
                            .status_code == 403 and r)
        assert time.monotonic() - started < 2.5
        assert response.headers["content-type"].startswith("application/problem+json")
        assert "client-banned" in response.text and int(response.headers["retry-after"]) > 3000
        lifted = subprocess.run(
            [sys.executable, "-m", "apishield", "bans", "remove", "--ip", "127.0.0.1",
             "--config", str(gateway.config_path)],
            capture_output=True, text=True, timeout=30, env=ENV, check=False)
        assert lifted.returncode == 0, lifted.stderr
        wait_for(lambda: httpx.get(endpoint, headers={"X-Api-Key": key}).status_code == 200)
        assert keys(gateway.config_path, "revoke", parse_key(key)).returncode == 0
        wait_for(lambda: httpx.get(endpoint, headers={"X-Api-Key": key}).status_code == 401)
    finally:
        gateway.stop()
