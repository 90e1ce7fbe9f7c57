"""The gateway's admin listener: a small HTTP/1.1 server for `AdminApp`.

Its own listener rather than a route on the public one: an admin API that shares the
public port is one routing bug away from the internet, and a separate port can be bound
to loopback or firewalled alone. Traffic here is a scrape every few seconds, so this
server is plain and strict rather than fast: one request at a time per connection,
request heads bounded, bodies refused past a few KiB, idle connections closed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from http import HTTPStatus

import httptools

from apishield.admin.app import AdminApp, AdminResponse
from apishield.observe.history import sample_forever

logger = logging.getLogger("apishield.admin")

MAX_HEAD = 16 * 1024
MAX_BODY = 4 * 1024
IDLE_TIMEOUT = 30.0


class AdminConnection(asyncio.Protocol):
    def __init__(self, app: AdminApp, connections: set[AdminConnection]) -> None:
        self.app = app
        self.connections = connections
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client = "?"
        self._reset()
        self._idle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def _reset(self) -> None:
        self.url = b""
        self.head_bytes = 0
        self.body_bytes = 0
        self.authorization: bytes | None = None
        self.accept = b""

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if peer else "?"
        self.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        if self._task is not None:
            self._task.cancel()

    def data_received(self, data: bytes) -> None:
        self._arm_idle()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "upgrades are not served here")
        except httptools.HttpParserError:
            self._fail(400, "malformed request")

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        lowered = name.lower()
        if lowered == b"authorization":
            self.authorization = value
        elif lowered == b"accept":
            self.accept = value

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > MAX_BODY:
            raise httptools.HttpParserError("body too large")

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()  # one request at a time
        method = self.parser.get_method().decode("latin-1")
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            self._fail(400, "malformed request target")
            return
        path = url.path.decode("latin-1")
        query = (url.query or b"").decode("latin-1")
        keep_alive = self.parser.should_keep_alive()
        authorization, accept = self.authorization, self.accept
        self._reset()
        self._task = self.loop.create_task(
            self._respond(method, path, query, authorization, accept, keep_alive))

    def _count_head(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > MAX_HEAD:
            raise httptools.HttpParserError("request head too large")

    async def _respond(self, method: str, path: str, query: str,
                       authorization: bytes | None, accept: bytes, keep_alive: bool) -> None:
        try:
            response = await self.app.handle(method, path, authorization, accept, self.client,
                                             query)
        except Exception:
            logger.exception("admin API: %s %s failed", method, path)
            response = AdminResponse(500, b'{"status":500,"title":"Internal Server Error"}',
                                     b"application/problem+json")
        self._write(response, keep_alive, head_only=method == "HEAD")
        if keep_alive and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _write(self, response: AdminResponse, keep_alive: bool, *, head_only: bool = False
               ) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        phrase = HTTPStatus(response.status).phrase.encode()
        headers = [
            (b"content-type", response.content_type),
            (b"content-length", b"%d" % len(response.body)),
            (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
            (b"connection", b"keep-alive" if keep_alive else b"close"),
            *response.headers,
        ]
        head = b"HTTP/1.1 %d %b\r\n%b\r\n\r\n" % (
            response.status, phrase, b"\r\n".join(b"%b: %b" % pair for pair in headers))
        transport.write(head if head_only else head + response.body)
        if not keep_alive:
            transport.close()

    def _fail(self, status: int, detail: str) -> None:
        body = b'{"status":%d,"detail":"%b"}' % (status, detail.encode())
        self._write(AdminResponse(status, body, b"application/problem+json"), False)

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self.loop.call_later(IDLE_TIMEOUT, self._close_idle)

    def _close_idle(self) -> None:
        if self.transport is not None:
            self.transport.close()


class AdminListener:
    """The admin server of one gateway process."""

    def __init__(self, app: AdminApp) -> None:
        self.app = app
        self.connections: set[AdminConnection] = set()
        self.server: asyncio.Server | None = None
        # the dashboard's past: a sample of the counters every 2 s while the listener runs
        self.sampler: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int,
                    sock: socket.socket | None = None) -> tuple[str, int]:
        """Bind `host`:`port`, or serve on `sock` (bound by the supervisor of
        `serve --workers N`)."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            self.server = await loop.create_server(
                lambda: AdminConnection(self.app, self.connections), sock=sock, backlog=64)
        else:
            self.server = await loop.create_server(
                lambda: AdminConnection(self.app, self.connections), host, port, backlog=64,
                reuse_address=True)
        address = self.server.sockets[0].getsockname()
        self.sampler = loop.create_task(sample_forever(self.app.history, self.app.sample))
        return str(address[0]), int(address[1])

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.cancel()
        if self.server is not None:
            self.server.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
