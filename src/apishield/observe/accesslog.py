"""One structured JSON line per request (checklist F2), written without blocking the loop.

Only fields apishield computed are logged: the route template instead of the concrete
path, no query string, no header values, so tokens, API keys and cookies cannot leak into
logs (F6). A request only appends a tuple; lines are formatted and written in one batch
at most every 100 ms and at shutdown. Formatting per request, between two syscalls, cost
several times more than the same work done in a batch (bench/RESULTS.md).

The line follows the schema of every apishield log line (docs/logging.md): the leading
`ts`, `level`, `kind` (`access`), `logger`, `msg`, then `request_id` and the access
fields. It is written here as bytes rather than through `logjson.JsonFormatter` for the
cost above; `ts` is formatted the same way (`logjson.timestamp`), memoized per second.

Under `serve --workers N` every worker writes the same file or standard output, so a
line must never be cut by another worker's: each line says which worker wrote it
(`worker`), a file is written one batch per write() with O_APPEND (the kernel appends
each write whole), and standard output, often a pipe, in write()s of whole lines of at
most PIPE_BUF bytes (4 KiB, which POSIX keeps whole in a pipe); only a single line longer
than that could be interleaved, and access lines are far shorter.
"""

from __future__ import annotations

import asyncio
import os
import select
import sys
import time
from functools import lru_cache
from typing import IO, TYPE_CHECKING

import orjson

from apishield.config import worker_role

if TYPE_CHECKING:
    from apishield.auth.principal import Principal

Entry = tuple[str, str, str | None, str | None, int, float, str, str, str | None, float,
              "Principal | None"]


FLUSH_EVERY = 512  # entries; also flushed every 100 ms
PIPE_BUF = getattr(select, "PIPE_BUF", 512)  # a pipe keeps a write of this size whole


def line_chunks(data: bytes, limit: int = PIPE_BUF) -> list[bytes]:
    """`data` (whole lines) cut into runs of whole lines of at most `limit` bytes each
    (a longer line is a run of its own)."""
    chunks: list[bytes] = []
    start = 0
    while start < len(data):
        end = start + limit
        if end >= len(data):
            chunks.append(data[start:])
            break
        cut = data.rfind(b"\n", start, end)
        if cut < 0:  # one line longer than `limit`: whole, alone
            cut = data.find(b"\n", end)
            if cut < 0:
                cut = len(data) - 1
        chunks.append(data[start:cut + 1])
        start = cut + 1
    return chunks


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        # Not `view[os.write(fd, view):]`: mypyc 2.4.1 evaluates a slice bound twice when
        # the sliced object is not a native type (tests/test_compiled.py): a second write.
        written = os.write(fd, view)
        view = view[written:]


def _middle(method: str, route: str | None, operation: str | None) -> bytes:
    return b'"method":%b,"route":%b,"operation":%b' % (
        orjson.dumps(method), orjson.dumps(route), orjson.dumps(operation))


def _end(outcome: str, reason: str | None) -> bytes:
    return b'"outcome":%b,"reason":%b' % (orjson.dumps(outcome), orjson.dumps(reason))


class AccessLog:
    def __init__(self, path: str) -> None:
        self._owned = path != "-"
        self._stream: IO[bytes] = (
            open(path, "ab", buffering=1 << 16) if self._owned else sys.stdout.buffer
        )
        # entries not written yet: `Pipeline.record` appends to this list itself and calls
        # `wake` when it starts a batch or fills one (a call less per request, issue 18)
        self.pending: list[Entry] = []
        self._flush_scheduled = False
        self._second = -1
        self._stamp = b""
        # memoized JSON fragments: method, route and operation repeat together, as do
        # outcome and reason, and client addresses (one lookup each instead of five dumps)
        self._middle = lru_cache(maxsize=4096)(_middle)
        self._end = lru_cache(maxsize=4096)(_end)
        self._ip = lru_cache(maxsize=4096)(orjson.dumps)
        role = worker_role.current()
        # which worker of `serve --workers N` wrote a line; then whole-line writes only
        self._worker = b"" if role is None else b',"worker":%d' % role.index
        self._shared = role is not None

    def record(self, entry: Entry) -> None:
        """`entry` is FIELDS in order, then the wall-clock time of the request's end."""
        pending = self.pending
        pending.append(entry)
        if len(pending) == 1 or len(pending) >= FLUSH_EVERY:
            self.wake()

    def wake(self) -> None:
        """An entry was appended to `pending` that started a batch or filled one: schedule
        the batch's write, or write it now. (Between the two, a write is scheduled already:
        every batch's first entry scheduled it.)"""
        if len(self.pending) >= FLUSH_EVERY and self._flush_scheduled:
            # Bound the batch: formatting thousands of lines at once is a latency spike.
            self._flush_scheduled = False
            self.flush()
            return
        if not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                asyncio.get_running_loop().call_later(0.1, self.flush)
            except RuntimeError:  # no loop (tests, shutdown): write now
                self.flush()

    def flush(self) -> None:
        self._flush_scheduled = False
        if not self.pending:
            return
        entries, self.pending = self.pending, []
        middle, end, address = self._middle, self._end, self._ip  # memoized fragments
        dumps = orjson.dumps  # ids do not repeat: they would only churn a cache
        worker = self._worker
        lines = []
        for (rid, method, route, operation, status, duration, ip, outcome, reason, ts,
             principal) in entries:
            # `_timestamp` inlined: a call less per line
            second = int(ts)
            if second != self._second:  # formatting a date costs more than the whole line
                self._second = second
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
            # Every string goes through orjson, so the line is valid, escaped JSON.
            who = b""
            if principal is not None:  # who it was: the verified subject, the key id
                who = b',"subject":%b,"key_id":%b' % (dumps(principal.subject),
                                                      dumps(principal.key_id))
            lines.append(
                b'{"ts":"%b.%03dZ","level":"info","kind":"access","logger":"apishield.access",'
                b'"msg":"request","request_id":%b,%b,"status":%d,"duration_ms":%.3f,'
                b'"client_ip":%b,%b%b%b}\n'
                % (self._stamp, int((ts - second) * 1000), dumps(rid),
                   middle(method, route, operation), status, duration, address(ip),
                   end(outcome, reason), who, worker)
            )
        try:
            if self._shared:
                self._write_shared(b"".join(lines))
            else:
                self._stream.write(b"".join(lines))
                self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed stdout must not take the gateway down

    def _write_shared(self, data: bytes) -> None:
        """Write as other workers write the same file: see the module docstring."""
        self._stream.flush()  # nothing is pending in it, but never write around it
        fd = self._stream.fileno()
        if self._owned:  # opened with O_APPEND: one write() is appended whole
            write_all(fd, data)
            return
        for chunk in line_chunks(data):
            write_all(fd, chunk)

    def close(self) -> None:
        self.flush()
        if self._owned:
            self._stream.close()
