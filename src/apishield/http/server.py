"""The client side of the gateway: an `asyncio.Protocol` fed by llhttp (httptools).

llhttp does the parsing and already refuses the classic smuggling vectors (Content-Length
with Transfer-Encoding, repeated Content-Length, a Transfer-Encoding that does not end in
`chunked`); this module owns the glue, and tests it (tests/test_security_regressions.py):

- limits that must hold before anything is buffered: URL length (414), header bytes and
  count (431), body bytes (413, refused on `Content-Length` or as soon as a chunked body
  passes the limit), header/body/idle timeouts against slow clients (408 / close);
- HTTP/1.1 keep-alive and pipelining: requests are answered strictly in order, one at a
  time per connection; a backlog of pipelined requests pauses reading;
- a malformed request gets a 400 problem and the connection is closed (after answering
  the requests before it), since the parser cannot know where the next one starts;
- responses stream to the client with flow control (`pause_writing`), so a slow reader
  slows the upstream socket instead of growing memory;
- back-pressure on every write path (issue 11): while the client has not read a response
  past the transport's high-water mark, its next pipelined request waits (and reading
  stops), `timeouts.write` counts from the moment writing pauses whether the response was
  streamed or written whole, and a closing connection with unsent bytes is cut after it.
  Responses held whole to be filtered are charged to one gateway-wide budget
  (`responses.max_buffered_bytes`) until the client has read them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections import deque
from functools import lru_cache
from typing import TYPE_CHECKING

import httptools

from apishield.contract.paths import split_target
from apishield.exchange import Exchange, Headers, connection_tokens, content_length
from apishield.http.deadlines import HasDeadline
from apishield.http.tls import client_identity
from apishield.http.upstream import (
    IDEMPOTENT,
    IDENTITY_PREFIX,
    REQUEST_OWNED,
    UpstreamConnection,
    UpstreamError,
    UpstreamResponse,
    owned_twin,
    problem_for,
)
from apishield.observe.logjson import fields
from apishield.pipeline import REASONS, Pipeline
from apishield.problems import (
    BadGateway,
    BadRequest,
    Forbidden,
    HeadersTooLarge,
    InternalError,
    PayloadTooLarge,
    Problem,
    RequestTimeout,
    ServiceUnavailable,
    UriTooLong,
)

if TYPE_CHECKING:
    from apishield.gateway import Gateway, Reply

logger = logging.getLogger("apishield")

STATUS_LINES = {code: b"HTTP/1.1 %d %b\r\n" % (code, reason) for code, reason in REASONS.items()}
MAX_PIPELINED = 16
STREAM_MIN = 64 * 1024  # request bodies announced larger than this stream to the upstream
STREAM_HIGH_WATER = 256 * 1024  # stop reading the client while this much waits for upstream
CLIENT_CLOSED = 499  # logged status of a request whose client left first (as nginx logs it)
HEAD_SLACK = 8 * 1024  # request-line and framing bytes allowed beyond the header limits
# RFC 9110 7.2 / RFC 3986 3.2.2: Host is uri-host [":" port]; uri-host is an IP literal in
# brackets (checked again by `ipaddress`), or a reg-name (IPv4 addresses are reg-names too)
_HOST = re.compile(
    rb"(?:(?P<literal>\[[0-9A-Fa-f:.]+\])|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)"
    rb"(?::[0-9]*)?"
)
CUT_ELSEWHERE = 256 * 1024  # response bodies cut in the worker process above this
WRITE_HIGH_WATER = 64 * 1024  # unsent response bytes before writing pauses (low: a quarter)


@lru_cache(maxsize=1024)
def valid_host(value: bytes) -> bool:
    """Whether a Host value is uri-host [":" port] (empty is allowed: RFC 9112 3.2).
    Memoized: clients send the same few Host values, and the regex was ~3% of a request."""
    match = _HOST.fullmatch(value)
    if match is None:
        return False
    literal = match.group("literal")
    if literal is not None:
        try:
            ipaddress.IPv6Address(literal[1:-1].decode("ascii"))
        except ValueError:
            return False
    return True


class _StopParsing(Exception):
    """Raised from a callback to make llhttp stop: the connection is closing."""


class Message(Exchange):
    """A parsed request waiting for its turn: the exchange itself, plus what the connection
    needs to answer it and forward it (one object per request instead of three, issue 18).

    `forward` holds the client's header lines to pass upstream, each `name: value`, picked
    and formatted by `HttpConnection.on_header` as llhttp reported them (one pass over the
    headers instead of three): every field except those the gateway owns (REQUEST_OWNED,
    the identity namespace, their underscore twins). `Gateway.serialize_request` only
    takes out those dropped late (named by `Connection`, or `Accept-Encoding` for an
    operation whose responses are filtered). The owned values it needs are kept aside."""

    __slots__ = ("client_host", "done", "forward", "forwarded_host", "forwarded_proto",
                 "keep_alive", "length", "parts", "pipeline", "size", "streaming", "upstream")

    def __init__(self, method: str, raw_path: bytes, query: bytes, headers: Headers,
                 peer_ip: str, scheme: str, http_version: str, keep_alive: bool,
                 pipeline: Pipeline, forward: list[bytes], client_host: bytes) -> None:
        super().__init__(method, raw_path, query, headers, peer_ip, scheme, http_version)
        self.forward = forward
        self.client_host = client_host  # the client's Host (X-Forwarded-Host, preserve_host)
        # the client's X-Forwarded-Proto / -Host: forwarded only from a trusted proxy
        self.forwarded_proto: bytes | None = None
        self.forwarded_host = b""
        # The pipeline this request started on: it ends on it, even if a reload swaps the
        # gateway's in between (`Pipeline.in_flight` tells the reload when it is drained).
        self.pipeline = pipeline
        pipeline.in_flight += 1
        self.keep_alive = keep_alive
        self.parts: list[bytes] = []
        self.size = 0
        self.streaming = False  # the body goes to the upstream as it arrives
        self.length = 0  # the announced Content-Length of a streamed body
        self.done = False  # the whole body has been received
        self.upstream: UpstreamConnection | None = None


class HttpConnection(HasDeadline, asyncio.Protocol):
    def __init__(self, gateway: Gateway, *, scheme: str = "http") -> None:
        self.gateway = gateway
        config = gateway.config
        self.max_url = config.limits.max_url_length
        self.max_header_bytes = config.limits.max_header_bytes
        self.max_header_count = config.limits.max_header_count
        self.header_timeout = config.timeouts.header
        self.body_timeout = config.timeouts.body
        self.min_body_rate = config.timeouts.min_body_rate
        self.rate_grace = config.timeouts.body_rate_grace
        self._rate_since = 0.0  # loop time and body bytes at the start of the rate check
        self._rate_base = 0
        self._body_deadline = 0.0
        self.idle_timeout = config.timeouts.keepalive
        self.scheme = scheme
        self.client_identity: tuple[tuple[bytes, bytes], ...] = ()  # mutual TLS
        self.loop = gateway.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        self.queue: deque[Message] = deque()
        self.current: Message | None = None
        self.busy = False
        self.closing = False  # no more requests are read; close after the queue is answered
        self.closed = False
        self.sent = 0  # response bytes written on this connection (usage counts, F4)
        self._sent_mark = 0  # `sent` when the answer in progress began
        self.reading_paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.held = False  # a pipelined request waits until the client reads (back-pressure)
        self._write_timer: asyncio.TimerHandle | None = None
        self.reserved = 0  # bytes of the gateway's response buffer budget held here
        self.task: asyncio.Task[None] | None = None  # held: the loop keeps only weak refs
        self._url: list[bytes] = []
        self._url_len = 0
        self._headers: Headers = []
        self._header_bytes = 0
        self.receiving = False  # between the first byte of a request and its last
        self.in_head = False  # between the first byte of a request and its blank line
        self._head_budget = self.max_url + self.max_header_bytes + HEAD_SLACK
        self._head_seen = 0
        self._has_body = False
        self._chunked = False
        self._content_length = 0
        self._hosts = 0
        # facts of a request head few requests have (see on_message_begin)
        self._rare = False
        self._forwarded_proto: bytes | None = None
        self._forwarded_host = b""
        self._expect: bytes | None = None
        self._content_type_repeated = False
        self.write_timeout = config.timeouts.write

    # -- connection lifecycle -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream Protocol is always handed an asyncio.Transport; typeshed types
        # connection_made with BaseTransport (that of every protocol kind)
        stream: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport = stream
        stream.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        if self.scheme == "https":
            # Called once the handshake is done; a certificate is here only when it was
            # presented and verified against tls.client_ca (else the handshake failed).
            self.client_identity = client_identity(transport.get_extra_info("peercert"))
        self.gateway.connections.add(self)
        self.expire_at(self.header_timeout, self._on_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gateway.connections.discard(self)
        self.clear_deadline()
        self._cancel_write_timer()
        self._release_buffer()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)  # the writer sees `closed` and stops
        current = self.current
        if current is not None and not current.streaming:  # (a streamed one has its task)
            # a request cut off mid-body is never answered nor recorded; its pipeline must
            # not wait for it to drain at a reload
            self.current = None
            current.pipeline.in_flight -= 1
        self._drop_queue()

    def _drop_queue(self) -> None:
        """The client is gone: what it pipelined is never forwarded (issue 11: 20 clients
        that left kept the gateway forwarding and filtering for 20 s). Each is still
        recorded, which releases what its head phase took (concurrency slots), as 499."""
        self.held = False
        while self.queue:
            message = self.queue.popleft()
            exchange = message
            exchange.reason = exchange.reason or "client-closed"
            exchange.bytes_in = message.size
            message.pipeline.record(exchange, CLIENT_CLOSED)
            message.pipeline.in_flight -= 1

    def pause_writing(self) -> None:
        """Unsent bytes passed the high-water mark: from now the client has
        `timeouts.write` to read, whatever is being written (D3)."""
        self.write_paused = True
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout,
                                                     self._on_write_timeout)

    def resume_writing(self) -> None:
        self.write_paused = False
        self._cancel_write_timer()
        self._release_buffer()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)
        if self.held:
            self.held = False
            self._next()

    async def drain(self) -> None:
        """Wait until the client reads; a client that stops reading is cut (D3)."""
        if self.write_paused and not self.closed:
            self.drain_waiter = self.loop.create_future()
            await self.drain_waiter

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _on_write_timeout(self) -> None:
        self._write_timer = None
        if self.transport is not None:
            self.transport.abort()  # connection_lost fails the drain waiter

    def _close_transport(self) -> None:
        """Close after the unsent bytes are out, but wait no longer than `timeouts.write`
        for a client that reads nothing (a plain close would wait for ever)."""
        transport = self.transport
        if transport is None or self.closed:
            return
        transport.close()
        if transport.get_write_buffer_size() and self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout,
                                                     self._on_write_timeout)

    def _reserve_buffer(self, size: int) -> None:
        """Charge `size` bytes of a response held whole to the gateway-wide budget."""
        gateway = self.gateway
        if gateway.buffered_bytes + size > gateway.max_buffered_bytes:
            raise ServiceUnavailable("response-buffer-full", headers=[(b"retry-after", b"1")])
        gateway.buffered_bytes += size
        self.reserved += size

    def _release_buffer(self) -> None:
        if self.reserved:
            self.gateway.buffered_bytes -= self.reserved
            self.reserved = 0

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.in_head:
            # llhttp buffers a header value until its CRLF, so a head that never ends would
            # grow without bound between callbacks: count the raw bytes of an unfinished head.
            self._head_seen += len(data)
            if self._head_seen > self._head_budget:
                self._fatal(HeadersTooLarge("head-never-ends", close=True))
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _StopParsing):
                return
            if isinstance(cause, Problem):
                self._fatal(cause)
            else:
                logger.error("parser callback failed", exc_info=cause)
                self._fatal(InternalError("parser-callback-error", close=True))
        except httptools.HttpParserUpgrade:
            self.closing = True  # the upgrade request itself was answered with a refusal
            self._pause_reading()
        except httptools.HttpParserError:
            self._fatal(BadRequest("malformed-request", close=True))

    def shutdown(self) -> None:
        """Graceful stop: idle connections close now, busy ones after their response."""
        self.closing = True
        if not self.busy and not self.queue:
            self._close_transport()

    # -- timers -------------------------------------------------------------------------
    def _on_timeout(self) -> None:
        if self.receiving:  # a request head or body is overdue, even behind a slow answer
            self._fatal(RequestTimeout("client-too-slow", close=True))
        elif not self.busy and not self.queue:
            self._close_transport()  # connected but never sent a byte

    def _check_body_rate(self) -> None:
        """Slow-client floor (D3): a body trickling in below `timeouts.min_body_rate`
        after the grace period is cut, long before `timeouts.body`. Time the gateway itself
        held the client back (reading paused for back-pressure) does not count."""
        message = self.current
        if not self.receiving or message is None:
            return
        now = self.loop.time()
        if now >= self._body_deadline:
            self._on_timeout()
            return
        if self.reading_paused:
            self._rate_since, self._rate_base = now, message.size
        elif message.size - self._rate_base < self.min_body_rate * (now - self._rate_since):
            self._fatal(RequestTimeout("client-below-min-body-rate", close=True))
            return
        self.expire_at(min(1.0, self._body_deadline - now), self._check_body_rate)

    def _on_idle_timeout(self) -> None:
        if not self.busy and not self.queue and self.current is None:
            self._close_transport()

    # -- llhttp callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.closing:
            raise _StopParsing  # nothing after a refusal that closes is ever parsed
        self.in_head = True
        self._head_seen = 0
        self._has_body = False
        self._content_length = 0
        self._chunked = False
        self._hosts = 0
        self._connection_tokens: frozenset[bytes] = frozenset()
        self._url = []
        self._url_len = 0
        self._headers = []
        self._forward: list[bytes] = []
        self._client_host = b""
        self._content_type: bytes | None = None
        if self._rare:  # the last request set one of these: few do, so few pay the stores
            self._rare = False
            self._forwarded_proto = None
            self._forwarded_host = b""
            self._expect = None
            self._content_type_repeated = False
        self._header_bytes = 0
        self.receiving = True
        self.expire_at(self.header_timeout, self._on_timeout)

    def on_url(self, url: bytes) -> None:
        self._url_len += len(url)
        if self._url_len > self.max_url:
            raise UriTooLong("url-over-limit", close=True)
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            return  # a chunked body's trailer fields: dropped, never merged into the head
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.max_header_bytes:
            raise HeadersTooLarge("header-bytes-over-limit", close=True)
        if len(self._headers) >= self.max_header_count:
            raise HeadersTooLarge("header-count-over-limit", close=True)
        name = name.lower()
        # One pass (issue 18): each header is classified here once, for the checks below,
        # the limits step (framing facts) and forwarding (`Message.forward`).
        if name in REQUEST_OWNED or name.startswith(IDENTITY_PREFIX):
            # replaced by the gateway upstream: read here, never forwarded as sent
            if name == b"host":
                self._hosts += 1
                if self._hosts > 1:  # RFC 9112 3.2: more than one Host is a 400
                    raise BadRequest("host-repeated", close=True)
                if not valid_host(value):  # it is forwarded as X-Forwarded-Host
                    raise BadRequest("host-invalid", close=True)
                self._client_host = value
            elif name == b"content-length":
                self._content_length = content_length(value) or 0
                self._has_body = self._content_length > 0
            elif name == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    # llhttp refuses most obfuscations; anything but exactly `chunked` is
                    # refused here too, so no transfer coding reaches an upstream that may
                    # read it differently.
                    raise BadRequest("transfer-encoding-not-chunked", close=True)
                self._has_body = self._chunked = True
            elif name == b"connection":
                self._connection_tokens |= connection_tokens(value)
            elif name == b"expect":
                if self._expect is None:
                    self._expect = value
                    self._rare = True
            elif name == b"x-forwarded-proto":
                self._forwarded_proto = value
                self._rare = True
            elif name == b"x-forwarded-host":
                self._forwarded_host = value
                self._rare = True
        elif b"_" in name and owned_twin(name):
            pass  # an underscore twin of an owned field: a spoofing attempt, dropped
        else:
            if name == b"content-type":
                if self._content_type is None:
                    self._content_type = value
                else:
                    self._content_type_repeated = self._rare = True
            self._forward.append(b"%b: %b" % (name, value))
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise BadRequest("http-version-not-supported", close=True)
        if self._hosts == 0 and version == "1.1":
            raise BadRequest("host-missing", close=True)  # RFC 9112 3.2
        if self._chunked and version == "1.0":
            # RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing
            raise BadRequest("transfer-encoding-in-http10", close=True)
        raw_path, query = split_target(b"".join(self._url))
        pipeline = self.gateway.pipeline
        exchange = message = Message(
            parser.get_method().decode("ascii"), raw_path, query, self._headers,
            self.peer_ip, self.scheme, version, parser.should_keep_alive(), pipeline,
            self._forward, self._client_host,
        )
        exchange.connection_tokens = self._connection_tokens
        exchange.declared_length = self._content_length
        exchange.chunked = self._chunked
        exchange.content_type = self._content_type
        if self._rare:
            exchange.content_type_repeated = self._content_type_repeated
            exchange.forwarded_proto = self._forwarded_proto
            exchange.forwarded_host = self._forwarded_host
        if self.client_identity:
            exchange.client_identity = self.client_identity
        self.current = message
        pipeline.on_head(exchange)
        if parser.should_upgrade():
            exchange.problem = Forbidden("upgrade-not-allowed", close=True)
        problem = exchange.problem
        if problem is not None and (problem.close or self._has_body):
            # Answer now and never read the body (also no `100 Continue` for it).
            if not problem.close:
                problem.close = True
            self._complete(message)
            self.closing = True
            self._pause_reading()
            return
        if self._has_body:
            if self.min_body_rate and self.rate_grace < self.body_timeout:
                now = self.loop.time()
                self._body_deadline = now + self.body_timeout
                self._rate_since, self._rate_base = now, 0
                self.expire_at(self.rate_grace, self._check_body_rate)
            else:
                self.expire_at(self.body_timeout, self._on_timeout)
        if problem is None and not self.busy and not self.queue:
            expect = self._expect
            if expect is not None and expect.lower() == b"100-continue" and self.transport:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if (self._content_length > STREAM_MIN and exchange.suspended is None
                    and not pipeline.needs_body(exchange)):
                # A chunked body is read whole (under its limit) and sent with a length,
                # as nginx does by default: many upstreams cannot read chunked requests.
                self._start_streaming(message)

    def on_body(self, body: bytes) -> None:
        message = self.current
        if message is None:
            return
        message.size += len(body)
        exchange = message
        if message.size > exchange.body_limit:
            problem = PayloadTooLarge("body-over-limit", close=True)
            if message.streaming:
                self._abort_streaming(message, problem)
                return
            exchange.problem = problem
            self._complete(message)
            self.closing = True
            self._pause_reading()
            return
        if exchange.problem is None:
            message.parts.append(body)
            if message.streaming:
                self._pump(message)

    def on_message_complete(self) -> None:
        message = self.current
        if message is None:
            return
        if message.streaming:
            message.done = True
            self.current = None
            self.receiving = False
            self.clear_deadline()
            self._pump(message)
            return
        parts = message.parts
        exchange = message
        if parts:
            exchange.body = parts[0] if len(parts) == 1 else b"".join(parts)
        if exchange.problem is None:
            message.pipeline.on_body(exchange)
        self._complete(message)

    # -- answering, in order ----------------------------------------------------------------
    def _complete(self, message: Message) -> None:
        self.current = None
        self.receiving = False
        self.clear_deadline()
        self.queue.append(message)
        if len(self.queue) > MAX_PIPELINED:
            self._pause_reading()
        if not self.busy:
            self._next()

    def _fatal(self, problem: Problem) -> None:
        """Answer `problem` after the requests already parsed, then close."""
        message = self.current
        if message is not None and message.streaming:
            self._abort_streaming(message, problem)
            return
        if message is None:
            # nothing usable was parsed: the access log shows method "-" (as nginx does)
            message = Message("-", b"/", b"", [], self.peer_ip, self.scheme, "1.1", False,
                              self.gateway.pipeline, [], b"")
        message.problem = problem
        self._complete(message)
        self.closing = True
        self._pause_reading()

    # -- streaming a large request body -----------------------------------------------------
    def _start_streaming(self, message: Message) -> None:
        """Answer this request now, sending its body upstream piece by piece as it arrives
        (only when nothing is ahead of it on the connection, so order is kept)."""
        message.streaming = True
        message.length = self._content_length
        self.busy = True
        self.task = self.loop.create_task(self._answer(message))

    def _attach(self, message: Message, conn: UpstreamConnection) -> None:
        """The upstream connection is ready and its head is written: send what came so far."""
        if message.problem is not None:
            conn._close()  # refused while connecting (over the limit, too slow, malformed)
            return
        message.upstream = conn
        conn.body_pending = True
        conn.on_write_pressure = self._on_upstream_pressure
        self._pump(message)
        self._on_upstream_pressure(False)

    def _pump(self, message: Message) -> None:
        conn = message.upstream
        if conn is None or conn.closed or conn.transport is None:
            buffered = sum(len(part) for part in message.parts)
            if buffered > STREAM_HIGH_WATER:
                self._pause_reading()  # still connecting: bound what waits in memory
            return
        if message.parts:
            data = b"".join(message.parts)
            message.parts.clear()
            conn.transport.write(data)
            conn.refresh_deadline()
        if message.done:
            conn.body_pending = False
            conn.on_write_pressure = None
            message.upstream = None

    def _on_upstream_pressure(self, paused: bool) -> None:
        if paused:
            self._pause_reading()
        elif self.reading_paused and not self.closing and self.transport and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def _abort_streaming(self, message: Message, problem: Problem) -> None:
        """The client broke off (limit, timeout, bad framing): the upstream never gets the
        rest, and the answering task reports `problem`."""
        message.problem = problem
        self.current = None
        self.receiving = False
        self.clear_deadline()
        self.closing = True
        self._pause_reading()
        if message.upstream is not None:
            message.upstream._close()
            message.upstream = None

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def _next(self) -> None:
        if self.closed:
            self._drop_queue()
            self.busy = False
            return
        if self.write_paused:
            if self.queue:
                # The client has not read the last response: answer nothing more, and read
                # nothing more unless a request is arriving, until it does (resume_writing
                # comes back here) or `timeouts.write` cuts it.
                self.busy = self.held = True
                if not self.receiving:
                    self._pause_reading()
                return
        else:
            self._release_buffer()  # what was held whole is read (or in the kernel)
        if self.queue:
            self.busy = True
            message = self.queue.popleft()
            exchange = message
            if (
                exchange.problem is None
                and exchange.suspended is None
                and self.gateway.forward_nowait(
                    exchange, lambda conn, error: self._on_upstream(message, conn, error),
                    message.pipeline,
                )
            ):
                return  # the fast path: answered from `_on_upstream`, no task
            self.task = self.loop.create_task(self._answer(message))
            return
        self.busy = False
        if self.closing:
            self._close_transport()
            return
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()
        if self.current is None:
            self.expire_at(self.idle_timeout, self._on_idle_timeout)

    def _on_upstream(
        self, message: Message, conn: UpstreamConnection, error: UpstreamError | None
    ) -> None:
        """The fast path's second half, called from the upstream protocol's callbacks."""
        exchange = message
        if error is not None:
            conn._close()
            conn.pool.forget(conn)
            if error.retryable and exchange.method in IDEMPOTENT:
                # a pooled connection the upstream had closed: one fresh attempt
                self.task = self.loop.create_task(self._answer(message))
                return
            exchange.problem = problem_for(error)
        elif conn.complete:
            reply = self.gateway.reply_complete(conn)
            pipeline = message.pipeline
            status = reply.status
            try:
                if status >= 500 and pipeline.mask_errors:
                    status, headers, body = pipeline.mask_upstream_error(exchange, status,
                                                                         reply.body)
                    keep_alive = message.keep_alive and not self.closing
                    self._write(self._head(status, headers, keep_alive, message) + body)
                else:
                    shape = pipeline.filter_shape(exchange, status, reply.headers)
                    if shape is not None:
                        reply.body = pipeline.filter_body(exchange, shape, reply.body)
                    block = pipeline.response_head(exchange, status, reply.headers)
                    keep_alive = self._write_complete(message, reply, block)
            except Problem as problem:  # a response that could not be filtered
                status, headers, body = pipeline.problem_response(exchange, problem)
                keep_alive = message.keep_alive and not self.closing
                self._write(self._head(status, headers, keep_alive, message) + body)
            except Exception as exc:
                status, headers, body = pipeline.internal_error(exchange, exc)
                self._write(self._head(status, headers, False, message) + body)
                keep_alive = False
            self._account(message)
            pipeline.record(exchange, status)
            pipeline.in_flight -= 1
            if not keep_alive:
                self.closing = True
            self._next()
            return
        # a large or slow body, or a refusal to render: the async path takes over
        response = UpstreamResponse(conn) if error is None else None
        self.task = self.loop.create_task(self._answer(message, response))

    async def _answer(self, message: Message, response: UpstreamResponse | None = None) -> None:
        exchange = message
        pipeline = message.pipeline
        status = 500
        keep_alive = message.keep_alive
        try:
            head_sent = False
            try:
                # Read through locals: a narrowed `exchange.problem` would stay narrowed to
                # None across the await below (which sets it), and a mypyc build checks it.
                refused = exchange.problem
                if refused is not None:
                    raise refused
                if message.streaming:
                    framing = (b"content-length", b"%d" % message.length)
                    reply = await self.gateway.forward_streaming(
                        exchange, framing, lambda conn: self._attach(message, conn), pipeline
                    )
                    if not message.done:  # answered before the body ended: cannot resync
                        keep_alive = False
                elif response is None:
                    if exchange.suspended is not None:
                        await pipeline.on_request(exchange)
                        refused = exchange.problem
                        if refused is not None:
                            raise refused
                    reply = await self.gateway.forward(exchange, pipeline)
                else:
                    reply = self.gateway.reply_from(response)
                status = reply.status
                if status >= 500 and pipeline.mask_errors:
                    if reply.stream is not None:
                        reply.stream.release()  # the rest is never read: the socket closes
                    status, headers, body = pipeline.mask_upstream_error(exchange, status,
                                                                         reply.body)
                    keep_alive = keep_alive and not self.closing
                    self._write(self._head(status, headers, keep_alive, message) + body)
                else:
                    shape = pipeline.filter_shape(exchange, status, reply.headers)
                    if shape is not None:
                        await self._buffer_reply(reply, pipeline.max_filter_bytes)
                        precut = None
                        if len(reply.body) > CUT_ELSEWHERE and shape.cuts:
                            precut = await self.gateway.cutter.cut(reply.body, shape.shape)
                        reply.body = pipeline.filter_body(exchange, shape, reply.body, precut)
                    headers = pipeline.on_response(exchange, status, reply.headers)
                    head_sent = True
                    keep_alive = await self._send_reply(message, reply, headers) and keep_alive
            except Problem as raised:
                if head_sent:
                    raise
                refusal = raised
                if message.streaming and exchange.problem is not None:
                    refusal = exchange.problem  # why the stream was cut, not the 502 it caused
                status, headers, body = pipeline.problem_response(exchange, refusal)
                keep_alive = keep_alive and not refusal.close and not self.closing
                self._write(self._head(status, headers, keep_alive, message) + body)
        except Exception as exc:  # a bug: log it with the id, answer generically if we can
            if head_sent:
                logger.error("response to %s broken", exchange.id, exc_info=exc,
                             extra=fields("error", exchange.id))
                exchange.reason = exchange.reason or "response-broken"
            else:
                status, headers, body = pipeline.internal_error(exchange, exc)
                self._write(self._head(status, headers, False, message) + body)
            keep_alive = False
        finally:
            self._account(message)
            pipeline.record(exchange, status)
            pipeline.in_flight -= 1
        if not keep_alive:
            self.closing = True
        self._next()

    async def _buffer_reply(self, reply: Reply, limit: int) -> None:
        """Read a streamed upstream body whole (it must be filtered) under the cap."""
        stream = reply.stream
        if stream is None:
            return
        parts = [reply.body]
        size = len(reply.body)
        try:
            self._reserve_buffer(size)
            while True:
                piece = await stream.read()
                if not piece:
                    break
                size += len(piece)
                if size > limit:
                    raise BadGateway("response-too-large-to-filter")
                self._reserve_buffer(len(piece))
                parts.append(piece)
        finally:
            stream.release()
        reply.body = b"".join(parts)
        reply.stream = None

    def _write_complete(self, message: Message, reply: Reply, block: bytes) -> bool:
        """Write a response whose body is all here, in one write; return keep-alive.
        `block`: its header lines, serialized (`Pipeline.response_head`)."""
        keep_alive = message.keep_alive and not self.closing
        status = reply.status
        if message.method == "HEAD":
            if reply.content_length is not None:
                block += b"content-length: %d\r\n" % reply.content_length
        elif status >= 200 and status != 204 and status != 304:
            block += b"content-length: %d\r\n" % len(reply.body)
        if not keep_alive:
            block += b"connection: close\r\n"
        elif message.http_version == "1.0":
            block += b"connection: keep-alive\r\n"
        status_line = STATUS_LINES.get(status)
        if status_line is None:
            status_line = b"HTTP/1.1 %d %b\r\n" % (status, REASONS.get(status, b"Unknown"))
        self._write(b"%b%b\r\n%b" % (status_line, block, reply.body))
        return keep_alive

    async def _send_reply(self, message: Message, reply: Reply, headers: Headers) -> bool:
        """Write the upstream's answer; return whether the connection can be kept."""
        if reply.stream is None:
            return self._write_complete(
                message, reply, b"".join([b"%b: %b\r\n" % item for item in headers]))
        keep_alive = message.keep_alive and not self.closing
        stream = reply.stream
        chunked = False
        try:
            if reply.content_length is not None:
                headers.append((b"content-length", str(reply.content_length).encode()))
            elif message.http_version == "1.1":
                chunked = True
                headers.append((b"transfer-encoding", b"chunked"))
            else:
                keep_alive = False  # HTTP/1.0 without a length: the close delimits the body
            self._write(self._head(reply.status, headers, keep_alive, message))
            piece = reply.body
            while piece:
                if chunked:
                    self._write(b"%x\r\n%b\r\n" % (len(piece), piece))
                else:
                    self._write(piece)
                await self.drain()
                if self.closed:
                    message.reason = "client-closed"
                    return False
                piece = await stream.read()
            if chunked:
                self._write(b"0\r\n\r\n")
            return keep_alive
        except Problem as problem:
            # The head is out: the only honest signal left is to cut the connection.
            message.reason = problem.reason
            if self.transport is not None:
                self.transport.abort()
            return False
        finally:
            stream.release()

    def _head(self, status: int, headers: Headers, keep_alive: bool, message: Message) -> bytes:
        status_line = STATUS_LINES.get(status)
        if status_line is None:
            status_line = b"HTTP/1.1 %d %b\r\n" % (status, REASONS.get(status, b"Unknown"))
        if not keep_alive:
            headers.append((b"connection", b"close"))
        elif message.http_version == "1.0":
            headers.append((b"connection", b"keep-alive"))
        if not headers:
            return status_line + b"\r\n"
        return status_line + b"\r\n".join([b": ".join(header) for header in headers]) + b"\r\n\r\n"

    def _write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)
            self.sent += len(data)

    def _account(self, message: Message) -> None:
        """The bytes of the answer just finished, for the usage counts (F4): its request
        body as received, its response as written (head and body; answers on one
        connection go out strictly one after another, so the difference is this one's)."""
        exchange = message
        exchange.bytes_in = message.size
        exchange.bytes_out = self.sent - self._sent_mark
        self._sent_mark = self.sent
