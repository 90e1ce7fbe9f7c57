"""One structured JSON line per request (checklist F2), written without blocking the loop.

Only fields apishield computed are logged: the route template instead of the concrete
path, no query string, no header values, so tokens, API keys and cookies cannot leak into
logs (F6). Lines are buffered and flushed at most every 100 ms and at shutdown: a `write`
per request to a pipe or disk would cost more than the routing itself.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import IO, Any

import orjson


class AccessLog:
    def __init__(self, path: str) -> None:
        self._owned = path != "-"
        self._stream: IO[bytes] = (
            open(path, "ab", buffering=1 << 16) if self._owned else sys.stdout.buffer
        )
        self._pending: list[bytes] = []
        self._flush_scheduled = False
        self._second = -1
        self._stamp = ""

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:  # formatting a date costs more than the rest of the line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    def record(self, entry: dict[str, Any]) -> None:
        entry["ts"] = self._timestamp()
        self._pending.append(orjson.dumps(entry) + b"\n")
        if not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                asyncio.get_running_loop().call_later(0.1, self.flush)
            except RuntimeError:  # no loop (tests, shutdown): write now
                self.flush()

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._pending:
            lines, self._pending = self._pending, []
            try:
                self._stream.write(b"".join(lines))
                self._stream.flush()
            except (OSError, ValueError):
                pass  # a closed stdout must not take the gateway down

    def close(self) -> None:
        self.flush()
        if self._owned:
            self._stream.close()
