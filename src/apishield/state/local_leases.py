"""Counters shared by the worker processes of `apishield serve --workers N`, with no
external service: the supervisor serves leases the way Redis does (`redis_counters`).

Why: a worker deciding alone would admit N times a limit. The truth lives in the
supervisor's `LeaseBook`, and each worker leases a few tokens of a key at a time through
`LocalLeaseCounters`, which is `leases.LeaseCounters` (the same client logic as Redis:
slow start, refill ahead, single flight, cached refusals, one batch per event-loop tick)
talking to a `LeaseServer` on a Unix socket instead of EVALSHA to Redis.

`LeaseBook` evaluates the four operations in Python, a line-for-line port of the Lua
scripts in `redis_counters` (`_RATE_LEASE`, `_RATE_RELEASE`, `_QUOTA_LEASE`,
`_QUOTA_RELEASE`): the same integer microseconds (`TIME`), the same rounding of the
stored TAT ('%.0f'), the same expiry of idle keys (PX, PEXPIREAT). Its clock is the
supervisor's monotonic clock, one clock for every worker, as Redis's is for gateways.
The supervisor's event loop runs one batch at a time, so each operation is atomic like
a script.

Accuracy bound: the one proven in `redis_counters` with G = N workers. Each worker holds
at most L = n + n // 2 unspent tokens (n = max(1, floor(burst * lease_fraction))), so
admissions in any window of W seconds <= burst + W / T + N * L; e.g. burst 100,
lease_fraction 0.02: n = 2, L = 3, and 2 workers admit at most 6 over an exact limiter.
Quotas never over-admit. A worker that dies holding tokens takes them with it until
their reservation runs out (a rate key's TAT passes: at most L * T later); nothing in the
server waits for the dead worker.

Framing: a request is a 4-byte big-endian length and an orjson array of calls
`[operation, key, [arguments...]]`; the answer is framed alike, one result per call
(a list of ints, or `{"error": text}`). One batch in flight per connection, so no ids.
The socket lives in a private directory (0700) and is itself 0600: only the user the
supervisor runs as can spend the limits.

Cost (bench/counters_bench.py, bench/RESULTS.md): a round trip costs a worker ~40% of
the client CPU of a redis-py one (73 us against 189 us on a loaded machine), which is why
`lease_fraction` keeps its default for this backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import orjson

from apishield.state.leases import (
    DOWN_FOR,
    LEASE_TTL,
    QUOTA_LEASE,
    QUOTA_RELEASE,
    RATE_LEASE,
    RATE_RELEASE,
    Call,
    LeaseCounters,
)

logger = logging.getLogger("apishield.state")

_LENGTH = struct.Struct(">I")
MAX_FRAME = 16 << 20  # bytes: a batch of every key of a busy tick is far smaller
SWEEP_EVERY = 5.0  # seconds between sweeps of expired keys (bounded memory)


class LeaseServerRefused(Exception):
    """An operation the server could not run (an unknown operation, bad arguments)."""


def _clock_us() -> int:
    """The server's clock in whole microseconds, like Redis's `TIME`."""
    return time.monotonic_ns() // 1000


def _store_tat(tat: float) -> float:
    """What the scripts store: `string.format('%.0f', tat)` read back by `tonumber`."""
    return float(f"{tat:.0f}")


class LeaseBook:
    """The four lease operations on one dict, on one clock (see the module docstring).
    Values expire like Redis keys: an entry is (value, expiry in clock microseconds)."""

    def __init__(self, clock_us: Callable[[], int] = _clock_us,
                 wall: Callable[[], float] = time.time) -> None:
        self._clock_us = clock_us
        self._wall = wall  # quotas expire at an epoch time (PEXPIREAT)
        self._values: dict[str, tuple[float, float]] = {}
        self.operations = 0  # run so far (for tests and stats)

    def __len__(self) -> int:
        return len(self._values)

    def _get(self, name: str, now: int) -> float | None:
        entry = self._values.get(name)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._values[name]
            return None
        return entry[0]

    def sweep(self) -> int:
        """Drop expired keys (Redis's active expiry); how many were dropped."""
        now = self._clock_us()
        expired = [name for name, (_value, until) in self._values.items() if until <= now]
        for name in expired:
            del self._values[name]
        return len(expired)

    def run(self, operation: int, name: str, args: Sequence[str | int]) -> list[int]:
        self.operations += 1
        if operation == RATE_LEASE:
            return self.rate_lease(name, float(args[0]), int(args[1]), int(args[2]),
                                   int(args[3]))
        if operation == RATE_RELEASE:
            return self.rate_release(name, float(args[0]))
        if operation == QUOTA_LEASE:
            return self.quota_lease(name, int(args[0]), int(args[1]), int(args[2]))
        if operation == QUOTA_RELEASE:
            return self.quota_release(name, int(args[0]))
        raise LeaseServerRefused(f"unknown operation {operation!r}")

    def rate_lease(self, name: str, interval: float, burst: int, want: int,
                   least: int) -> list[int]:
        """`_RATE_LEASE`: grant k = min(want, what fits) tokens by moving the TAT, or
        refuse and say (in us) when `least` tokens fit."""
        now = self._clock_us()
        capacity = burst * interval
        stored = self._get(name, now)
        tat = float(now) if stored is None else stored
        if tat < now:
            tat = float(now)
        fits = math.floor((capacity - (tat - now) + 1) / interval)
        if fits >= least:
            k = min(want, fits)
            tat = tat + k * interval
            self._values[name] = (_store_tat(tat),
                                  now + (math.ceil((tat - now) / 1000) + 1) * 1000)
            return [k, math.ceil(tat - now)]
        return [0, math.ceil(tat - now), math.ceil(tat + least * interval - capacity - now)]

    def rate_release(self, name: str, give_back: float) -> list[int]:
        """`_RATE_RELEASE`: move the TAT back by the unspent tokens' time."""
        now = self._clock_us()
        stored = self._get(name, now)
        if stored is None:
            return [0]
        tat = stored - give_back
        if tat <= now:
            del self._values[name]
        else:
            self._values[name] = (_store_tat(tat),
                                  now + (math.ceil((tat - now) / 1000) + 1) * 1000)
        return [1]

    def quota_lease(self, name: str, limit: int, want: int, expire_at_ms: int) -> list[int]:
        """`_QUOTA_LEASE`: INCRBY the period's counter by k = min(want, limit - used)."""
        now = self._clock_us()
        used = int(self._get(name, now) or 0)
        k = min(want, limit - used)
        if k <= 0:
            return [0, used]
        used += k
        until = now + (expire_at_ms / 1000 - self._wall()) * 1e6
        self._values[name] = (float(used), until)
        return [k, used]

    def quota_release(self, name: str, tokens: int) -> list[int]:
        """`_QUOTA_RELEASE`: DECRBY the unspent tokens (never below zero)."""
        now = self._clock_us()
        entry = self._values.get(name)
        used = self._get(name, now)
        if entry is None or used is None or used <= 0:
            return [0]
        left = int(used) - min(tokens, int(used))
        self._values[name] = (float(left), entry[1])
        return [left]


def encode(value: object) -> bytes:
    body = orjson.dumps(value)
    return _LENGTH.pack(len(body)) + body


class FrameReader:
    """Bytes in, whole frames (their bodies) out."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The frames `data` completes; ValueError for a frame over MAX_FRAME."""
        buffer = self._buffer
        buffer += data
        frames: list[bytes] = []
        while len(buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer)
            if length > MAX_FRAME:
                raise ValueError(f"frame of {length} bytes is over {MAX_FRAME}")
            end = _LENGTH.size + length
            if len(buffer) < end:
                break
            frames.append(bytes(buffer[_LENGTH.size:end]))
            del buffer[:end]
        return frames


class _WorkerConnection(asyncio.Protocol):
    """The server's end of one worker's connection: each frame is run as it arrives
    (the event loop runs one at a time: each operation is atomic) and answered."""

    def __init__(self, server: LeaseServer) -> None:
        self.server = server
        self.frames = FrameReader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance
        self.transport = cast(asyncio.Transport, transport)
        self.server.connected(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.disconnected(self)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        run = self.server.book.run
        try:
            for frame in self.frames.feed(data):
                results: list[object] = []
                for operation, name, args in orjson.loads(frame):
                    try:
                        results.append(run(operation, name, args))
                    except (LeaseServerRefused, ValueError, TypeError, IndexError) as exc:
                        results.append({"error": f"{type(exc).__name__}: {exc}"[:200]})
                self.transport.write(encode(results))
        except (ValueError, TypeError) as exc:  # framing or JSON broken: drop this worker
            logger.warning("lease server: dropped a worker's connection (%s)",
                           f"{type(exc).__name__}: {exc}"[:200])
            self.transport.abort()


class LeaseServer:
    """The supervisor's end: a `LeaseBook` served on a Unix socket (0600). Each
    connection is one worker; a connection that breaks its framing is closed (only that
    worker's next batch fails, and its client reconnects)."""

    def __init__(self, book: LeaseBook | None = None) -> None:
        self.book = book or LeaseBook()
        self.path: Path | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_WorkerConnection] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.connections = 0  # accepted so far

    def connected(self, connection: _WorkerConnection) -> None:
        self.connections += 1
        self._connections.add(connection)

    def disconnected(self, connection: _WorkerConnection) -> None:
        self._connections.discard(connection)

    async def start(self, path: Path) -> None:
        """Listen on `path`, which must be in a directory only this user can enter."""
        loop = asyncio.get_running_loop()
        old_umask = os.umask(0o177)  # the socket is created 0600, never briefly wider
        try:
            self._server = await loop.create_unix_server(
                lambda: _WorkerConnection(self), path=str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self.path = path
        self._sweeper = loop.create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            self.book.sweep()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            self._server.close()
            for connection in list(self._connections):
                if connection.transport is not None:
                    connection.transport.abort()
            await self._server.wait_closed()
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()


class _ClientConnection(asyncio.Protocol):
    """A worker's end: one batch in flight at a time, its answer resolves `waiter`."""

    def __init__(self) -> None:
        self.frames = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[bytes] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(exc or EOFError("the lease server closed the connection"))

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.frames.feed(data)
        except ValueError as exc:
            self._fail(OSError(f"lease server: {exc}"))
            return
        for frame in frames:
            waiter, self.waiter = self.waiter, None
            if waiter is None or waiter.done():
                self._fail(OSError("lease server: an answer nobody asked for"))
                return
            waiter.set_result(frame)

    def _fail(self, error: BaseException) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self.transport is not None:
            self.lost = True
            self.transport.abort()


def _time_out(waiter: asyncio.Future[bytes]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("the lease server did not answer in time"))


class LocalLeaseCounters(LeaseCounters):
    """A worker's counters: `LeaseCounters` over one Unix-socket connection to the
    supervisor's `LeaseServer`, opened on first use and again after any error. A bare
    protocol, not asyncio streams: a round trip costs a worker about half the CPU."""

    server_name = "the supervisor's lease server"
    _close_errors = (OSError, TimeoutError, EOFError, ValueError)

    def __init__(self, path: str | Path, *, lease_fraction: float = 0.02,
                 timeout: float = 0.25, lease_ttl: float = LEASE_TTL,
                 down_for: float = DOWN_FOR) -> None:
        super().__init__(f"supervisor lease server ({path})", lease_fraction=lease_fraction,
                         lease_ttl=lease_ttl, down_for=down_for)
        self._path = str(path)
        self._timeout = timeout
        self._connection: _ClientConnection | None = None

    async def _execute(self, calls: Sequence[Call]) -> list[Any]:
        self.round_trips += 1
        loop = asyncio.get_running_loop()
        connection = self._connection
        if connection is None or connection.lost:
            connection = await self._connect()
        if connection.waiter is not None:  # the flusher sends one batch at a time
            raise RuntimeError("lease server: a batch is already in flight")
        waiter: asyncio.Future[bytes] = loop.create_future()
        connection.waiter = waiter
        assert connection.transport is not None
        connection.transport.write(encode(
            [[operation, name, list(args)] for operation, name, args in calls]))
        timer = loop.call_later(self._timeout, _time_out, waiter)
        try:
            answer = orjson.loads(await waiter)
        except BaseException:
            self._drop()  # a late answer would be taken for the next batch's
            raise
        finally:
            timer.cancel()
        if not isinstance(answer, list) or len(answer) != len(calls):
            self._drop()
            raise OSError("lease server: malformed answer")
        return [LeaseServerRefused(result["error"]) if isinstance(result, dict) else result
                for result in answer]

    async def _connect(self) -> _ClientConnection:
        self._connection = None
        _transport, connection = await asyncio.wait_for(
            asyncio.get_running_loop().create_unix_connection(_ClientConnection, self._path),
            self._timeout)
        self._connection = connection
        return connection

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and connection.transport is not None:
            connection.lost = True
            connection.transport.abort()

    async def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and connection.transport is not None:
            connection.transport.close()
            await asyncio.sleep(0)  # let the transport finish closing on this loop
