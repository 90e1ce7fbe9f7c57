"""The Python floor: the leanest keep-alive proxy uvloop + httptools can be, with no logic.

A benchmark reference only (never used by apishield): it forwards GET requests to one
upstream with pooled keep-alive connections, copies the response bytes back, and does
nothing else - no routing, no limits, no headers, no log, no request id, no error pages.
Measured in the same run as apishield, it shows how much of the gap to nginx is Python's
event loop and syscalls (which no apishield code can remove) and how much is apishield.

    python bench/floor_proxy.py --port 8081 --upstream-port 8082
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, pool: deque[Upstream]) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None
        self.buffer: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer.append(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        data = b"".join(self.buffer)
        self.buffer.clear()
        if self.parser.should_keep_alive():
            self.pool.append(self)
        else:  # e.g. nginx's keepalive_requests reached: pass the body on, drop the socket
            self.transport.close()  # type: ignore[union-attr]
            data = data.replace(b"Connection: close\r\n", b"")
        if client is not None:
            client.respond(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None and self.buffer:
            self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[bytes] = []
        self.queue: deque[bytes] = deque()
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append(b"%b: %b\r\n" % (name, value))

    def on_message_complete(self) -> None:
        request = b"GET %b HTTP/1.1\r\n%b\r\n" % (self.url, b"".join(self.headers))
        self.headers = []
        self.queue.append(request)
        if not self.busy:
            self.send_next()

    def send_next(self) -> None:
        request = self.queue.popleft()
        self.busy = True
        pool = self.proxy.pool
        if pool:
            upstream = pool.pop()
            upstream.client = self
            upstream.transport.write(request)  # type: ignore[union-attr]
        else:
            self.proxy.tasks.add(asyncio.ensure_future(self.proxy.connect_and_send(self, request)))

    def respond(self, data: bytes) -> None:
        self.transport.write(data)
        self.busy = False
        if self.queue:
            self.send_next()


class Proxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.pool: deque[Upstream] = deque()
        self.tasks: set[asyncio.Future[None]] = set()

    async def connect_and_send(self, client: Client, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        upstream = Upstream(self.pool)
        await loop.create_connection(lambda: upstream, "127.0.0.1", self.upstream_port)
        upstream.client = client
        upstream.transport.write(request)  # type: ignore[union-attr]
        self.tasks = {t for t in self.tasks if not t.done()}


async def main(port: int, upstream_port: int) -> None:
    proxy = Proxy(upstream_port)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(proxy), "127.0.0.1", port, backlog=2048)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(main(args.port, args.upstream_port))
