"""The embedded key store: one SQLite file at `config.state`, shared by the gateway and
the `apishield keys` CLI running at the same time.

- WAL journal: the gateway's reads never wait for the CLI's writes and vice versa (a
  writer only excludes other writers; `timeout` makes a second writer wait, not fail).
- `synchronous=FULL`: every commit is fsynced before it returns. With WAL, NORMAL may
  lose the last commits on a power cut; here that would silently bring a revoked key back
  to life after the CLI said "revoked". Writes are rare (create, rotate, revoke), so one
  fsync each costs nothing that matters; reads are not affected.
- Created with mode 0600 (SQLite gives its -wal and -shm files the database's mode): the
  hashes are peppered, but the file still tells who holds which scopes.
- `schema_version` records each component's schema, so an older apishield refuses a file
  written by a newer one instead of misreading it.
- `changed()` is `PRAGMA data_version` on the long-lived connection: it moves when any
  *other* connection (the CLI, another worker) commits, costs one tiny statement, and
  needs no triggers or polling of rows.
"""

from __future__ import annotations

import builtins
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Self

from apishield.config import ConfigError
from apishield.state.keys import DuplicateKeyId, KeyRecord, KeyStoreError

SCHEMA_COMPONENT = "api_keys"
SCHEMA_VERSION = 1
BUSY_TIMEOUT = 5.0  # seconds a writer waits for another writer before giving up

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (
    component TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hash BLOB NOT NULL,
    scopes TEXT NOT NULL,     -- JSON array of strings
    roles TEXT NOT NULL,      -- JSON array of strings
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL,
    rotated_to TEXT
);
"""

_COLUMNS = "id, name, hash, scopes, roles, created_at, expires_at, revoked_at, rotated_to"


def _row_to_record(row: tuple[Any, ...]) -> KeyRecord:
    return KeyRecord(
        id=row[0], name=row[1], hash=bytes(row[2]),
        scopes=tuple(json.loads(row[3])), roles=tuple(json.loads(row[4])),
        created_at=row[5], expires_at=row[6], revoked_at=row[7], rotated_to=row[8],
    )


def _create_private(path: Path) -> None:
    """Create the empty database file with mode 0600 before SQLite opens it (SQLite would
    use 0644 minus the umask). Never changes the mode of an existing file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


class SqliteStateFile:
    """One long-lived connection to the SQLite state file, shared by the stores that live
    in it (keys, bans): the folder check, the 0600 file, WAL and `synchronous=FULL`, the
    per-component schema migration, the `data_version` change probe, and a lock around the
    connection with SQLite errors turned into the store's own error. Subclasses say which
    tables (`SCHEMA`, `COMPONENT`, `VERSION`) and which error they raise."""

    SCHEMA: ClassVar[str]
    COMPONENT: ClassVar[str]
    VERSION: ClassVar[int]
    TABLES: ClassVar[str]  # for messages: "API-key tables"
    LABEL: ClassVar[str]  # for messages: "key store"
    ERROR: ClassVar[type[Exception]]

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        where = f"state: {self.path}"
        if not self.path.parent.is_dir():
            raise ConfigError([f"{where}: the folder {self.path.parent} does not exist; "
                               "create it, or point `state` at a file in an existing folder"])
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        try:
            _create_private(self.path)
            # isolation_level=None: no implicit transactions, so every read sees the latest
            # commit; writes open BEGIN IMMEDIATE themselves.
            self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT,
                                         isolation_level=None, check_same_thread=False)
            self._setup(self._conn)
            self._data_version = self._read_data_version()
            self._opened()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise ConfigError([f"{where}: cannot be used as the apishield state database "
                               f"({exc})"]) from None
        except OSError as exc:
            self.close()
            raise ConfigError([f"{where}: cannot be created ({exc.strerror or exc})"]) from None
        except ConfigError:
            self.close()
            raise

    def _opened(self) -> None:
        """Called once the connection is set up (e.g. to load a mirror)."""

    def _setup(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() != "wal":
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":  # e.g. a file system without shared memory
                raise ConfigError([f"state: {self.path}: SQLite cannot use WAL mode there "
                                   f"(got {mode}); put the state file on a local disk"])
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN IMMEDIATE")  # two processes opening a new file: one migrates
        try:
            # not executescript: it would COMMIT first and run outside this transaction
            for statement in self.SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            row = conn.execute("SELECT version FROM schema_version WHERE component = ?",
                               (self.COMPONENT,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version (component, version) VALUES (?, ?)",
                             (self.COMPONENT, self.VERSION))
            elif row[0] > self.VERSION:
                raise ConfigError([f"state: {self.path}: its {self.TABLES} have schema "
                                   f"version {row[0]}, written by a newer apishield (this one "
                                   f"knows {self.VERSION}); upgrade apishield"])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _read_data_version(self) -> int:
        assert self._conn is not None
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """The connection under the lock, with SQLite errors turned into `ERROR`."""
        with self._lock:
            if self._conn is None:
                raise self.ERROR(f"the {self.LABEL} {self.path} is closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise self.ERROR(f"{self.LABEL} {self.path}: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SqliteKeyStore(SqliteStateFile):
    """`KeyStore` on one SQLite file. Thread-safe (one connection behind a lock), and
    safe across processes (SQLite file locking, WAL)."""

    SCHEMA = _SCHEMA
    COMPONENT = SCHEMA_COMPONENT
    VERSION = SCHEMA_VERSION
    TABLES = "API-key tables"
    LABEL = "key store"
    ERROR = KeyStoreError

    def create(self, record: KeyRecord) -> None:
        try:
            with self._write() as conn:
                conn.execute(
                    f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608 - constant
                    (record.id, record.name, record.hash, json.dumps(list(record.scopes)),
                     json.dumps(list(record.roles)), record.created_at, record.expires_at,
                     record.revoked_at, record.rotated_to),
                )
        except KeyStoreError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise DuplicateKeyId(f"an API key with id {record.id} exists") from None
            raise

    def get(self, key_id: str) -> KeyRecord | None:
        with self._connection() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?",  # noqa: S608
                               (key_id,)).fetchone()
        return None if row is None else _row_to_record(row)

    def list(self) -> builtins.list[KeyRecord]:
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, id"  # noqa: S608
            ).fetchall()
        return [_row_to_record(row) for row in rows]

    def revoke(self, key_id: str, at: float) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (at, key_id),
            )
            return cursor.rowcount == 1

    def set_expiry(self, key_id: str, expires_at: float | None, rotated_to: str | None) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE api_keys SET expires_at = ?, rotated_to = ? "
                "WHERE id = ? AND revoked_at IS NULL AND rotated_to IS NULL",
                (expires_at, rotated_to, key_id),
            )
            return cursor.rowcount == 1

    def changed(self) -> bool:
        with self._connection():
            version = self._read_data_version()
        if version == self._data_version:
            return False
        self._data_version = version
        return True

