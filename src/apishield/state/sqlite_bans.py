"""The embedded ban store: the `bans` and `ban_history` tables in the same SQLite file as
the API keys (`config.state`), shared by the gateway's workers and `apishield bans`.

It shares `sqlite.SqliteStateFile` with the key store (see there for why): WAL,
`synchronous=FULL` (a lifted or added ban survives a power cut), a 0600
file, a `schema_version` row (component `bans`), and `PRAGMA data_version` as the change
probe. It uses its own connection, so the key store and the ban store never wait on each
other's lock in the gateway; data_version moves for either table's foreign writes, which
costs at most one needless reload of a few rows.

Reads come from a `MemoryBanMirror`, reloaded by `refresh()` when data_version moved (a
tiny statement on a local file, so the gateway calls it on its event loop). Rows of
expired bans and history older than 30 days are deleted by the next `ban()`.
"""

from __future__ import annotations

import builtins
import time
from pathlib import Path

from apishield.state.bans import (
    HISTORY_SECONDS,
    BanKind,
    BanRecord,
    BanStoreError,
    MemoryBanMirror,
    canonical_value,
)
from apishield.state.sqlite import SqliteStateFile

SCHEMA_COMPONENT = "bans"
SCHEMA_VERSION = 1
PRUNE_EVERY = 60.0  # seconds between sweeps of expired bans out of the mirror

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (
    component TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS bans (
    kind TEXT NOT NULL,        -- ip | subject
    value TEXT NOT NULL,       -- address, CIDR network or subject
    until REAL NOT NULL,
    rule TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    offense INTEGER NOT NULL,
    PRIMARY KEY (kind, value)
);
CREATE TABLE IF NOT EXISTS ban_history (
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ban_history_by_value ON ban_history (kind, value, created_at);
CREATE INDEX IF NOT EXISTS ban_history_by_time ON ban_history (created_at)
"""

_COLUMNS = "kind, value, until, rule, reason, created_at, offense"


class SqliteBanStore(SqliteStateFile):
    """`BanStore` on the SQLite state file. Thread-safe (one connection and the mirror's
    writes behind a lock; reads take the mirror reference as it is), and safe across
    processes (SQLite locking, WAL)."""

    SCHEMA = _SCHEMA
    COMPONENT = SCHEMA_COMPONENT
    VERSION = SCHEMA_VERSION
    TABLES = "ban tables"
    LABEL = "ban store"
    ERROR = BanStoreError

    def __init__(self, path: str | Path) -> None:
        self._mirror = MemoryBanMirror()
        self._pruned_at = 0.0
        super().__init__(path)

    def _opened(self) -> None:
        self._mirror = self._load(time.time())

    def _load(self, now: float) -> MemoryBanMirror:
        """A new mirror from the tables (active bans, recent history)."""
        assert self._conn is not None
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM bans WHERE until > ?", (now,)  # noqa: S608 - constant
        ).fetchall()
        history: dict[tuple[str, str], list[float]] = {}
        for kind, value, created_at in self._conn.execute(
                "SELECT kind, value, created_at FROM ban_history WHERE created_at > ?",
                (now - HISTORY_SECONDS,)):
            history.setdefault((kind, value), []).append(created_at)
        return MemoryBanMirror.build([BanRecord(*row) for row in rows], history)

    # -- BanStore ------------------------------------------------------------------------

    def banned(self, kind: BanKind, value: str | None, now: float) -> BanRecord | None:
        return self._mirror.banned(kind, value, now)

    def ban(self, record: BanRecord) -> None:
        value = canonical_value(record.kind, record.value)
        if value != record.value:
            record = BanRecord(record.kind, value, record.until, record.rule, record.reason,
                               record.created_at, record.offense)
        with self._lock:  # the mirror first: a ban the disk refused still applies here
            self._mirror.put(record)
            self._mirror.remember(record.kind, record.value, record.created_at)
        with self._write() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO bans ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (record.kind, record.value, record.until, record.rule, record.reason,
                 record.created_at, record.offense))
            conn.execute("INSERT INTO ban_history (kind, value, created_at) VALUES (?, ?, ?)",
                         (record.kind, record.value, record.created_at))
            now = time.time()
            conn.execute("DELETE FROM bans WHERE until <= ?", (now,))
            conn.execute("DELETE FROM ban_history WHERE created_at <= ?",
                         (now - HISTORY_SECONDS,))

    def lift(self, kind: BanKind, value: str) -> bool:
        value = canonical_value(kind, value)
        with self._write() as conn:
            deleted = conn.execute("DELETE FROM bans WHERE kind = ? AND value = ?",
                                   (kind, value)).rowcount
        with self._lock:
            removed = self._mirror.remove(kind, value)
        return deleted == 1 or removed is not None

    def list(self, now: float) -> builtins.list[BanRecord]:
        return self._mirror.active(now)

    def offenses(self, kind: BanKind, value: str, now: float) -> int:
        return self._mirror.offenses(kind, canonical_value(kind, value), now)

    def changed(self) -> bool:
        with self._connection():
            return self._read_data_version() != self._data_version

    def refresh(self) -> bool:
        now = time.time()
        with self._connection():
            version = self._read_data_version()
            if version == self._data_version:
                changed = False
            else:
                self._mirror = self._load(now)
                self._data_version = version
                self._pruned_at = now
                changed = True
            if not changed and now - self._pruned_at >= PRUNE_EVERY:
                self._pruned_at = now
                self._mirror.prune(now)  # memory stays bounded when nobody else writes
        return changed

