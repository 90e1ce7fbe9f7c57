"""The embedded user store (HTTP Basic): the `users` table in the same SQLite file as the
API keys and bans (`config.state`), shared by the gateway and `apishield users`.

It shares `sqlite.SqliteStateFile` with the other stores (see there for why): WAL,
`synchronous=FULL` (a revocation survives a power cut), a 0600 file, a `schema_version`
row (component `users`), and `PRAGMA data_version` as the change probe. Its own
connection, so a Basic cache miss never waits on the key store's lock.
"""

from __future__ import annotations

import builtins
import json
from typing import Any

from apishield.state.sqlite import SqliteStateFile
from apishield.state.users import DuplicateUser, UserRecord, UserStoreError

SCHEMA_COMPONENT = "users"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (
    component TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL,       -- Argon2id PHC string (parameters included)
    scopes TEXT NOT NULL,     -- JSON array of strings
    roles TEXT NOT NULL,      -- JSON array of strings
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL,
    changed_at REAL NOT NULL
)
"""

_COLUMNS = "name, hash, scopes, roles, created_at, expires_at, revoked_at, changed_at"


def _row_to_record(row: tuple[Any, ...]) -> UserRecord:
    return UserRecord(
        name=row[0], hash=row[1], scopes=tuple(json.loads(row[2])),
        roles=tuple(json.loads(row[3])), created_at=row[4], expires_at=row[5],
        revoked_at=row[6], changed_at=row[7],
    )


class SqliteUserStore(SqliteStateFile):
    """`UserStore` on the SQLite state file; thread-safe (one connection behind a lock)
    and safe across processes. Reads are one indexed row, so the gateway's worker thread
    reads the record it verifies against directly."""

    SCHEMA = _SCHEMA
    COMPONENT = SCHEMA_COMPONENT
    VERSION = SCHEMA_VERSION
    TABLES = "user tables"
    LABEL = "user store"
    ERROR = UserStoreError

    def create(self, record: UserRecord) -> None:
        with self._write() as conn:
            row = conn.execute("SELECT revoked_at FROM users WHERE name = ?",
                               (record.name,)).fetchone()
            if row is not None and row[0] is None:
                raise DuplicateUser(f"a user named {record.name!r} exists")
            conn.execute(
                f"INSERT OR REPLACE INTO users ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608 - constant
                (record.name, record.hash, json.dumps(list(record.scopes)),
                 json.dumps(list(record.roles)), record.created_at, record.expires_at,
                 record.revoked_at, record.changed_at),
            )

    def get(self, name: str) -> UserRecord | None:
        with self._connection() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM users WHERE name = ?",  # noqa: S608
                               (name,)).fetchone()
        return None if row is None else _row_to_record(row)

    def list(self) -> builtins.list[UserRecord]:
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM users ORDER BY created_at, name"  # noqa: S608
            ).fetchall()
        return [_row_to_record(row) for row in rows]

    def set_password(self, name: str, password_hash: str, at: float,
                     expires_at: float | None) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE users SET hash = ?, changed_at = ?, expires_at = ? "
                "WHERE name = ? AND revoked_at IS NULL", (password_hash, at, expires_at, name))
            return cursor.rowcount == 1

    def revoke(self, name: str, at: float) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE users SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (at, name))
            return cursor.rowcount == 1

    def changed(self) -> bool:
        with self._connection():
            version = self._read_data_version()
        if version == self._data_version:
            return False
        self._data_version = version
        return True

