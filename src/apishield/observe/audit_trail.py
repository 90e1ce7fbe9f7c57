"""The tamper-evident audit trail (F5, docs/audit-trail.md): one JSON record per sensitive
operation, each carrying the hash of the one before it.

Why a hash chain: a log line can be edited or deleted by whoever can write the file, and
nobody would notice. Here every record holds `prev` (the previous record's `hash`) and its
own `hash`, SHA-256 (or HMAC-SHA-256 with a configured key) over its canonical JSON
without `hash`, so changing, removing, inserting or reordering a record breaks the chain
at that place, and `apishield audit-log verify` names it. Without a key, someone who can
rewrite the whole file can also recompute every hash; with a key they cannot (they also
need the key), which is why the key lives elsewhere (`{env}` or `{file}`).

A record (one line, keys in this order for people; the hash covers the canonical form):

    {"seq": 7, "time": "2026-12-06T11:32:58.123Z", "actor": "alice",
     "action": "api-key-revoked", "details": {"key_id": "..."},
     "prev": "sha256:...", "hash": "sha256:..."}

Canonical JSON: keys sorted, no whitespace, ASCII only (`json.dumps(sort_keys=True,
separators=(",", ":"), ensure_ascii=True)`), so any language can recompute it.

Where records go is a `Sink`: a file here (`FileSink`: `fcntl.flock` around reading the
head, appending and fsync, so a gateway and a CLI appending at once never fork the
chain), a Redis stream in `state/audit_stream.py`. `AuditTrail.append` is synchronous
(the CLI waits for its record: the change is not done until it is recorded);
`BackgroundAuditTrail` gives the gateway the same on one writer thread, so its event loop
never waits on an fsync or the network.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from apishield.observe.logjson import fields, timestamp
from apishield.observe.metrics import METRICS

logger = logging.getLogger("apishield.audit")

PLAIN = "sha256"
KEYED = "hmac-sha256"
# detail names that would mean a secret is about to be written: a record names a key by
# its id, never the key (a programming error, refused loudly)
FORBIDDEN_DETAILS = frozenset({"key", "password", "secret", "token", "pepper", "hash",
                               "authorization", "credential"})
QUEUE_LIMIT = 10_000  # records waiting for the gateway's writer thread (then: dropped, counted)
_TAIL_CHUNK = 4096


class AuditTrailError(Exception):
    """A record could not be written (the message says where and why, never a secret)."""


@dataclass(frozen=True, slots=True)
class Head:
    """The last record of a trail: its seq and hash (0 and None for an empty trail)."""

    seq: int
    hash: str | None


# given the head under the sink's lock: the line to append (no newline) and its hash
Build = Callable[[Head], tuple[str, str]]


class Sink(Protocol):
    """Where records go. `append` must hold the head still between reading it and
    writing the new record (a lock, a compare-and-set), or two writers fork the chain."""

    where: str  # for messages: the file, or the stream (password masked)

    def append(self, build: Build) -> None: ...

    def entries(self) -> Iterator[Entry]: ...

    def anchor(self) -> Head | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored record as read back: where it is (for messages), its raw text, and
    whether it ended properly (a file line with its newline)."""

    location: str  # "line 7", "entry 1733484778123-0"
    text: str
    complete: bool = True


# -- records and hashes -------------------------------------------------------------------

def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode("ascii")


def record_hash(body: dict[str, Any], key: bytes | None) -> str:
    """`sha256:<hex>`, or `hmac-sha256:<hex>` with a key, over the canonical JSON of the
    record without its `hash`."""
    data = canonical({name: value for name, value in body.items() if name != "hash"})
    if key is None:
        return f"{PLAIN}:{hashlib.sha256(data).hexdigest()}"
    return f"{KEYED}:{hmac.new(key, data, hashlib.sha256).hexdigest()}"


def make_record(head: Head, action: str, actor: str | None, details: dict[str, Any],
                moment: float, key: bytes | None) -> tuple[str, str]:
    """The next record after `head`, as its line (no newline) and its hash."""
    record: dict[str, Any] = {"seq": head.seq + 1, "time": timestamp(moment), "actor": actor,
                              "action": action, "details": details, "prev": head.hash}
    record["hash"] = digest = record_hash(record, key)
    return json.dumps(record, separators=(",", ":"), ensure_ascii=True), digest


def check_details(details: dict[str, Any]) -> dict[str, Any]:
    """The details as written; a name that means a secret is refused (ValueError)."""
    for name in details:
        if name.lower() in FORBIDDEN_DETAILS:
            raise ValueError(f"audit details: {name!r} would put a secret in the trail; "
                             "record an id instead")
    return details


def head_of(text: str, where: str) -> Head:
    """The seq and hash of a stored record, read to chain the next one."""
    try:
        record = json.loads(text)
        seq, digest = record["seq"], record["hash"]
    except (ValueError, KeyError, TypeError):
        raise AuditTrailError(f"{where}: its last record is not a record apishield wrote; "
                              "run `apishield audit-log verify` and keep the evidence") from None
    if not isinstance(seq, int) or not isinstance(digest, str):
        raise AuditTrailError(f"{where}: its last record has no valid seq and hash; run "
                              "`apishield audit-log verify`")
    return Head(seq, digest)


# -- the trail ----------------------------------------------------------------------------

class AuditTrail:
    """Appends records to a sink, chained and (with a key) keyed. Thread-safe: the sink
    serialises writers, across processes too."""

    def __init__(self, sink: Sink, key: bytes | None) -> None:
        self.sink = sink
        self._key = key

    @property
    def where(self) -> str:
        return self.sink.where

    def append(self, action: str, actor: str | None, moment: float | None = None,
               **details: Any) -> None:
        """Write one record now and make it durable; AuditTrailError when it cannot be.
        `moment`: when the operation happened (default now)."""
        check_details(details)
        when = time.time() if moment is None else moment
        try:
            self.sink.append(lambda head: make_record(head, action, actor, details, when,
                                                      self._key))
        except AuditTrailError:
            raise
        except Exception as exc:  # OSError, a Redis error: one type for every caller
            raise AuditTrailError(f"{self.sink.where}: {type(exc).__name__}: {exc}") from None
        METRICS.audit_record()

    def close(self) -> None:
        self.sink.close()


def report_failure(action: str, where: str, error: Exception) -> None:
    """A record that could not be written: one `audit-trail-failed` line and the error
    counter (docs/logging.md, docs/observability.md)."""
    METRICS.audit_error()
    logger.error("audit trail: could not record %s in %s: %s", action, where, error,
                 extra=fields("audit", event="audit-trail-failed", action=action,
                              error=str(error)))


@dataclass(frozen=True, slots=True)
class _Job:
    action: str
    actor: str | None
    moment: float
    details: dict[str, Any]


class BackgroundAuditTrail:
    """The gateway's writer: `submit` only queues (never blocks the event loop); one
    thread appends in order. A failed or dropped record is logged and counted, never
    raised: the gateway keeps serving (docs/audit-trail.md says why)."""

    def __init__(self, trail: AuditTrail) -> None:
        self.trail = trail
        # a record to write, an Event to set once all before it are written, None to stop
        self._queue: queue.Queue[_Job | threading.Event | None] = queue.Queue(QUEUE_LIMIT)
        # started by the first record: a gateway built only to be checked starts none
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def _started(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit trail",
                                                daemon=True)
                self._thread.start()

    def submit(self, action: str, actor: str | None, **details: Any) -> None:
        check_details(details)
        self._started()
        try:
            self._queue.put_nowait(_Job(action, actor, time.time(), details))
        except queue.Full:
            report_failure(action, self.trail.where, AuditTrailError(
                f"{QUEUE_LIMIT} records are waiting to be written; this one was dropped"))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self.trail.append(item.action, item.actor, item.moment, **item.details)
            except Exception as exc:
                report_failure(item.action, self.trail.where, exc)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written (tests, shutdown)."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put(done, timeout=timeout)
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (bounded by `timeout`), then stop the thread."""
        if self._thread is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=timeout)
            self._thread.join(timeout)
        self.trail.close()


# -- the file sink ------------------------------------------------------------------------

class FileSink:
    """One JSON line per record in a local file. Each append opens the file, takes an
    exclusive `flock` (released by closing), reads the last line for the head, appends in
    one `write`, and fsyncs the file (and the directory when it created the file): a
    record is on disk before the operation is reported done, and concurrent writers
    (a gateway, CLI commands) queue on the lock instead of forking the chain."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)

    def append(self, build: Build) -> None:
        created = False
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o640)
            created = True
        except FileExistsError:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            line, _ = build(_file_head(fd, self.where))
            data = (line + "\n").encode("ascii")
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # the new name itself must survive a crash (fsync(2))
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def check(self) -> None:
        """AuditTrailError unless an append could go ahead now: the folder exists and the
        file, if any, ends in a whole record (the CLI asks before changing anything)."""
        if not self.path.parent.is_dir():
            raise AuditTrailError(f"{self.where}: the folder {self.path.parent} does not exist")
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            _file_head(fd, self.where)
        finally:
            os.close(fd)

    def entries(self) -> Iterator[Entry]:
        with self.path.open("rb") as stream:
            yield from file_entries(stream)

    def anchor(self) -> Head | None:
        return None  # a file keeps no copy of its head elsewhere (docs: --expect-head)

    def close(self) -> None:
        pass


def file_entries(lines: Iterable[bytes]) -> Iterator[Entry]:
    for number, raw in enumerate(lines, 1):
        complete = raw.endswith(b"\n")
        text = raw.decode("utf-8", errors="replace").rstrip("\n")
        yield Entry(f"line {number}", text, complete)


def _file_head(fd: int, where: str) -> Head:
    """The head from the file's last line (read backwards from the end)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return Head(0, None)
    tail = b""
    position = size
    while position > 0:
        start = max(0, position - _TAIL_CHUNK)
        tail = os.pread(fd, position - start, start) + tail
        position = start
        if tail.count(b"\n") >= 2 or (position == 0 and tail):
            break
    if not tail.endswith(b"\n"):
        raise AuditTrailError(f"{where} ends in a partial record (a write was cut short, or "
                              "the file was truncated); nothing more is appended until an "
                              "operator has run `apishield audit-log verify` on it and moved "
                              "it aside")
    last = tail[:-1].rsplit(b"\n", 1)[-1]
    return head_of(last.decode("utf-8", errors="replace"), where)


def default_path(state_path: Path) -> Path:
    """Beside the SQLite state file: `apishield-state.db` -> `apishield-state.db.audit.jsonl`."""
    return state_path.with_name(state_path.name + ".audit.jsonl")
