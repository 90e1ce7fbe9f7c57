"""Usage counts in the SQLite state file (the `usage_daily` table beside keys and bans).

One row per (day, identity, operation), written by an UPSERT that adds to the row
(`requests = requests + excluded.requests`), so several gateways sharing the file add up.
The whole batch is one transaction (BEGIN IMMEDIATE): a failed flush adds nothing and is
retried whole. The gateway calls `add` from a worker thread (a commit fsyncs:
`synchronous=FULL`, see `sqlite.SqliteStateFile`), never on its event loop. Days older than
the retention are deleted by the same transaction (an indexed range delete).
"""

from __future__ import annotations

import time

from apishield.state.sqlite import SqliteStateFile
from apishield.state.usage import OTHER, Batch, UsageRow, UsageStoreError, first_day

SCHEMA_COMPONENT = "usage"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (
    component TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS usage_daily (
    day TEXT NOT NULL,          -- YYYY-MM-DD, UTC
    identity TEXT NOT NULL,     -- API key id, token subject, anonymous or other
    operation TEXT NOT NULL,
    requests INTEGER NOT NULL,
    refusals INTEGER NOT NULL,
    bytes_in INTEGER NOT NULL,
    bytes_out INTEGER NOT NULL,
    PRIMARY KEY (day, identity, operation)
)
"""

_UPSERT = """
INSERT INTO usage_daily (day, identity, operation, requests, refusals, bytes_in, bytes_out)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, identity, operation) DO UPDATE SET
    requests = requests + excluded.requests,
    refusals = refusals + excluded.refusals,
    bytes_in = bytes_in + excluded.bytes_in,
    bytes_out = bytes_out + excluded.bytes_out
"""


class SqliteUsageStore(SqliteStateFile):
    """`UsageStore` on the SQLite state file; thread-safe (one connection behind a lock)."""

    SCHEMA = _SCHEMA
    COMPONENT = SCHEMA_COMPONENT
    VERSION = SCHEMA_VERSION
    TABLES = "usage tables"
    LABEL = "usage store"
    ERROR = UsageStoreError

    def add(self, batch: Batch, max_pairs: int, retention_days: int,
            now: float | None = None) -> None:
        oldest = first_day(time.time() if now is None else now, retention_days)
        days: dict[str, list[tuple[str, str, list[int]]]] = {}
        for (day, identity, operation), counts in sorted(batch.items()):
            days.setdefault(day, []).append((identity, operation, counts))
        with self._write() as conn:
            for day, entries in days.items():
                stored = conn.execute(
                    "SELECT count(*) FROM usage_daily WHERE day = ? AND identity != ?",
                    (day, OTHER)).fetchone()[0]
                # far from the bound (the usual case): no pair needs looking up
                careful = stored + len(entries) > max_pairs
                for identity, operation, counts in entries:
                    if careful and identity != OTHER and conn.execute(
                            "SELECT 1 FROM usage_daily WHERE day = ? AND identity = ? "
                            "AND operation = ?", (day, identity, operation)).fetchone() is None:
                        if stored >= max_pairs:
                            identity = OTHER
                        else:
                            stored += 1
                    conn.execute(_UPSERT, (day, identity, operation, *counts))
            conn.execute("DELETE FROM usage_daily WHERE day < ?", (oldest,))
        batch.clear()  # committed: all of it is stored

    def query(self, since_day: str, identity: str | None = None,
              operation: str | None = None) -> list[UsageRow]:
        sql = ("SELECT day, identity, operation, requests, refusals, bytes_in, bytes_out "
               "FROM usage_daily WHERE day >= ?")
        args: list[str] = [since_day]
        if identity is not None:
            sql += " AND identity = ?"
            args.append(identity)
        if operation is not None:
            sql += " AND operation = ?"
            args.append(operation)
        with self._connection() as conn:
            rows = conn.execute(sql + " ORDER BY day, identity, operation", args).fetchall()
        return [UsageRow(*row) for row in rows]
