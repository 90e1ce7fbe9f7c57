"""The upstream client: a keep-alive pool of `asyncio.Protocol` connections parsed by llhttp.

PERF-BASELINE.md shows the upstream client dominates a Python proxy's cost (aiohttp ~200 us
a request, httpx far more); a protocol on httptools costs tens of microseconds. So this
module owns the little HTTP/1.1 client the gateway needs and nothing more:

- requests are serialized by the caller (`gateway.py`), bodies are sent with Content-Length;
- a response is handed back as soon as it is complete, or, for a large or slow body, once
  64 KiB are buffered, as a stream with flow control (the upstream socket is paused while
  the client is slow, so memory stays bounded);
- a pooled connection that the upstream closed while idle is detected and not reused; a
  request that fails on a reused connection before any response byte arrived is retried
  once on a fresh one when its method is idempotent (RFC 9110 9.2.2), like nginx does;
- a connection is reused only if every byte it received belonged to the response in
  flight. Bytes while idle, after a complete response (a second response, more body than
  Content-Length), or any body to HEAD / on 204 / 304 (RFC 9112 6.3) would be parsed as the
  *next* client's response: the connection is closed instead (issue 11, the cross-client
  leak). Callbacks only record what llhttp saw; waiters are told after the whole packet is
  parsed, so a response is never handed on before its stray tail has been seen.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable

import httptools

from apishield.exchange import Headers, connection_tokens, content_length
from apishield.http.deadlines import HasDeadline
from apishield.observe.metrics import METRICS
from apishield.problems import BadGateway, GatewayTimeout, ServiceUnavailable, TooManyRequests

STREAM_THRESHOLD = 64 * 1024  # buffer up to this much before switching to streaming
HIGH_WATER = 256 * 1024  # pause the upstream socket above this many unread bytes
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
    }
)
# Request fields the gateway replaces on the way to the upstream: read from the client,
# never forwarded as sent (the `X-Apishield-*` identity namespace neither).
REQUEST_OWNED = HOP_BY_HOP | {
    b"host", b"content-length", b"expect", b"x-request-id",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip",
}
IDENTITY_PREFIX = b"x-apishield-"


def owned_twin(name: bytes) -> bool:
    """Whether a field name with an underscore is the twin of one the gateway owns:
    WSGI/CGI backends read `X_Forwarded_For` as `X-Forwarded-For`, so such a twin is a
    spoofing attempt and is never forwarded."""
    dashed = name.replace(b"_", b"-")
    return dashed in REQUEST_OWNED or dashed.startswith(IDENTITY_PREFIX)


# Never passed on from a response (the gateway frames the body itself): dropped as the
# parser reports them, so the response headers are never copied to be filtered.
RESPONSE_DROPPED = HOP_BY_HOP | {b"content-length"}

logger = logging.getLogger("apishield")


class _Stray(Exception):
    """Raised from a parser callback: the bytes left in this packet belong to no request."""


class _Throttle:
    """At most one log line a second for a recurring upstream fault, with the count."""

    def __init__(self) -> None:
        self.last = 0.0
        self.suppressed = 0

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last < 1.0:
            self.suppressed += 1
            return
        suppressed, self.suppressed, self.last = self.suppressed, 0, now
        logger.warning(message + " (%d more since the last line)", *args, suppressed)


_stray_bytes_log = _Throttle()


Ready = Callable[["UpstreamConnection", "UpstreamError | None"], None]


class UpstreamError(Exception):
    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


def problem_for(error: UpstreamError) -> BadGateway | GatewayTimeout:
    if error.reason == "upstream-timeout":
        return GatewayTimeout("upstream-read-timeout")
    return BadGateway(error.reason)


class UpstreamResponse:
    """Status, headers, the body received so far and, if not complete, a stream of the rest."""

    __slots__ = (
        "_conn", "body", "complete", "connection_tokens", "content_length", "headers", "status",
    )

    def __init__(self, conn: UpstreamConnection) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self.connection_tokens = conn.connection_tokens
        self.body = b"".join(conn.chunks)
        conn.chunks.clear()
        conn.buffered = 0
        self.complete = conn.complete
        self.content_length = conn.content_length

    async def read(self) -> bytes:
        """The next piece of a streamed body; b"" at the end. Raises a Problem."""
        try:
            return await self._conn.read_chunk()
        except UpstreamError as exc:
            raise problem_for(exc) from None

    def release(self) -> None:
        """Give the connection back (or close it) once the body has been consumed."""
        self._conn.finish()


class UpstreamConnection(HasDeadline, asyncio.Protocol):
    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reused = False
        self.closed = False
        self.owner = ""  # the client whose request holds it (UpstreamPool's share)
        self.sent_at = 0.0  # loop time the request was written (upstream duration)
        self._reset()

    def _reset(self) -> None:
        self.in_flight = False  # a request was written and its response is expected
        self.wake_pending = False  # tell the waiter once the current packet is parsed
        self.body_pending = False  # a streamed request body is still being written
        self.status = 0
        self.headers: Headers = []
        self.connection_tokens: frozenset[bytes] = frozenset()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.content_length: int | None = None
        self.complete = False
        self.head_done = False
        self.keep_alive = False
        self.got_bytes = False
        self.streaming = False
        self.head_only = False
        self.waiter: asyncio.Future[None] | None = None
        self.on_ready: Ready | None = None  # callback mode (no task, no future)
        self.on_write_pressure: Callable[[bool], None] | None = None  # streamed request body
        self.error: UpstreamError | None = None
        self.paused = False

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream Protocol is always handed an asyncio.Transport; typeshed types
        # connection_made with BaseTransport (that of every protocol kind)
        self.transport = transport  # type: ignore[assignment]
        self.pool.reached = True  # readiness: the upstream answered a connection once

    def pause_writing(self) -> None:
        """The upstream reads a streamed request body slower than the client sends it."""
        if self.on_write_pressure is not None:
            self.on_write_pressure(True)

    def resume_writing(self) -> None:
        if self.on_write_pressure is not None:
            self.on_write_pressure(False)

    def refresh_deadline(self) -> None:
        """While a request body streams, the read timeout counts from its last piece."""
        if self.deadline:
            self.deadline = self.loop.time() + self.pool.read_timeout

    def data_received(self, data: bytes) -> None:
        if not self.in_flight or self.complete:
            self._stray("after its response" if self.in_flight else "while idle")
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # a second message, a body where none may be, or garbage after the response
            if isinstance(exc.__context__, _Stray) or self.complete:
                self._stray("after its response")
            else:
                self._fail(UpstreamError("upstream-bad-response"))
                self._close()
                return
        if self.wake_pending:
            self.wake_pending = False
            self._signal(None)

    def _stray(self, when: str) -> None:
        """Bytes outside the framing of the response in flight: this connection can never
        be trusted to delimit a response again, so it is closed, never pooled. A complete
        response already received is still answered (nginx does the same)."""
        _stray_bytes_log.warn(
            "upstream %s:%d sent bytes %s; connection closed, not reused",
            self.pool.host, self.pool.port, when,
        )
        self._close()
        self.pool.forget(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if not self.complete:
            self._fail(
                UpstreamError("upstream-closed", retryable=self.reused and not self.got_bytes)
            )

    # -- llhttp callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.head_done:  # a second message after the one in flight
            raise _Stray

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in RESPONSE_DROPPED:  # read here, never forwarded (RFC 9110 7.6.1)
            if name == b"content-length":
                self.content_length = content_length(value)
            elif name == b"connection":
                self.connection_tokens |= connection_tokens(value)
            return
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.headers = []  # an interim response (RFC 9110 15.2): wait for the final one
            self.connection_tokens = frozenset()
            self.content_length = None
            return
        self.status = status
        self.head_done = True
        METRICS.upstream_duration.observe(self.loop.time() - self.sent_at)
        self.keep_alive = self.parser.should_keep_alive()
        if self.head_only or status in (204, 304):
            # No body follows (RFC 9112 6.3); llhttp cannot be told so for HEAD, so the
            # message ends here and the next response gets a fresh parser.
            self.complete = True
            self.parser = httptools.HttpResponseParser(self)
            self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:  # a body to HEAD, or on a 204 / 304
            raise _Stray
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        if not self.streaming and self.buffered >= STREAM_THRESHOLD:
            self.streaming = True
            self._wake()
        elif self.streaming:
            self._wake()

    def on_message_complete(self) -> None:
        if not self.head_done or self.complete:
            return  # the end of an interim 1xx response, or of a HEAD / 204 / 304 one
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # -- used by the pool and the response ---------------------------------------------
    def _wake(self) -> None:
        """From a parser callback: signal once `data_received` has parsed the packet."""
        self.wake_pending = True

    def _fail(self, error: UpstreamError) -> None:
        self.error = error
        self._signal(error)

    def _signal(self, error: UpstreamError | None) -> None:
        """Tell whoever waits (a callback in fast-path mode, else a future) once."""
        callback = self.on_ready
        if callback is not None:
            self.on_ready = None
            self.deadline = 0.0
            callback(self, error)
            return
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def send(self, payload: bytes, *, head_only: bool) -> UpstreamResponse:
        self.start(payload, head_only=head_only)
        return await self.response()

    def start(self, payload: bytes, *, head_only: bool) -> None:
        """Write a request (or, for a streamed body, its head) and start the read timeout."""
        self.head_only = head_only
        self.sent_at = self.loop.time()
        self.in_flight = True
        assert self.transport is not None
        self.transport.write(payload)
        self.expire_at(self.pool.read_timeout, self._timeout)

    async def response(self) -> UpstreamResponse:
        """Wait until the response is complete or starts streaming."""
        if self.error is not None:
            raise self.error
        if not (self.head_done and (self.complete or self.streaming)):
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        self.deadline = 0.0
        return UpstreamResponse(self)

    def send_nowait(self, payload: bytes, *, head_only: bool, on_ready: Ready) -> None:
        """Callback mode: `on_ready(conn, error)` runs when the response is complete or
        starts streaming, or on failure. Costs no task and no future: the proxy's
        common case (a small response on a pooled connection) runs entirely in callbacks.
        """
        self.head_only = head_only
        self.in_flight = True
        self.on_ready = on_ready
        self.sent_at = self.loop.time()
        assert self.transport is not None
        self.transport.write(payload)
        self.expire_at(self.pool.read_timeout, self._timeout)

    def _timeout(self) -> None:
        self._fail(UpstreamError("upstream-timeout"))
        self._close()

    async def read_chunk(self) -> bytes:
        while True:
            if self.chunks:
                chunk = self.chunks.popleft()
                self.buffered -= len(chunk)
                if self.paused and self.buffered < HIGH_WATER // 2 and self.transport:
                    self.paused = False
                    self.transport.resume_reading()
                return chunk
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            if self.paused and self.transport:
                # Everything buffered was taken (UpstreamResponse takes the first pieces
                # whole): reading must resume, or the upstream is never read again and the
                # request ends in a 504 after read_timeout (seen under load, issue 11).
                self.paused = False
                self.transport.resume_reading()
            self.waiter = self.loop.create_future()
            self.expire_at(self.pool.read_timeout, self._timeout)
            try:
                await self.waiter
            finally:
                self.deadline = 0.0
                self.waiter = None

    def finish(self) -> None:
        """Return to the pool if the exchange ended cleanly, else close."""
        if (
            self.complete and not self.closed and self.error is None and self.keep_alive
            and not self.body_pending  # the upstream answered before a streamed body ended
        ):
            self._reset()
            self.reused = True
            self.pool.release(self)
        else:
            self._close()
            self.pool.forget(self)


class UpstreamPool:
    """Keep-alive connections to one upstream, at most `max_connections` busy at once and
    at most `max_per_client` of them for one client (the client IP): a client that never
    reads its responses holds upstream connections until `timeouts.write`, and without a
    share 300 such connections from one address took the whole pool from everyone else
    (issue 11). Over its share a request is refused at once with 429 (it is that client's
    concurrency, RFC 6585 4), never queued behind the others."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
        max_connections: int,
        max_per_client: int,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.loop = asyncio.get_running_loop()
        self.idle: list[UpstreamConnection] = []
        self.busy: set[UpstreamConnection] = set()
        self.held: dict[str, int] = {}  # busy connections per client
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self.reached = False  # a connection was made once (GET /readyz)

    def _claim(self, conn: UpstreamConnection, owner: str) -> None:
        self.busy.add(conn)
        conn.owner = owner
        self.held[owner] = self.held.get(owner, 0) + 1

    def _unclaim(self, conn: UpstreamConnection) -> None:
        """Only for a connection in `busy`: the one place the share count goes down."""
        self.busy.discard(conn)
        count = self.held[conn.owner] - 1
        if count:
            self.held[conn.owner] = count
        else:
            del self.held[conn.owner]

    def over_share(self, owner: str) -> bool:
        return self.held.get(owner, 0) >= self.max_per_client

    def take_idle(self, owner: str) -> UpstreamConnection | None:
        """A pooled live connection, marked busy for `owner`, or None (then use
        `request`, which also says why when the client is over its share)."""
        if self.over_share(owner):
            return None
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                self._claim(conn, owner)
                return conn
        return None

    async def request(self, payload: bytes, method: str, owner: str) -> UpstreamResponse:
        """Send a serialized request; map every failure to a Problem (502/503/504)."""
        for attempt in (0, 1):
            conn = await self._acquire(owner)
            try:
                return await conn.send(payload, head_only=method == "HEAD")
            except UpstreamError as exc:
                conn._close()
                self.forget(conn)
                if exc.retryable and attempt == 0 and method in IDEMPOTENT:
                    continue
                raise problem_for(exc) from None
        raise BadGateway("upstream-closed")  # pragma: no cover - loop always returns/raises

    async def acquire(self, owner: str) -> UpstreamConnection:
        """A connection for a request that cannot be retried (a streamed body)."""
        return await self._acquire(owner)

    async def _acquire(self, owner: str) -> UpstreamConnection:
        if self.over_share(owner):
            raise TooManyRequests("upstream-client-share-exceeded",
                                  headers=[(b"retry-after", b"1")])
        conn = self.take_idle(owner)
        if conn is not None:
            return conn
        if len(self.busy) >= self.max_connections:
            waiter = self.loop.create_future()
            self._slot_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, self.connect_timeout)
            except TimeoutError:
                raise ServiceUnavailable("upstream-pool-exhausted") from None
            return await self._acquire(owner)
        conn = UpstreamConnection(self)
        self._claim(conn, owner)
        try:
            await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: conn, self.host, self.port, ssl=self.tls,
                    server_hostname=self.host if self.tls else None,
                ),
                self.connect_timeout,
            )
        except TimeoutError:
            self._unclaim(conn)
            raise GatewayTimeout("upstream-connect-timeout") from None
        except ssl.SSLCertVerificationError:
            # the upstream's certificate is not trusted (upstream.tls.ca) or not for its
            # host: a 502, and the log's reason says why, not "unreachable"
            self._unclaim(conn)
            self._wake_waiter()
            raise BadGateway("upstream-tls-verify-failed") from None
        except ssl.SSLError:
            self._unclaim(conn)
            self._wake_waiter()
            raise BadGateway("upstream-tls-handshake-failed") from None
        except OSError:
            self._unclaim(conn)
            self._wake_waiter()
            raise BadGateway("upstream-unreachable") from None
        return conn

    async def probe(self) -> str | None:
        """For readiness before any request went through: open (and close) a connection;
        None when it worked, else why not."""
        try:
            transport, _ = await asyncio.wait_for(
                self.loop.create_connection(
                    asyncio.Protocol, self.host, self.port, ssl=self.tls,
                    server_hostname=self.host if self.tls else None),
                self.connect_timeout)
        except TimeoutError:
            return f"no connection within {self.connect_timeout:g} s"
        except (OSError, ssl.SSLError) as exc:
            return exc.strerror or type(exc).__name__
        transport.close()
        self.reached = True
        return None

    def release(self, conn: UpstreamConnection) -> None:
        if conn in self.busy:
            self._unclaim(conn)
        self.idle.append(conn)
        self._wake_waiter()

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self.busy:
            self._unclaim(conn)
            self._wake_waiter()
        if conn in self.idle:
            self.idle.remove(conn)

    def _wake_waiter(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for conn in [*self.idle, *self.busy]:
            conn._close()
        self.idle.clear()
        self.busy.clear()
        self.held.clear()
