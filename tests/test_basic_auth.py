"""HTTP Basic against apishield's user store (issue 16, part 2): the real `apishield users`
CLI, real Argon2id, the real SQLite (and Redis) store, and a real gateway in front of the
test upstream with Basic as one alternative of several."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from argon2 import extract_parameters

from apishield.auth.basic import (
    Attempt,
    BasicVerifier,
    PasswordPool,
    hash_password,
    parse_basic,
)
from apishield.auth.principal import AuthFailure, Principal
from apishield.config import Argon2, Basic, config_from_dict
from apishield.problems import ServiceUnavailable
from apishield.state.sqlite_users import SqliteUserStore
from apishield.state.users import DuplicateUser, UserRecord
from tests.conftest import RunningGateway, json_lines, wait_for

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
FAST = Argon2(time_cost=1, memory_kib=8192, parallelism=1)  # unit tests: a few ms a check
JWT_SECRET = "basic-tests-" + "s3cr3t-" * 5  # 47 bytes, HS256

CONTRACT = """
openapi: 3.0.3
info: {title: basic alternatives, version: "1"}
components:
  securitySchemes:
    bearerAuth: {type: http, scheme: bearer}
    basicAuth: {type: http, scheme: basic}
    keyAuth: {type: apiKey, in: header, name: X-Api-Key}
security:
  - bearerAuth: []
  - basicAuth: []
  - keyAuth: []
paths:
  /echo:
    get:
      operationId: echo
      x-apishield: {strict: false}
      responses: {"200": {description: ok}}
  /slow:
    get:
      operationId: slow
      security: []
      parameters: [{name: ms, in: query, schema: {type: integer, minimum: 0}}]
      responses: {"200": {description: ok}}
"""


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def users_cli(config: Path, *args: str, stdin: str | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apishield", "users", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=120, env=ENV, check=False, input=stdin)


def create_user(config: Path, name: str, *extra: str) -> str:
    done = users_cli(config, "create", name, *extra)
    assert done.returncode == 0, done.stderr
    password = done.stdout.strip()
    assert len(password) == 32 and "\n" not in password
    return password


def start(make_gateway: Any, tmp_path: Path, overrides: dict[str, Any] | None = None,
          contract: str = CONTRACT) -> RunningGateway:
    path = tmp_path / "basic-contract.yaml"
    path.write_text(contract)
    (tmp_path / "jwt.secret").write_text(JWT_SECRET)
    auth = {"issuers": {"app": {
        "issuer": "https://app.example", "audiences": ["api"], "algorithms": ["HS256"],
        "shared_secret": {"file": str(tmp_path / "jwt.secret")}}}}
    settings: dict[str, Any] = {"auth": auth}
    for key, value in (overrides or {}).items():
        if key == "auth":
            settings["auth"] = {**auth, **value}
        else:
            settings[key] = value
    return make_gateway(settings, contract=path)


# -- parsing and the store ----------------------------------------------------------------

def test_parse_basic_is_strict() -> None:
    token = base64.b64encode("alice:pa:ss wörd".encode()).decode()
    assert parse_basic(token) == ("alice", "pa:ss wörd")  # the first colon splits
    assert parse_basic(base64.b64encode(b"bob:").decode()) == ("bob", "")
    for junk in ("bm9jb2xvbg==",  # "nocolon"
                 base64.b64encode(b":nouser").decode(),
                 base64.b64encode(b"\xff\xfe:x").decode(),  # not UTF-8
                 base64.b64encode(b"a\x01b:x").decode(),  # control character in the user
                 "YWxpY2U6eA",  # padding missing
                 "YWxp Y2U6eA==", "!!!!"):
        with pytest.raises(AuthFailure) as caught:
            parse_basic(junk)
        assert caught.value.reason == "basic-malformed"


def test_store_keeps_the_phc_string_and_one_live_user_per_name(tmp_path: Path) -> None:
    with SqliteUserStore(tmp_path / "state.db") as store:
        hashed = hash_password("correct horse battery", FAST)
        params = extract_parameters(hashed)
        assert hashed.startswith("$argon2id$") and params.memory_cost == 8192
        record = UserRecord(name="alice", hash=hashed, roles=("admin",), created_at=1.0,
                            changed_at=1.0)
        store.create(record)
        assert "argon2" not in repr(store.get("alice"))  # the hash never in a repr
        with pytest.raises(DuplicateUser):
            store.create(record)
        assert store.set_password("alice", "$argon2id$new", 2.0, None)
        assert store.revoke("alice", 3.0) and not store.revoke("alice", 4.0)
        assert not store.set_password("alice", "$argon2id$newer", 5.0, None)
        revoked = store.get("alice")
        assert revoked is not None and revoked.revoked_at == 3.0 and revoked.state(9) == "revoked"
        store.create(record)  # a revoked name can be given to a new user
        again = store.get("alice")
        assert again is not None and again.revoked_at is None and again.hash == hashed


# -- the verifier: caching, bounds, timing ---------------------------------------------------

def make_verifier(tmp_path: Path, **settings: Any) -> tuple[SqliteUserStore, BasicVerifier]:
    store = SqliteUserStore(tmp_path / "state.db")
    config = Basic(argon2=FAST, **settings)
    return store, BasicVerifier(store, PasswordPool(config), config, "basicAuth")


def add_user(store: SqliteUserStore, name: str, password: str, params: Argon2 = FAST,
             **fields: Any) -> None:
    store.create(UserRecord(name=name, hash=hash_password(password, params),
                            created_at=time.time(), changed_at=time.time(), **fields))


async def check(verifier: BasicVerifier, user: str, password: str) -> Any:
    """What the authenticator does: the cache, else a check whose outcome is returned."""
    credential = base64.b64encode(f"{user}:{password}".encode()).decode()
    key = verifier.cache_key(credential)
    cached = verifier.cached(key, time.time())
    if cached is not None:
        return cached
    attempt = Attempt(key)
    await verifier.verify(attempt, user, password)
    return attempt.outcome


def test_outcomes_are_cached_by_hmac_and_cleared_when_the_store_changes(tmp_path: Path) -> None:
    store, verifier = make_verifier(tmp_path, cache_ttl=60, failure_ttl=60)

    async def scenario() -> None:
        add_user(store, "alice", "correct horse battery", roles=("admin",), scopes=("r",))
        first = await check(verifier, "alice", "correct horse battery")
        assert isinstance(first, Principal)
        assert (first.subject, first.roles, first.scopes) == ("alice", {"admin"}, {"r"})
        for _ in range(5):
            assert await check(verifier, "alice", "correct horse battery") is first
        wrong = await check(verifier, "alice", "wrong horse battery")
        assert isinstance(wrong, AuthFailure) and wrong.reason == "basic-wrong-password"
        assert wrong.subject == "alice"
        for _ in range(5):
            again = await check(verifier, "alice", "wrong horse battery")
            assert again.reason == "basic-wrong-password"
        assert verifier.checks == 2  # one per distinct header, however often it comes
        # the cache keys are HMACs under a per-process key, never the password
        assert all(len(key) == 32 for key in verifier._successes)
        verifier.clear()  # what the gateway does when the store reports a write
        assert await check(verifier, "alice", "correct horse battery") is not first
        assert verifier.checks == 3

    try:
        asyncio.run(scenario())
    finally:
        verifier.pool.close()
        store.close()


def test_precise_reasons_and_password_first(tmp_path: Path) -> None:
    store, verifier = make_verifier(tmp_path)

    async def scenario() -> dict[str, Any]:
        now = time.time()
        add_user(store, "gone", "correct horse battery", revoked_at=now)
        add_user(store, "old", "correct horse battery", expires_at=now - 1)
        return {
            "unknown": await check(verifier, "nobody", "correct horse battery"),
            "revoked": await check(verifier, "gone", "correct horse battery"),
            "revoked-wrong": await check(verifier, "gone", "guess guess guess"),
            "expired": await check(verifier, "old", "correct horse battery"),
        }

    try:
        found = asyncio.run(scenario())
    finally:
        verifier.pool.close()
        store.close()
    assert found["unknown"].reason == "basic-unknown-user"
    assert found["unknown"].subject is None  # a name matching no user is never logged
    assert found["revoked"].reason == "basic-revoked"
    # revocation is only told to someone who knows the password
    assert found["revoked-wrong"].reason == "basic-wrong-password"
    assert found["expired"].reason == "basic-expired"


def test_an_unknown_user_costs_a_full_check(tmp_path: Path) -> None:
    """A dummy hash of the configured cost: an unknown name is not answered faster."""
    slow = Argon2(time_cost=8, memory_kib=19456, parallelism=1)
    store = SqliteUserStore(tmp_path / "state.db")
    config = Basic(argon2=slow)
    verifier = BasicVerifier(store, PasswordPool(config), config, "basicAuth")

    async def timed(user: str, password: str) -> float:
        started = time.perf_counter()
        await check(verifier, user, password)
        return time.perf_counter() - started

    async def scenario() -> tuple[float, float]:
        add_user(store, "alice", "correct horse battery", params=slow)
        await timed("nobody0", "warm up the dummy")  # the dummy hash is made once
        known = min([await timed("alice", f"wrong guess {i}") for i in range(3)])
        unknown = min([await timed(f"nobody{i}", f"wrong guess {i}") for i in range(1, 4)])
        return known, unknown

    try:
        known, unknown = asyncio.run(scenario())
    finally:
        verifier.pool.close()
        store.close()
    assert unknown > 0.5 * known, (known, unknown)


def test_checks_are_bounded_and_the_excess_is_503(tmp_path: Path) -> None:
    slow = Argon2(time_cost=6, memory_kib=19456, parallelism=1)
    store = SqliteUserStore(tmp_path / "state.db")
    config = Basic(argon2=slow, max_concurrent=1, max_waiting=2)
    pool = PasswordPool(config)
    verifier = BasicVerifier(store, pool, config, "basicAuth")

    async def scenario() -> list[Any]:
        add_user(store, "alice", "correct horse battery", params=slow)
        running: list[int] = []
        peak = 0
        original = verifier._check_sync

        def counted(user: str, password: str) -> Any:
            nonlocal peak
            running.append(1)
            peak = max(peak, len(running))
            try:
                return original(user, password)
            finally:
                running.pop()

        verifier._check_sync = counted  # type: ignore[method-assign]
        # one user guessing 3 passwords at once: one runs, one waits, the third is refused
        # at once; 2 other users take the last waiting place and are refused past it
        outcomes = await asyncio.gather(
            *(check(verifier, "alice", f"guess number {i}") for i in range(3)),
            *(check(verifier, f"user{i}", "guess") for i in range(2)))
        assert peak == 1  # never more checks at once than max_concurrent
        return outcomes

    try:
        outcomes = asyncio.run(scenario())
    finally:
        pool.close()
        store.close()
    busy = [o for o in outcomes if isinstance(o, ServiceUnavailable)]
    assert [o.reason for o in busy] == ["basic-busy", "basic-busy"]
    assert all((b"retry-after", b"1") in o.headers for o in busy)
    assert isinstance(outcomes[2], ServiceUnavailable)  # alice's third guess
    assert isinstance(outcomes[4], ServiceUnavailable)  # the line was full
    assert [o.reason for o in outcomes if isinstance(o, AuthFailure)] == [
        "basic-wrong-password", "basic-wrong-password", "basic-unknown-user"]
    assert pool.pending == 0 and not pool._users


# -- the gateway ---------------------------------------------------------------------------

def test_basic_is_one_alternative_of_several(make_gateway: Any, tmp_path: Path) -> None:
    gateway = start(make_gateway, tmp_path)
    password = create_user(gateway.config_path, "alice", "--role", "admin", "--scope",
                           "orders:read")
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        missing = client.get("/echo")
        assert missing.status_code == 401
        challenges = missing.headers.get_list("www-authenticate")
        assert 'Basic realm="api", charset="UTF-8"' in challenges
        assert any(c.startswith("Bearer ") for c in challenges)

        ok = client.get("/echo", headers=basic("alice", password))
        assert ok.status_code == 200
        seen = {k.lower(): v for k, v in ok.json()["headers"]}
        assert seen["x-apishield-subject"] == "alice"
        assert seen["x-apishield-roles"] == "admin"
        assert seen["x-apishield-scopes"] == "orders:read"

        token = jwt.encode({"iss": "https://app.example", "aud": "api", "sub": "carol",
                            "exp": int(time.time()) + 300, "iat": int(time.time())},
                           JWT_SECRET, algorithm="HS256")
        bearer = client.get("/echo", headers={"Authorization": f"Bearer {token}"})
        assert bearer.status_code == 200  # the other alternatives still work

        answers = [client.get("/echo", headers=headers) for headers in (
            basic("alice", "not the password"), basic("mallory", "not the password"),
            {"Authorization": "Basic !!notbase64!!"})]
    assert {a.status_code for a in answers} == {401}
    bodies = [{k: v for k, v in a.json().items() if k != "instance"} for a in answers]
    assert bodies[0] == bodies[1] == bodies[2]  # the same answer for every reason
    assert len({a.headers["www-authenticate"] for a in answers}) == 1
    failures = wait_for(lambda: len(gateway.security_events("authn-failure")) >= 3 and
                        gateway.security_events("authn-failure"))
    by_reason = {e["reason"]: e for e in failures}
    assert set(by_reason) == {"basic-wrong-password", "basic-unknown-user", "basic-malformed"}
    assert by_reason["basic-wrong-password"]["subject"] == "alice"
    assert "subject" not in by_reason["basic-unknown-user"]
    assert by_reason["basic-wrong-password"]["scheme"] == "basicAuth"


def test_revoke_and_rotate_reach_a_running_gateway(make_gateway: Any, tmp_path: Path) -> None:
    gateway = start(make_gateway, tmp_path, {"auth": {"basic": {"cache_ttl": "1h"}}})
    config = gateway.config_path
    done = users_cli(config, "create", "bob", "--password-stdin", "--expires-in", "30d",
                     stdin="a long chosen password\n")
    assert done.returncode == 0 and done.stdout == ""  # a chosen password is not echoed
    audit = json_lines(done.stderr, "audit")
    assert audit[0]["event"] == "basic-user-created" and audit[0]["user"] == "bob"
    assert "a long chosen password" not in done.stderr
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        assert client.get("/echo", headers=basic("bob", "a long chosen password")
                          ).status_code == 200
        new = users_cli(config, "rotate", "bob").stdout.strip()
        # cached for an hour, but the store's write clears the cache within about a second
        assert wait_for(lambda: client.get("/echo", headers=basic(
            "bob", "a long chosen password")).status_code == 401)
        assert client.get("/echo", headers=basic("bob", new)).status_code == 200
        assert users_cli(config, "revoke", "bob").returncode == 0
        assert wait_for(lambda: client.get("/echo", headers=basic("bob", new)
                                           ).status_code == 401)
    listed = json.loads(users_cli(config, "list", "--json").stdout)
    assert [(u["name"], u["state"]) for u in listed] == [("bob", "revoked")]
    assert listed[0]["expires_at"] is not None  # rotation kept the 30-day lifetime
    reasons = [e["reason"] for e in gateway.security_events("authn-failure")]
    assert reasons[-1] == "basic-revoked"


def test_users_cli_refuses_what_basic_cannot_carry(tmp_path: Path) -> None:
    config = tmp_path / "apishield.yaml"
    config.write_text("contract: contract.yaml\n")
    colon = users_cli(config, "create", "a:b")
    assert colon.returncode == 1 and "':'" in colon.stderr
    short = users_cli(config, "create", "alice", "--password-stdin", stdin="short\n")
    assert short.returncode == 1 and "shorter than 12" in short.stderr
    unknown = users_cli(config, "rotate", "nobody")
    assert unknown.returncode == 1 and "no Basic user" in unknown.stderr
    assert not (tmp_path / "apishield-state.db").exists()  # reading created nothing
    assert users_cli(config, "create", "alice").returncode == 0
    twice = users_cli(config, "create", "alice")
    assert twice.returncode == 1 and "users rotate alice" in twice.stderr


def test_a_slow_check_does_not_block_other_requests(make_gateway: Any, tmp_path: Path) -> None:
    """About two seconds of Argon2 per check: the event loop keeps answering meanwhile."""
    gateway = start(make_gateway, tmp_path, {"auth": {"basic": {
        "argon2": {"time_cost": 40, "memory_kib": 65536}}}})
    password = create_user(gateway.config_path, "alice")
    done = threading.Event()
    result: dict[str, Any] = {}

    def slow_login() -> None:
        with httpx.Client(base_url=gateway.url, timeout=60) as client:
            started = time.monotonic()
            result["status"] = client.get("/echo", headers=basic("alice", password)
                                          ).status_code
            result["seconds"] = time.monotonic() - started
        done.set()

    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        assert client.get("/slow").status_code == 200  # connections warm
        thread = threading.Thread(target=slow_login)
        thread.start()
        time.sleep(0.2)  # the check is running on a pool thread now
        public = client.get("/slow")
        answered_during_check = not done.is_set()
        thread.join(60)
    assert public.status_code == 200
    assert result["status"] == 200
    assert answered_during_check, result
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        started = time.monotonic()
        for _ in range(5):  # the same header again: from the cache, no new check
            assert client.get("/echo", headers=basic("alice", password)).status_code == 200
        cached = time.monotonic() - started
    assert cached < result["seconds"], (cached, result)  # five requests, no new check


def test_bans_stop_an_ip_guessing_passwords(make_gateway: Any, tmp_path: Path) -> None:
    gateway = start(make_gateway, tmp_path, {"rate_limiting": {"bans": {"rules": [{
        "name": "guessing", "on": "authn-failure", "threshold": 3, "window": "1m",
        "duration": "10m"}]}}})
    password = create_user(gateway.config_path, "alice")
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        guesses = [client.get("/echo", headers=basic("alice", f"guess number {i}"))
                   for i in range(3)]
        assert [g.status_code for g in guesses] == [401, 401, 401]
        banned = wait_for(lambda: client.get("/echo", headers=basic("alice", password)
                                             ).status_code == 403)
        assert banned  # even the right password: the address is banned
        assert client.get("/echo", headers=basic("alice", password)
                          ).json()["type"].endswith("client-banned")
    bans = wait_for(lambda: [e for e in gateway.security_events("ban")])
    assert bans[0]["rule"] == "guessing" and bans[0]["target"] == "ip"


def test_every_thread_busy_is_a_503_with_retry_after(make_gateway: Any, tmp_path: Path) -> None:
    gateway = start(make_gateway, tmp_path, {"auth": {"basic": {
        "max_concurrent": 1, "max_waiting": 0,
        "argon2": {"time_cost": 40, "memory_kib": 65536}}}})
    create_user(gateway.config_path, "alice")
    answers: list[httpx.Response] = []

    def guess(user: str) -> None:
        with httpx.Client(base_url=gateway.url, timeout=60) as client:
            answers.append(client.get("/echo", headers=basic(user, "some wrong guess")))

    threads = [threading.Thread(target=guess, args=(f"user{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join(60)
    statuses = sorted(a.status_code for a in answers)
    assert statuses[0] == 401 and 503 in statuses, statuses
    busy = next(a for a in answers if a.status_code == 503)
    assert busy.headers["retry-after"] == "1"


def test_check_accepts_basic_and_config_models_load(tmp_path: Path) -> None:
    config = config_from_dict({"contract": "c.yaml", "auth": {"basic": {
        "cache_ttl": "10s", "failure_ttl": "2s", "argon2": {"memory_kib": 65536}}}},
        source_dir=tmp_path)
    assert config.auth.basic.cache_ttl == 10 and config.auth.basic.argon2.time_cost == 2


# -- Redis ------------------------------------------------------------------------------------

def test_users_on_redis_through_cli_and_gateway(make_gateway: Any, tmp_path: Path,
                                                redis_server: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # the contract's apiKey scheme needs the pepper every instance shares on Redis
    monkeypatch.setenv("APISHIELD_TEST_PEPPER", "basic-tests-pepper-0123456789")
    gateway = start(make_gateway, tmp_path, {"state": redis_server.url, "auth": {
        "api_keys": {"pepper": {"env": "APISHIELD_TEST_PEPPER"}}}})
    password = create_user(gateway.config_path, "alice", "--role", "ops")
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        # the gateway's mirror follows Redis within a poll interval
        def admitted() -> httpx.Response | None:
            answer = client.get("/echo", headers=basic("alice", password))
            return answer if answer.status_code == 200 else None

        ok = wait_for(admitted)
        assert ok is not None
        seen = {k.lower(): v for k, v in ok.json()["headers"]}
        assert seen["x-apishield-roles"] == "ops"
        assert users_cli(gateway.config_path, "revoke", "alice").returncode == 0
        assert wait_for(lambda: client.get("/echo", headers=basic("alice", password)
                                           ).status_code == 401)
    listed = json.loads(users_cli(gateway.config_path, "list", "--json").stdout)
    assert [(u["name"], u["state"]) for u in listed] == [("alice", "revoked")]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.redis_server import running_redis

    with running_redis(Path(tmp_path_factory.mktemp("redis"))) as server:
        yield server
