"""The API-key lifecycle (A4, G2, C5): key format, hashing, pepper, the SQLite store, the
verifier and its cache, and the real `apishield keys` CLI run as a subprocess against the
same state file."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from apishield.auth import apikeys
from apishield.auth.apikey_verifier import ApiKeyVerifier
from apishield.auth.apikeys import (
    KEY_LENGTH,
    KEY_PATTERN,
    generate_key,
    hash_key,
    issue_key,
    load_pepper,
    parse_key,
    pepper_path,
)
from apishield.auth.principal import AuthFailure
from apishield.config import Config, ConfigError, load_config
from apishield.state.keys import DuplicateKeyId, KeyRecord
from apishield.state.sqlite import SCHEMA_VERSION, SqliteKeyStore
from tests.conftest import json_lines

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
PEPPER = b"p" * 32


def write_config(folder: Path, extra: str = "") -> Path:
    (folder / "state").mkdir(exist_ok=True)
    path = folder / "apishield.yaml"
    path.write_text(f"contract: contract.yaml\nstate: state/keys.db\n{extra}")
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture
def config(config_file: Path) -> Config:
    return load_config(config_file)


@pytest.fixture
def store(config: Config):
    opened = SqliteKeyStore(config.resolve(config.state))
    yield opened
    opened.close()


def keys(config_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apishield", "keys", *args, "--config", str(config_file)],
        capture_output=True, text=True, timeout=30, env=ENV, check=False,
    )


def failure(verifier: ApiKeyVerifier, key: str, now: float) -> AuthFailure:
    with pytest.raises(AuthFailure) as caught:
        verifier.verify(key, now)
    return caught.value


class CountingStore:
    """A KeyStore wrapper that counts reads (to see the cache work)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gets = 0

    def get(self, key_id: str) -> KeyRecord | None:
        self.gets += 1
        return self.inner.get(key_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class ForbiddenStore:
    """A store that must not be touched."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the store was accessed ({name}) for a malformed key")


# -- key format ----------------------------------------------------------------------------


def test_key_format_entropy_and_unique_ids():
    generated = [generate_key() for _ in range(500)]
    ids = {key_id for key_id, _ in generated}
    secrets_ = {key[17:] for _, key in generated}  # the secret may itself contain "_"
    assert len(ids) == 500 and len(secrets_) == 500
    for key_id, key in generated:
        assert len(key) == KEY_LENGTH == 60
        assert key.startswith(f"ask_{key_id}_")
        assert len(key_id) == 12 and set(key_id) <= set("abcdefghijklmnopqrstuvwxyz234567")
        secret = key[len("ask_") + 13:]
        assert len(secret) == 43
        assert len(base64.urlsafe_b64decode(secret + "=")) == 32  # 256 bits (C5)
        assert parse_key(key) == key_id
        assert KEY_PATTERN.search(f"leaked: {key} in a log").group() == key


def make_malformed() -> list[str]:
    _, key = generate_key()
    body = key[4:]
    non_canonical = key[:-1] + ("B" if key[-1] != "B" else "C")  # last char carries 2 zero bits
    return [
        "", "ask_", "ask", key[:-1], key + "A", key + "\n", " " + key, key.upper(),
        "ASK_" + body, "sk__" + body, "ask-" + body, key.replace("_", "-", 1),
        "ask_" + body[:12] + "-" + body[13:],  # wrong separator
        "ask_" + body[:11] + "1" + body[12:],  # 1 is not base32
        "ask_" + body[:11] + "A" + body[12:],  # upper-case id
        key[:30] + "+" + key[31:], key[:30] + "/" + key[31:], key[:30] + "=" + key[31:],
        key[:30] + "\u0661" + key[31:],  # an Arabic-Indic digit
        key[:30] + "\x00" + key[31:], non_canonical,
        "Bearer " + key, key[:59] + "=", "x" * 60, "a" * 1_000_000,
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln",
    ]


MALFORMED = make_malformed()


# ids by position: the values hold a key generated at collection, and pytest-xdist needs
# every worker to collect the same test ids
@pytest.mark.parametrize("presented", MALFORMED,
                         ids=[f"malformed-{index}" for index in range(len(MALFORMED))])
def test_malformed_keys_refused_without_store_access(presented):
    verifier = ApiKeyVerifier(ForbiddenStore(), PEPPER, 60.0, "apiKey")  # type: ignore[arg-type]
    error = failure(verifier, presented, time.time())
    assert error.reason == "api-key-malformed"
    assert error.key_id is None


# -- store -----------------------------------------------------------------------------------


def test_database_holds_only_the_peppered_hash(store, config):
    now = time.time()
    issued = [issue_key(store, PEPPER, name=f"svc{i}", scopes=("a",), now=now,
                        expires_at=None) for i in range(5)]
    path = config.resolve(config.state)
    for suffix in ("", "-wal"):  # the WAL too, before the checkpoint at close
        data = Path(f"{path}{suffix}").read_bytes() if Path(f"{path}{suffix}").exists() else b""
        for key, _ in issued:
            secret = key[17:]
            assert key.encode() not in data
            assert secret.encode() not in data
            assert base64.urlsafe_b64decode(secret + "=") not in data
    store.close()
    data = path.read_bytes()
    for key, record in issued:
        assert key.encode() not in data and key[17:].encode() not in data
        assert record.hash in data  # the grep looks at the right bytes
        assert record.hash == hash_key(PEPPER, key)
    assert "hash=" not in repr(issued[0][1])


def test_store_roundtrip_and_compare_and_set(store):
    record = KeyRecord(id="aaaaaaaaaaaa", name="svc", hash=b"h" * 32, scopes=("a", "b"),
                       roles=("r",), created_at=1.0, expires_at=10.0)
    store.create(record)
    with pytest.raises(DuplicateKeyId):
        store.create(record)
    assert store.get("aaaaaaaaaaaa") == record
    assert store.get("bbbbbbbbbbbb") is None
    assert store.set_expiry("aaaaaaaaaaaa", 5.0, "cccccccccccc")
    assert not store.set_expiry("aaaaaaaaaaaa", 6.0, "dddddddddddd")  # already rotated
    assert store.get("aaaaaaaaaaaa").expires_at == 5.0
    assert store.revoke("aaaaaaaaaaaa", 7.0)
    assert not store.revoke("aaaaaaaaaaaa", 8.0)  # the first revocation time is kept
    assert store.get("aaaaaaaaaaaa").revoked_at == 7.0
    assert not store.revoke("bbbbbbbbbbbb", 8.0)
    assert [r.id for r in store.list()] == ["aaaaaaaaaaaa"]
    assert "hash" not in repr(record)


def test_store_file_mode_wal_and_schema(store, config):
    path = config.resolve(config.state)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    issue_key(store, PEPPER, name="svc", now=time.time(), expires_at=None)
    wal = Path(f"{path}-wal")
    assert wal.exists() and stat.S_IMODE(wal.stat().st_mode) == 0o600
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version WHERE component = 'api_keys'"
                            ).fetchone()[0] == SCHEMA_VERSION
        conn.execute("UPDATE schema_version SET version = 99")
    store.close()
    with pytest.raises(ConfigError, match="newer apishield"):
        SqliteKeyStore(path)


def test_store_refuses_missing_folder_and_non_database(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        SqliteKeyStore(tmp_path / "nope" / "keys.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ConfigError, match="cannot be used as the apishield state database"):
        SqliteKeyStore(junk)


def test_changed_sees_other_connections_only(store, config):
    assert not store.changed()
    issue_key(store, PEPPER, name="own", now=time.time(), expires_at=None)
    assert not store.changed()  # its own writes are not news
    with SqliteKeyStore(config.resolve(config.state)) as other:
        issue_key(other, PEPPER, name="other", now=time.time(), expires_at=None)
    assert store.changed()
    assert not store.changed()


# -- verifier ------------------------------------------------------------------------------


def test_verify_builds_principal_and_caches(store):
    now = time.time()
    key, record = issue_key(store, PEPPER, name="billing", scopes=("inv:read", "inv:write"),
                            roles=("reader",), now=now, expires_at=now + 3600)
    counting = CountingStore(store)
    verifier = ApiKeyVerifier(counting, PEPPER, 60.0, "apiKeyAuth")  # type: ignore[arg-type]
    principal = verifier.verify(key, now)
    assert principal.scheme == "apiKeyAuth"
    assert principal.subject == "billing"
    assert principal.key_id == record.id
    assert principal.scopes == frozenset({"inv:read", "inv:write"})
    assert principal.roles == frozenset({"reader"})
    assert principal.expires_at == record.expires_at
    assert verifier.verify(key, now + 1) is principal
    assert counting.gets == 1
    again = verifier.verify(key, now + 61)  # past cache_ttl: read again
    assert (again.subject, again.key_id, again.scopes) == (principal.subject,
                                                           principal.key_id, principal.scopes)
    assert counting.gets == 2


def test_unknown_mismatch_and_other_pepper(store):
    now = time.time()
    key, record = issue_key(store, PEPPER, name="svc", now=now, expires_at=None)
    verifier = ApiKeyVerifier(store, PEPPER, 60.0, "k")
    stranger_id, stranger = generate_key()
    error = failure(verifier, stranger, now)
    assert (error.reason, error.key_id) == ("api-key-unknown", stranger_id)
    _, other_secret = generate_key(record.id)  # the right id, another secret
    error = failure(verifier, other_secret, now)
    assert (error.reason, error.key_id, error.subject) == ("api-key-mismatch", record.id, None)
    peppered_elsewhere = ApiKeyVerifier(store, b"q" * 32, 60.0, "k")
    assert failure(peppered_elsewhere, key, now).reason == "api-key-mismatch"
    assert verifier.verify(key, now).subject == "svc"


def test_hash_is_bound_to_the_record_id(store, config):
    now = time.time()
    key_a, a = issue_key(store, PEPPER, name="low", now=now, expires_at=None)
    _, b = issue_key(store, PEPPER, name="high", roles=("admin",), now=now, expires_at=None)
    # someone copies a's hash onto the admin record b and presents a's secret under b's id:
    # the id is part of the HMAC message, so it does not verify
    with sqlite3.connect(config.resolve(config.state)) as conn:
        conn.execute("UPDATE api_keys SET hash = ? WHERE id = ?", (a.hash, b.id))
    forged = f"ask_{b.id}_{key_a[17:]}"
    verifier = ApiKeyVerifier(store, PEPPER, 60.0, "k")
    assert failure(verifier, forged, now).reason == "api-key-mismatch"


def test_constant_time_compare_is_used(store, monkeypatch):
    now = time.time()
    key, _ = issue_key(store, PEPPER, name="svc", now=now, expires_at=None)
    calls: list[tuple[bytes, bytes]] = []
    real = apikeys.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(apikeys.hmac, "compare_digest", spy)
    ApiKeyVerifier(store, PEPPER, 60.0, "k").verify(key, now)
    assert len(calls) == 1 and len(calls[0][0]) == len(calls[0][1]) == 32


def test_expiry_checked_on_every_verify_even_cached(store):
    now = time.time()
    key, record = issue_key(store, PEPPER, name="svc", now=now, expires_at=now + 10)
    verifier = ApiKeyVerifier(store, PEPPER, 3600.0, "k")
    assert verifier.verify(key, now).key_id == record.id
    error = failure(verifier, key, now + 10)  # cached, but expired
    assert (error.reason, error.key_id, error.subject) == ("api-key-expired", record.id, "svc")
    fresh = ApiKeyVerifier(store, PEPPER, 3600.0, "k")
    assert failure(fresh, key, now + 11).reason == "api-key-expired"


def test_cache_is_bounded(store):
    now = time.time()
    issued = [issue_key(store, PEPPER, name=f"s{i}", now=now, expires_at=None)[0]
              for i in range(5)]
    verifier = ApiKeyVerifier(store, PEPPER, 60.0, "k", max_entries=3)
    for key in issued:
        verifier.verify(key, now)
    assert len(verifier) == 3


def test_revocation_in_another_connection_seen_after_one_poll(store, config):
    now = time.time()
    key, record = issue_key(store, PEPPER, name="svc", now=now, expires_at=None)
    verifier = ApiKeyVerifier(store, PEPPER, 3600.0, "k")
    verifier.verify(key, now)
    assert not verifier.poll()
    with SqliteKeyStore(config.resolve(config.state)) as other:
        assert other.revoke(record.id, time.time())
    assert verifier.verify(key, now).subject == "svc"  # still cached until the poll
    assert verifier.poll()
    error = failure(verifier, key, now)
    assert (error.reason, error.key_id, error.subject) == ("api-key-revoked", record.id, "svc")


def test_revocation_by_the_cli_process_seen_after_one_poll(config_file, config, store):
    result = keys(config_file, "create", "--name", "svc")
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    verifier = ApiKeyVerifier(store, load_pepper(config, store), 3600.0, "k")
    assert verifier.poll()  # the create above was another process's write
    now = time.time()
    verifier.verify(key, now)
    result = keys(config_file, "revoke", parse_key(key))
    assert result.returncode == 0, result.stderr
    assert verifier.verify(key, now).subject == "svc"  # cache_ttl is long...
    assert verifier.poll()  # ...but the next poll (within ~1 s in the gateway) drops it
    assert failure(verifier, key, time.time()).reason == "api-key-revoked"


# -- pepper ----------------------------------------------------------------------------------


def test_pepper_file_created_0600_and_reused(config, store):
    path = pepper_path(config)
    assert path == config.resolve("state/keys.db.pepper")
    assert not path.exists()
    first = load_pepper(config, store)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) == 43  # 32 random bytes, base64url
    assert load_pepper(config, store) == first
    assert load_pepper(config, config.resolve(config.state)) == first  # the path form
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_world_readable_pepper_refused(config, store, config_file):
    path = pepper_path(config)
    load_pepper(config, store)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by every user"):
        load_pepper(config, store)
    result = keys(config_file, "create", "--name", "svc")
    assert result.returncode == 2
    assert "readable by every user (mode 0644)" in result.stderr
    assert result.stdout == ""


def test_missing_pepper_with_existing_keys_refused(config, store):
    issue_key(store, load_pepper(config, store), name="svc", now=time.time(), expires_at=None)
    pepper_path(config).unlink()
    with pytest.raises(ConfigError, match=r"missing but 1 API key\(s\) exist"):
        load_pepper(config, store)
    assert not pepper_path(config).exists()  # not silently regenerated


def test_explicit_pepper_from_env_and_file(tmp_path, monkeypatch):
    config = load_config(write_config(tmp_path, "auth: {api_keys: {pepper: {env: PEPPER}}}\n"))
    with SqliteKeyStore(config.resolve(config.state)) as store:
        with pytest.raises(ConfigError, match="PEPPER is not set"):
            load_pepper(config, store)
        monkeypatch.setenv("PEPPER", "short")
        with pytest.raises(ConfigError, match="at least 16"):
            load_pepper(config, store)
        monkeypatch.setenv("PEPPER", "x" * 40)
        assert load_pepper(config, store) == b"x" * 40
        assert not pepper_path(config).exists()
    (tmp_path / "secrets").mkdir()
    secret = tmp_path / "secrets" / "pepper"
    secret.write_bytes(b"y" * 40 + b"\n")
    secret.chmod(0o640)
    config = load_config(write_config(tmp_path, "auth: {api_keys: {pepper: "
                                                "{file: secrets/pepper}}}\n"))
    with SqliteKeyStore(config.resolve(config.state)) as store:
        assert load_pepper(config, store) == b"y" * 40
        secret.chmod(0o604)
        with pytest.raises(ConfigError, match=r"auth\.api_keys\.pepper\.file: .*every user"):
            load_pepper(config, store)


# -- CLI ------------------------------------------------------------------------------------


def test_cli_create_prints_only_the_key_and_audits(config_file, config, store):
    result = keys(config_file, "create", "--name", "billing", "--scope", "inv:read",
                  "--scope", "inv:read", "--role", "reader", "--expires-in", "12h")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    key = lines[0]
    key_id = parse_key(key)
    assert key not in result.stderr and key[17:] not in result.stderr
    audit = json_lines(result.stderr, "audit")
    assert [(a["event"], a["key_id"], a["name"]) for a in audit] == [
        ("api-key-created", key_id, "billing")]
    record = store.get(key_id)
    assert record.scopes == ("inv:read",) and record.roles == ("reader",)
    assert record.expires_at - record.created_at == pytest.approx(12 * 3600)
    assert key_id in result.stderr and record.hash.hex() not in result.stderr
    verifier = ApiKeyVerifier(store, load_pepper(config, store), 60.0, "k")
    assert verifier.verify(key, time.time()).subject == "billing"


def test_cli_create_default_and_no_expiry(config_file, store):
    default = keys(config_file, "create", "--name", "a")
    never = keys(config_file, "create", "--name", "b", "--no-expiry")
    assert default.returncode == never.returncode == 0
    a = store.get(parse_key(default.stdout.strip()))
    b = store.get(parse_key(never.stdout.strip()))
    assert a.expires_at - a.created_at == pytest.approx(90 * 86400)
    assert b.expires_at is None


def test_cli_list_json_has_no_hashes_or_keys(config_file, store):
    created = keys(config_file, "create", "--name", "svc", "--scope", "s", "--role", "r")
    key = created.stdout.strip()
    result = keys(config_file, "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    record = store.get(parse_key(key))
    assert rows == [{
        "id": record.id, "name": "svc", "state": "active", "scopes": ["s"], "roles": ["r"],
        "created_at": rows[0]["created_at"], "expires_at": rows[0]["expires_at"],
        "revoked_at": None, "rotated_to": None,
    }]
    table = subprocess.run(  # --config also before the subcommand
        [sys.executable, "-m", "apishield", "keys", "-c", str(config_file), "list"],
        capture_output=True, text=True, timeout=30, env=ENV, check=False,
    )
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == [
        "ID", "NAME", "STATE", "CREATED", "EXPIRES", "SCOPES", "ROLES"]
    assert table.stdout.splitlines()[1].split()[:3] == [record.id, "svc", "active"]
    for text in (result.stdout, table.stdout):
        assert key[17:] not in text
        assert record.hash.hex() not in text
        assert base64.b64encode(record.hash).decode() not in text
        assert "hash" not in text.lower()


def test_cli_rotate_with_grace(config_file, config, store):
    created = keys(config_file, "create", "--name", "svc", "--scope", "s", "--expires-in",
                   "30d")
    old_key = created.stdout.strip()
    old_id = parse_key(old_key)
    rotated = keys(config_file, "rotate", old_id, "--grace", "1s")
    assert rotated.returncode == 0, rotated.stderr
    new_key = rotated.stdout.strip()
    assert len(rotated.stdout.splitlines()) == 1 and new_key != old_key
    old, new = store.get(old_id), store.get(parse_key(new_key))
    assert old.rotated_to == new.id
    assert (new.name, new.scopes) == ("svc", ("s",))
    assert new.expires_at - new.created_at == pytest.approx(30 * 86400)  # same lifetime
    assert old.expires_at == pytest.approx(new.created_at + 1, abs=0.5)
    verifier = ApiKeyVerifier(store, load_pepper(config, store), 60.0, "k")
    # a moment inside the grace, not the wall clock: on a loaded machine the CLI
    # processes above may take longer than the 1 s grace
    now = new.created_at + 0.5
    assert verifier.verify(old_key, now).key_id == old_id  # both during the grace
    assert verifier.verify(new_key, now).key_id == new.id
    later = old.expires_at + 0.01
    assert failure(verifier, old_key, later).reason == "api-key-expired"
    assert verifier.verify(new_key, later).key_id == new.id
    listed = {row["id"]: row for row in json.loads(keys(config_file, "list", "--json").stdout)}
    assert listed[new.id]["state"] == "active"
    assert listed[old_id]["rotated_to"] == new.id
    again = keys(config_file, "rotate", old_id)
    assert again.returncode == 1
    assert "already rotated" in again.stderr or "expired" in again.stderr
    assert again.stdout == ""


def test_cli_errors_and_exit_codes(config_file, tmp_path):
    empty = keys(config_file, "list")
    assert empty.returncode == 0 and "no API keys" in empty.stderr
    assert not (tmp_path / "state" / "keys.db").exists()  # reading creates nothing
    unknown = keys(config_file, "revoke", "aaaaaaaaaaaa")
    assert unknown.returncode == 1
    assert "no API key with id aaaaaaaaaaaa" in unknown.stderr
    bad_id = keys(config_file, "rotate", "not-an-id")
    assert bad_id.returncode == 1 and "is not an API key id" in bad_id.stderr
    bad_duration = keys(config_file, "create", "--name", "x", "--expires-in", "9 weeks")
    assert bad_duration.returncode == 1 and "is not a duration" in bad_duration.stderr
    zero = keys(config_file, "create", "--name", "x", "--expires-in", "0")
    assert zero.returncode == 1 and "longer than zero" in zero.stderr
    bad_scope = keys(config_file, "create", "--name", "x", "--scope", "a b")
    assert bad_scope.returncode == 1 and "without spaces" in bad_scope.stderr
    both = keys(config_file, "create", "--name", "x", "--expires-in", "1d", "--no-expiry")
    assert both.returncode == 2  # argparse: not allowed together
    assert unknown.stdout == bad_duration.stdout == bad_scope.stdout == ""

    created = keys(config_file, "create", "--name", "svc")
    key = created.stdout.strip()
    revoked = keys(config_file, "revoke", key)  # the whole key is accepted too
    assert revoked.returncode == 0, revoked.stderr
    assert [a["event"] for a in json_lines(revoked.stderr, "audit")] == ["api-key-revoked"]
    assert key not in revoked.stderr and key[17:] not in revoked.stderr
    twice = keys(config_file, "revoke", parse_key(key))
    assert twice.returncode == 0 and "already revoked" in twice.stderr
    rotate_revoked = keys(config_file, "rotate", parse_key(key))
    assert rotate_revoked.returncode == 1 and "revoked" in rotate_revoked.stderr

    broken = tmp_path / "broken.yaml"
    broken.write_text("contract: c.yaml\nauth: {api_keys: {cache_ttl: soon}}\n")
    result = keys(broken, "list")
    assert result.returncode == 2 and "auth.api_keys.cache_ttl" in result.stderr
