"""Redis backends of the key store and the ban store (`state: redis://...`): many gateway
instances and the CLI share API keys, revocations and bans through one Redis server.

Both keep everything the gateway reads in an in-memory mirror, because the gateway reads
on its event loop (`KeyStore.get` on a verifier cache miss, `BanStore.banned` on every
request, `changed()`/`refresh()` once a second) and must never wait on the network there.
The mirrors are small (one record per issued key, one per active ban) and change rarely.

- Layout, under a namespace (default `apishield`): `<ns>:keys` a hash id -> JSON record,
  `<ns>:keys:version` a counter; `<ns>:bans` a hash `kind|value` -> JSON record,
  `<ns>:users` a hash name -> JSON record (Basic users, with a record version `v`) and
  `<ns>:users:version`; `<ns>:bans:history` a hash `kind|value` -> the ban times of the last 30 days
  (space-separated), `<ns>:bans:version` a counter. Every write increments the counter in
  the same transaction, so "did anything change?" is one GET, and a full reload is one
  MULTI (a consistent snapshot). Floats go through Python's JSON (repr), so timestamps
  round-trip exactly.
- Writes are atomic on the server: key updates are compare-and-set with WATCH/MULTI
  (`revoke` keeps the first time; `set_expiry` only on a key neither revoked nor
  rotated), a ban is one Lua script (record, history append + prune, counter).
- `background=True` (the gateway): a daemon thread polls the counter every
  `poll_interval` and reloads the mirror when it moved; ban writes are applied to the
  mirror at once and queued for the thread. `refresh()`/`changed()` only look at what the
  thread did. `background=False` (the CLI, a short process): every call talks to Redis
  directly and errors are raised.
- A Redis outage keeps the last mirror: keys verify and bans apply as they were, bans
  made meanwhile apply locally and are written when Redis answers again; the outage and
  the recovery are logged once each. Nobody can write keys during an outage (the CLI
  fails), so the key mirror misses nothing but what changed in the last poll interval
  before it. A key store that never loaded (Redis down when the gateway started) raises
  `KeyStoreError` from `get`: the gateway answers 503, never 401 and never a pass.
- Sentinel and Cluster URLs (`redis_urls`) work too. On a Cluster the namespace becomes a
  hash tag (`{apishield}:keys`, `{apishield}:bans`, ...): every script and transaction
  here touches several of these keys, which must then share one slot. A single server
  and Sentinel keep the plain names.
- Persistence is Redis's job: run it with AOF (`appendonly yes`), or a restart forgets
  every key and ban (the mirrors then follow: the keys stop verifying).

The URL's password is never logged (`redact_url`).
"""

from __future__ import annotations

import builtins
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import ClassVar, Generic, Literal, Self, TypeVar

import redis

from apishield.config.redis_urls import cluster_namespace, redact_url, sync_client
from apishield.state.bans import (
    HISTORY_SECONDS,
    BanKind,
    BanRecord,
    BanStoreError,
    MemoryBanMirror,
    canonical_value,
)
from apishield.state.keys import DuplicateKeyId, KeyRecord, KeyStoreError
from apishield.state.users import DuplicateUser, UserRecord, UserStoreError

__all__ = ["RedisBanStore", "RedisKeyStore", "RedisUserStore", "connect", "redact_url"]

logger = logging.getLogger("apishield.state")

DEFAULT_NAMESPACE = "apishield"
POLL_INTERVAL = 0.25  # seconds between version probes of the background thread
SOCKET_TIMEOUT = 2.0  # a hung server costs the background thread (or the CLI) this long
CAS_ATTEMPTS = 20  # WATCH retries when another writer touched the key hash meanwhile
MAX_PENDING = 10_000  # ban writes queued during an outage (oldest dropped past this)
PRUNE_EVERY = 60.0  # seconds between deletions of expired bans from Redis
USER_SCHEMA_VERSION = 1  # the `v` of a user record (a newer one is refused, not misread)
PRUNE_BATCH = 500  # hash fields checked per prune script (keeps each script short)

# KEYS: bans, history, version; ARGV: field, record JSON, created_at, history cutoff
_BAN_SCRIPT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local kept = {}
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old then
  local cutoff = tonumber(ARGV[4])
  for stamp in string.gmatch(old, '%S+') do
    if tonumber(stamp) > cutoff then kept[#kept + 1] = stamp end
  end
end
kept[#kept + 1] = ARGV[3]
redis.call('HSET', KEYS[2], ARGV[1], table.concat(kept, ' '))
return redis.call('INCR', KEYS[3])
"""

# KEYS: bans, version; ARGV: field. 0 when there was no such ban, else the new version
_LIFT_SCRIPT = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
return redis.call('INCR', KEYS[2])
"""

# KEYS: a hash; ARGV: field, expected value, ... Deletes the fields still holding the
# expected value (an expired ban or stale history nobody rewrote since it was read).
_PRUNE_SCRIPT = """
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
"""


R = TypeVar("R")

SyncClient = redis.Redis | redis.RedisCluster  # what `redis_urls.sync_client` returns


def connect(url: str) -> SyncClient:
    """A client with bounded timeouts for any Redis `state` URL (single server, Sentinel
    or Cluster: `redis_urls`); StateUrlError (a ValueError) for a malformed URL."""
    return sync_client(url, socket_timeout=SOCKET_TIMEOUT,
                       socket_connect_timeout=SOCKET_TIMEOUT, health_check_interval=30)


class _Follower:
    """Runs `poll` every `interval` seconds on a daemon thread until `stop()`; logs an
    outage once when it starts and once when it ends, never per attempt."""

    def __init__(self, name: str, where: str, poll: Callable[[], object],
                 interval: float, *, failing: bool = False) -> None:
        self._poll = poll
        self._where = where
        self._interval = interval
        self._stopping = threading.Event()
        self.failing = failing  # True when the owner already logged the outage
        self._step_lock = threading.Lock()  # one poll at a time (thread and poll_now)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            self.step()

    def step(self) -> None:
        with self._step_lock:
            self._step()

    def _step(self) -> None:
        try:
            self._poll()
        except (redis.RedisError, OSError) as exc:
            if not self.failing:
                self.failing = True
                logger.warning("state: %s is unreachable (%s); keeping the last known "
                               "keys and bans, retrying", self._where, exc)
            return
        except Exception:  # a bug must not kill the thread silently
            logger.exception("state: polling %s failed", self._where)
            return
        if self.failing:
            self.failing = False
            logger.warning("state: %s is reachable again", self._where)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=SOCKET_TIMEOUT * 3)


# -- API keys -----------------------------------------------------------------------------

def _encode_key(record: KeyRecord) -> str:
    return json.dumps({
        "name": record.name, "hash": record.hash.hex(), "scopes": list(record.scopes),
        "roles": list(record.roles), "created_at": record.created_at,
        "expires_at": record.expires_at, "revoked_at": record.revoked_at,
        "rotated_to": record.rotated_to,
    }, separators=(",", ":"))


def _decode_key(key_id: str, raw: bytes | str) -> KeyRecord:
    data = json.loads(raw)
    return KeyRecord(
        id=key_id, name=data["name"], hash=bytes.fromhex(data["hash"]),
        scopes=tuple(data["scopes"]), roles=tuple(data["roles"]),
        created_at=data["created_at"], expires_at=data["expires_at"],
        revoked_at=data["revoked_at"], rotated_to=data["rotated_to"],
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _MirroredHash(Generic[R]):
    """Records in one Redis hash (id -> JSON) with a version counter, served from an
    in-memory mirror (see the module docstring): the machinery the key store and the user
    store share. A subclass names its hash (`SUFFIX`), its error and how a record is
    encoded, decoded and identified.

    `changed()` is True after a write by another process or connection was loaded (its
    own writes are not news, as with SQLite's data_version)."""

    SUFFIX: ClassVar[str]  # `<ns>:<SUFFIX>` and `<ns>:<SUFFIX>:version`
    LABEL: ClassVar[str]  # for messages: "key store"
    WHAT: ClassVar[str]  # for the outage warning: "API keys"
    ERROR: ClassVar[type[Exception]]

    def _encode(self, record: R) -> str:
        raise NotImplementedError

    def _decode(self, ident: str, raw: bytes | str) -> R:
        raise NotImplementedError

    def _ident(self, record: R) -> str:
        raise NotImplementedError

    def __init__(self, url: str, *, namespace: str = DEFAULT_NAMESPACE, background: bool = True,
                 poll_interval: float = POLL_INTERVAL, client: SyncClient | None = None
                 ) -> None:
        self.where = redact_url(url)
        self.background = background
        self._client = client if client is not None else connect(url)
        namespace = cluster_namespace(url, namespace)  # Cluster: `{ns}`, one hash slot
        self._hash = f"{namespace}:{self.SUFFIX}"
        self._version_key = f"{namespace}:{self.SUFFIX}:version"
        self._lock = threading.Lock()
        self._records: dict[str, R] | None = None  # None: never loaded
        self._version: int | None = None
        self._dirty = False  # a write of ours was interleaved with someone else's
        self._news = False
        self._follower: _Follower | None = None
        failing = False
        try:
            self._reload()
        except redis.RedisError as exc:
            if not background:
                self._client.close()
                raise self.ERROR(f"{self.LABEL} {self.where}: {exc}") from None
            failing = True
            logger.warning("state: %s is unreachable (%s); %s cannot be verified "
                           "until it answers", self.where, exc, self.WHAT)
        self._news = False
        if background:
            self._follower = _Follower(f"apishield-redis-{self.SUFFIX}", self.where,
                                       self._poll, poll_interval, failing=failing)

    # -- mirror --------------------------------------------------------------------------

    def _reload(self) -> None:
        with self._client.pipeline(transaction=True) as pipe:
            pipe.get(self._version_key)
            pipe.hgetall(self._hash)
            raw_version, raw_records = pipe.execute()
        records = {_text(ident): self._decode(_text(ident), raw)
                   for ident, raw in raw_records.items()}
        with self._lock:
            self._records = records
            self._version = int(raw_version or 0)
            self._dirty = False
            self._news = True

    def _poll(self) -> bool:
        """Reload when the version moved; True if it did."""
        version = int(self._client.get(self._version_key) or 0)
        with self._lock:
            if self._records is not None and version == self._version and not self._dirty:
                return False
        self._reload()
        return True

    def _sync(self) -> None:
        """In the CLI (no background thread): read the latest before answering."""
        if not self.background:
            try:
                self._poll()
            except redis.RedisError as exc:
                raise self.ERROR(f"{self.LABEL} {self.where}: {exc}") from None

    def _loaded(self) -> dict[str, R]:
        records = self._records
        if records is None:
            raise self.ERROR(f"{self.LABEL} {self.where}: not loaded yet (Redis has not "
                             "answered since the gateway started)")
        return records

    def _wrote(self, version: int, record: R) -> None:
        with self._lock:
            if self._records is not None and self._version is not None \
                    and version == self._version + 1:
                self._records[self._ident(record)] = record  # only ours since the last load
                self._version = version
            else:
                self._dirty = True  # someone else wrote too: the next poll reloads

    def _compare_and_set(self, key_id: str, update: Callable[[R | None], R | None]
                         ) -> R | None:
        """Apply `update` to the current record atomically (WATCH/MULTI, retried when
        another writer got in between); None when `update` declined."""
        try:
            with self._client.pipeline(transaction=True) as pipe:  # (Cluster: not the default)
                for _ in range(CAS_ATTEMPTS):
                    try:
                        pipe.watch(self._hash)
                        raw = pipe.hget(self._hash, key_id)
                        new = update(None if raw is None else self._decode(key_id, raw))
                        if new is None:
                            pipe.unwatch()
                            return None
                        pipe.multi()
                        pipe.hset(self._hash, key_id, self._encode(new))
                        pipe.incr(self._version_key)
                        _, version = pipe.execute()
                    except redis.WatchError:
                        continue
                    self._wrote(int(version), new)
                    return new
        except redis.RedisError as exc:
            raise self.ERROR(f"{self.LABEL} {self.where}: {exc}") from None
        raise self.ERROR(f"{self.LABEL} {self.where}: {key_id} kept changing; try again")

    def get(self, ident: str) -> R | None:
        self._sync()
        return self._loaded().get(ident)

    def changed(self) -> bool:
        if not self.background:
            try:
                self._poll()
            except redis.RedisError as exc:
                raise self.ERROR(f"{self.LABEL} {self.where}: {exc}") from None
        with self._lock:
            news, self._news = self._news, False
        return news

    def poll_now(self) -> None:
        """One background poll, now (tests; a caller that cannot wait for the thread)."""
        if self._follower is not None:
            self._follower.step()
        else:
            self._sync()

    def close(self) -> None:
        if self._follower is not None:
            self._follower.stop()
            self._follower = None
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RedisKeyStore(_MirroredHash[KeyRecord]):
    """`KeyStore` on Redis, with the reads served from memory (see the module docstring)."""

    SUFFIX = "keys"
    LABEL = "key store"
    WHAT = "API keys"
    ERROR = KeyStoreError

    def _encode(self, record: KeyRecord) -> str:
        return _encode_key(record)

    def _decode(self, ident: str, raw: bytes | str) -> KeyRecord:
        return _decode_key(ident, raw)

    def _ident(self, record: KeyRecord) -> str:
        return record.id

    # -- KeyStore ------------------------------------------------------------------------

    def create(self, record: KeyRecord) -> None:
        if self._compare_and_set(record.id, lambda current: record if current is None
                                 else None) is None:
            raise DuplicateKeyId(f"an API key with id {record.id} exists")

    def list(self) -> builtins.list[KeyRecord]:
        self._sync()
        return sorted(self._loaded().values(), key=lambda record: (record.created_at,
                                                                   record.id))

    def revoke(self, key_id: str, at: float) -> bool:
        def update(current: KeyRecord | None) -> KeyRecord | None:
            if current is None or current.revoked_at is not None:
                return None  # unknown, or revoked before: the first time is kept
            return replace(current, revoked_at=at)

        return self._compare_and_set(key_id, update) is not None

    def set_expiry(self, key_id: str, expires_at: float | None, rotated_to: str | None) -> bool:
        def update(current: KeyRecord | None) -> KeyRecord | None:
            if current is None or current.revoked_at is not None or current.rotated_to:
                return None
            return replace(current, expires_at=expires_at, rotated_to=rotated_to)

        return self._compare_and_set(key_id, update) is not None


# -- Basic users ----------------------------------------------------------------------------

def _encode_user(record: UserRecord) -> str:
    return json.dumps({
        "v": USER_SCHEMA_VERSION, "hash": record.hash, "scopes": list(record.scopes),
        "roles": list(record.roles), "created_at": record.created_at,
        "expires_at": record.expires_at, "revoked_at": record.revoked_at,
        "changed_at": record.changed_at,
    }, separators=(",", ":"))


def _decode_user(name: str, raw: bytes | str) -> UserRecord:
    data = json.loads(raw)
    if data.get("v", 1) > USER_SCHEMA_VERSION:
        raise UserStoreError(f"user {name!r} was written by a newer apishield (record "
                             f"version {data['v']}, this one knows {USER_SCHEMA_VERSION}); "
                             "upgrade apishield")
    return UserRecord(
        name=name, hash=data["hash"], scopes=tuple(data["scopes"]),
        roles=tuple(data["roles"]), created_at=data["created_at"],
        expires_at=data["expires_at"], revoked_at=data["revoked_at"],
        changed_at=data["changed_at"],
    )


class RedisUserStore(_MirroredHash[UserRecord]):
    """`UserStore` on Redis (`<ns>:users`, name -> JSON record with a version field `v`),
    read from memory like the key store."""

    SUFFIX = "users"
    LABEL = "user store"
    WHAT = "Basic users"
    ERROR = UserStoreError

    def _encode(self, record: UserRecord) -> str:
        return _encode_user(record)

    def _decode(self, ident: str, raw: bytes | str) -> UserRecord:
        return _decode_user(ident, raw)

    def _ident(self, record: UserRecord) -> str:
        return record.name

    def create(self, record: UserRecord) -> None:
        def update(current: UserRecord | None) -> UserRecord | None:
            if current is not None and current.revoked_at is None:
                return None
            return record  # new, or replacing a revoked user of the same name

        if self._compare_and_set(record.name, update) is None:
            raise DuplicateUser(f"a user named {record.name!r} exists")

    def list(self) -> builtins.list[UserRecord]:
        self._sync()
        return sorted(self._loaded().values(), key=lambda record: (record.created_at,
                                                                   record.name))

    def set_password(self, name: str, password_hash: str, at: float,
                     expires_at: float | None) -> bool:
        def update(current: UserRecord | None) -> UserRecord | None:
            if current is None or current.revoked_at is not None:
                return None
            return replace(current, hash=password_hash, changed_at=at, expires_at=expires_at)

        return self._compare_and_set(name, update) is not None

    def revoke(self, name: str, at: float) -> bool:
        def update(current: UserRecord | None) -> UserRecord | None:
            if current is None or current.revoked_at is not None:
                return None
            return replace(current, revoked_at=at)

        return self._compare_and_set(name, update) is not None


# -- bans -----------------------------------------------------------------------------------

def _field(kind: str, value: str) -> str:
    return f"{kind}|{value}"


def _encode_ban(record: BanRecord) -> str:
    return json.dumps({
        "kind": record.kind, "value": record.value, "until": record.until,
        "rule": record.rule, "reason": record.reason, "created_at": record.created_at,
        "offense": record.offense,
    }, separators=(",", ":"), ensure_ascii=True)


def _decode_ban(raw: bytes | str) -> BanRecord:
    data = json.loads(raw)
    return BanRecord(kind=data["kind"], value=data["value"], until=float(data["until"]),
                     rule=data["rule"], reason=data["reason"],
                     created_at=float(data["created_at"]), offense=int(data["offense"]))


_BanOp = tuple[Literal["ban"], BanRecord] | tuple[Literal["lift"], tuple[str, str]]


class RedisBanStore:
    """`BanStore` on Redis, shared by every gateway instance; reads from memory."""

    def __init__(self, url: str, *, namespace: str = DEFAULT_NAMESPACE, background: bool = True,
                 poll_interval: float = POLL_INTERVAL, client: SyncClient | None = None
                 ) -> None:
        self.where = redact_url(url)
        self.background = background
        self._client = client if client is not None else connect(url)
        namespace = cluster_namespace(url, namespace)  # Cluster: `{ns}`, one hash slot
        self._bans = f"{namespace}:bans"
        self._history = f"{namespace}:bans:history"
        self._version_key = f"{namespace}:bans:version"
        self._ban_script = self._client.register_script(_BAN_SCRIPT)
        self._lift_script = self._client.register_script(_LIFT_SCRIPT)
        self._prune_script = self._client.register_script(_PRUNE_SCRIPT)
        self._lock = threading.Lock()
        self._mirror = MemoryBanMirror()
        self._version: int | None = None  # None: never loaded
        self._dirty = False
        self._news = False
        self._pending: deque[_BanOp] = deque()  # background: writes not yet in Redis
        self._dropped = 0
        self._pruned_at = 0.0  # Redis side (follower thread)
        self._mirror_pruned_at = time.time()  # the live mirror (caller's thread)
        self._follower: _Follower | None = None
        failing = False
        try:
            self._reload(time.time())
        except redis.RedisError as exc:
            if not background:
                self._client.close()
                raise BanStoreError(f"ban store {self.where}: {exc}") from None
            failing = True
            logger.warning("state: %s is unreachable (%s); bans apply in this process only "
                           "until it answers", self.where, exc)
        self._news = False
        if background:
            self._follower = _Follower("apishield-redis-bans", self.where, self._poll,
                                       poll_interval, failing=failing)

    # -- Redis side ----------------------------------------------------------------------

    def _apply(self, op: _BanOp) -> int:
        """Write one operation; the new version (0: a lift that found nothing)."""
        if op[0] == "ban":
            record = op[1]
            return int(self._ban_script(
                keys=[self._bans, self._history, self._version_key],
                args=[_field(record.kind, record.value), _encode_ban(record),
                      repr(record.created_at), repr(time.time() - HISTORY_SECONDS)]))
        return int(self._lift_script(keys=[self._bans, self._version_key],
                                     args=[_field(*op[1])]))

    def _wrote(self, version: int) -> None:
        if version == 0:
            return
        with self._lock:
            if self._version is not None and version == self._version + 1:
                self._version = version  # only ours since the last load
            else:
                self._dirty = True

    def _flush(self) -> None:
        """Write the queued operations, oldest first; stops at the first error (they
        stay queued and the error propagates to the follower, which logs it)."""
        while True:
            with self._lock:
                if not self._pending:
                    return
                op = self._pending[0]
            version = self._apply(op)
            with self._lock:
                if self._pending and self._pending[0] is op:
                    self._pending.popleft()
            self._wrote(version)

    def _reload(self, now: float) -> None:
        with self._client.pipeline(transaction=True) as pipe:
            pipe.get(self._version_key)
            pipe.hgetall(self._bans)
            pipe.hgetall(self._history)
            raw_version, raw_bans, raw_history = pipe.execute()
        records: list[BanRecord] = []
        expired: list[tuple[str, str]] = []
        for field, raw in raw_bans.items():
            record = _decode_ban(raw)
            if record.active(now):
                records.append(record)
            else:
                expired.append((_text(field), _text(raw)))
        cutoff = now - HISTORY_SECONDS
        history: dict[tuple[str, str], list[float]] = {}
        stale: list[tuple[str, str]] = []
        for field, raw in raw_history.items():
            kind, _, value = _text(field).partition("|")
            times = [moment for moment in map(float, _text(raw).split()) if moment > cutoff]
            if times:
                history[(kind, value)] = times
            else:
                stale.append((_text(field), _text(raw)))
        mirror = MemoryBanMirror.build(records, history)
        with self._lock:
            for op in self._pending:  # queued meanwhile, not in the snapshot yet
                self._apply_locally(mirror, op)
            self._mirror = mirror
            self._version = int(raw_version or 0)
            self._dirty = False
            self._news = True
        if (expired or stale) and now - self._pruned_at >= PRUNE_EVERY:
            self._pruned_at = now
            self._prune(self._bans, expired)
            self._prune(self._history, stale)

    def _prune(self, key: str, fields: list[tuple[str, str]]) -> None:
        """Delete what is over, unless someone rewrote it since; no version bump: no
        mirror's answer changes (expired bans and old history are ignored anyway)."""
        for start in range(0, len(fields), PRUNE_BATCH):
            batch = fields[start:start + PRUNE_BATCH]
            self._prune_script(keys=[key], args=[item for pair in batch for item in pair])

    def _poll(self) -> bool:
        if self.background:
            self._flush()
        version = int(self._client.get(self._version_key) or 0)
        with self._lock:
            if self._version is not None and version == self._version and not self._dirty:
                return False
        self._reload(time.time())
        return True

    @staticmethod
    def _apply_locally(mirror: MemoryBanMirror, op: _BanOp) -> BanRecord | None:
        if op[0] == "ban":
            record = op[1]
            mirror.put(record)
            mirror.remember(record.kind, record.value, record.created_at)
            return record
        return mirror.remove(*op[1])

    def _write(self, op: _BanOp) -> BanRecord | None:
        """Apply to the mirror now; then write through (CLI) or queue (gateway)."""
        with self._lock:
            found = self._apply_locally(self._mirror, op)
            if self.background:
                self._pending.append(op)
                if len(self._pending) > MAX_PENDING:
                    self._pending.popleft()
                    self._dropped += 1
                    if self._dropped == 1:
                        logger.warning("state: %s: more than %d ban writes queued; the "
                                       "oldest are dropped (they still apply here)",
                                       self.where, MAX_PENDING)
                return found
        try:
            self._wrote(self._apply(op))
        except redis.RedisError as exc:
            raise BanStoreError(f"ban store {self.where}: {exc}") from None
        return found

    # -- BanStore ------------------------------------------------------------------------

    def banned(self, kind: BanKind, value: str | None, now: float) -> BanRecord | None:
        return self._mirror.banned(kind, value, now)

    def ban(self, record: BanRecord) -> None:
        value = canonical_value(record.kind, record.value)
        if value != record.value:
            record = replace(record, value=value)
        self._write(("ban", record))

    def lift(self, kind: BanKind, value: str) -> bool:
        value = canonical_value(kind, value)
        if self.background:
            return self._write(("lift", (kind, value))) is not None
        with self._lock:
            removed = self._mirror.remove(kind, value)
        try:
            version = int(self._lift_script(keys=[self._bans, self._version_key],
                                            args=[_field(kind, value)]))
        except redis.RedisError as exc:
            raise BanStoreError(f"ban store {self.where}: {exc}") from None
        self._wrote(version)
        return version != 0 or removed is not None

    def list(self, now: float) -> builtins.list[BanRecord]:
        return self._mirror.active(now)

    def offenses(self, kind: BanKind, value: str, now: float) -> int:
        return self._mirror.offenses(kind, canonical_value(kind, value), now)

    def changed(self) -> bool:
        if self.background:
            return self._news
        try:
            version = int(self._client.get(self._version_key) or 0)
        except redis.RedisError as exc:
            raise BanStoreError(f"ban store {self.where}: {exc}") from None
        return version != self._version or self._dirty

    def refresh(self) -> bool:
        if not self.background:
            try:
                self._poll()
            except redis.RedisError as exc:
                raise BanStoreError(f"ban store {self.where}: {exc}") from None
        with self._lock:
            news, self._news = self._news, False
            if not news:
                now = time.time()
                if now - self._mirror_pruned_at >= PRUNE_EVERY:  # no reload for a while
                    self._mirror_pruned_at = now
                    self._mirror.prune(now)
        return news

    @property
    def pending(self) -> int:
        """Ban writes waiting for Redis (metrics, tests)."""
        return len(self._pending)

    def poll_now(self) -> None:
        """One background poll, now (tests; a caller that cannot wait for the thread)."""
        if self._follower is not None:
            self._follower.step()
        else:
            self.refresh()

    def close(self) -> None:
        if self._follower is not None:
            self._follower.stop()
            self._follower = None
            try:  # a last chance for bans made just before shutdown
                self._flush()
            except redis.RedisError:
                if self._pending:
                    logger.warning("state: %s: %d ban(s) made during the outage were not "
                                   "written", self.where, len(self._pending))
        self._client.close()

    def __enter__(self) -> RedisBanStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
