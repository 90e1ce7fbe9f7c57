"""A real HTTP/1.1 upstream for the gateway's end-to-end tests (standard library only).

It misbehaves on purpose in the ways a gateway must contain: it advertises its stack,
leaks tracebacks and secrets in 500s, sends hop-by-hop headers, streams large and chunked
bodies, and can drop the connection without answering. It records what actually reached
it (`server.request_count`, `server.last_request`) so tests can assert on the far side.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO
from urllib.parse import parse_qs

SERVER_HEADER = "LeakyServer/1.0"
POWERED_BY = "PHP/5.4"
PATTERN = b"0123456789abcdef"
PIECE = 64 * 1024
BIG_BLOCK = PATTERN * (PIECE // len(PATTERN))  # PIECE is a multiple of 16: pattern stays aligned
TRACEBACK_BODY = (
    "Traceback (most recent call last):\n"
    '  File "/srv/app.py", line 42\n'
    "psycopg2.errors.SyntaxError: SELECT * FROM users WHERE password='...'\n"
)


# Bodies `/respond/<any>/<status>/<kind>` answers with, for the response-mode tests.
THINGS = {
    "alpha": {"title": "alpha", "owner": "alice", "secret": "alice's note"},
    "beta": {"title": "beta", "owner": "bob", "secret": "bob's note"},
    "gamma": {"title": "gamma", "owner": "alice", "secret": "alice's other note"},
}

CANNED: dict[str, Any] = {
    "conforming": {"id": 1, "name": "ann"},
    "extra": {"id": 1, "name": "ann", "is_admin": True},
    "write-only": {"id": 1, "name": "ann", "password": "hunter2"},
    "wrong-type": {"id": "one", "name": "ann"},
}


class FramingError(Exception):
    """The request body could not be delimited; answer 400 and close."""


def _read_chunked(rfile: BinaryIO) -> bytes:
    """Decode a chunked body ourselves (http.server does not), dropping trailers."""
    out = bytearray()
    while True:
        line = rfile.readline(65537)
        if not line.endswith(b"\n"):
            raise FramingError("truncated chunk size line")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise FramingError("invalid chunk size") from None
        if size == 0:
            break
        data = rfile.read(size)
        if len(data) != size or rfile.readline(3) not in (b"\r\n", b"\n"):
            raise FramingError("truncated or malformed chunk")
        out += data
    while True:
        line = rfile.readline(65537)
        if line in (b"\r\n", b"\n", b""):
            return bytes(out)


class UpstreamHandler(BaseHTTPRequestHandler):
    """One dispatcher for every method; the body is always consumed before answering."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # header and body are separate writes
    server: UpstreamServer

    def version_string(self) -> str:
        """The leaky `Server` header the gateway must strip."""
        return SERVER_HEADER

    def send_response(self, code: int, message: str | None = None) -> None:
        """Add X-Powered-By to every response, http.server's own errors included."""
        super().send_response(code, message)
        self.send_header("X-Powered-By", POWERED_BY)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: test output should show the gateway, not this server."""

    def setup(self) -> None:
        """Track the connection so `stop()` can close idle keep-alive sockets."""
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        """Untrack the connection."""
        try:
            super().finish()
        finally:
            self.server.track(self.connection, add=False)

    # -- helpers ---------------------------------------------------------------------

    def _read_body(self) -> bytes:
        """Content-Length or chunked (chunked wins, as RFC 9112 6.3 says, then close)."""
        te = self.headers.get_all("Transfer-Encoding") or []
        if te:
            codings = [c.strip().lower() for v in te for c in v.split(",") if c.strip()]
            if codings != ["chunked"]:
                raise FramingError(f"unsupported transfer-encoding {codings}")
            if self.headers.get("Content-Length") is not None:
                self.close_connection = True
            return _read_chunked(self.rfile)
        lengths = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        if not lengths:
            return b""
        if len(lengths) != 1 or not next(iter(lengths)).isdigit():
            raise FramingError("invalid content-length")
        n = int(lengths.pop())
        body = self.rfile.read(n)
        if len(body) != n:
            raise FramingError("body shorter than content-length")
        return body

    def _echo(self, body: bytes, method: str | None = None) -> dict[str, Any]:
        """What the upstream saw: raw target path and query, headers in order, body."""
        path, _, query = self.path.partition("?")
        return {
            "method": method or self.command,
            "path": path,
            "query": query,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body": body.decode("latin-1"),
            "body_len": len(body),
        }

    def _send(
        self,
        status: int,
        body: Any = b"",
        content_type: str = "application/json",
        headers: list[tuple[str, str]] | None = None,
        content_length: int | None = None,
    ) -> None:
        """Complete response with Content-Length (keep-alive); no body for HEAD/204/304."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        no_body = status in (204, 304)
        self.send_response(status)
        if not no_body:
            self.send_header("Content-Type", content_type)
            length = len(raw) if content_length is None else content_length
            self.send_header("Content-Length", str(length))
        for name, value in headers or ():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if raw and not no_body and self.command != "HEAD":
            self.wfile.write(raw)

    def _int_arg(self, query: dict[str, list[str]], name: str, default: int | None) -> int:
        """A non-negative integer query argument."""
        values = query.get(name)
        if not values:
            if default is None:
                raise FramingError(f"missing {name}")
            return default
        if not values[-1].isdigit():
            raise FramingError(f"{name} must be a non-negative integer")
        return int(values[-1])

    # -- dispatcher ------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Read the body, record the request, then route by path."""
        self.server.count_head()
        try:
            body = self._read_body()
        except FramingError as exc:
            self.close_connection = True
            self._send(400, {"error": str(exc)})
            return
        echo = self._echo(body)
        self.server.record(echo)
        path = echo["path"]
        query = parse_qs(echo["query"], keep_blank_values=True)
        try:
            self._route(path, query, body)
        except FramingError as exc:
            self._send(400, {"error": str(exc)})
        except ConnectionError:  # client went away mid-response
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch

    def _route(self, path: str, query: dict[str, list[str]], body: bytes) -> None:
        """Endpoint table; anything unknown is a JSON 404."""
        if path == "/echo" or path.startswith("/echo/"):
            if self.command == "HEAD":
                # HEAD advertises the length of the body GET would have sent.
                length = len(json.dumps(self._echo(body, method="GET")).encode())
                self._send(200, b"", content_length=length)
            else:
                self._send(200, self._echo(body))
        elif path == "/slow":
            ms = self._int_arg(query, "ms", 0)
            time.sleep(ms / 1000)
            self._send(200, {"slept": ms})
        elif path == "/big":
            self._big(self._int_arg(query, "bytes", None))
        elif path == "/chunked":
            self._chunked(self._int_arg(query, "parts", 5), self._int_arg(query, "size", 10))
        elif path == "/error":
            self._send(500, TRACEBACK_BODY.encode(), "text/plain; charset=utf-8")
        elif path == "/users":
            # a careless serializer: every row leaks its password hash and an internal flag
            count = int(query.get("n", ["3"])[0])
            rows = [{"id": i, "name": f"user{i}", "password_hash": "$argon2id$secret",
                     "internal": {"shard": 7}, "profile": {"bio": "hi", "ssn": "123-45-6789"}}
                    for i in range(count)]
            self._send(200, rows)
        elif path in ("/cache", "/cache-private"):
            self._send(200, {"cached": True}, headers=[("Cache-Control", "public, max-age=60"),
                                                       ("Access-Control-Allow-Origin", "*")])
        elif path.startswith("/status/"):
            code = path.removeprefix("/status/")
            if not (code.isdigit() and 200 <= int(code) <= 599):
                self._send(404, {"error": "not found"})
            else:
                self._send(int(code), {"status": int(code)})
        elif path == "/hop":
            hop = [
                ("Connection", "X-Hop-Secret"),
                ("X-Hop-Secret", "1"),
                ("Keep-Alive", "timeout=5"),
                ("X-Normal", "1"),
            ]
            self._send(200, {"hop": True}, headers=hop)
        elif path == "/drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        elif path.startswith("/respond/"):
            # /respond/<mode>/<status>/<kind>: the chosen status with a canned body
            code, kind = path.rsplit("/", 2)[-2:]
            if not (code.isdigit() and 200 <= int(code) <= 599) or kind not in CANNED:
                self._send(404, {"error": "not found"})
            else:
                self._send(int(code), CANNED[kind])
        elif path.startswith("/things"):
            # found by title, not by owner: only the answer says whose it is (BOLA on the
            # response side, issue 16)
            title = path.removeprefix("/things").strip("/")
            if not title:
                self._send(200, {"items": [dict(t) for t in THINGS.values()], "total": 3})
            elif title == "not-json":
                self._send(200, b"owner=alice", "text/plain")
            elif title in THINGS:
                self._send(200, dict(THINGS[title]))
            else:
                self._send(404, {"error": "not found"})
        elif path == "/server-error-json":
            self._send(500, {"detail": "db password is hunter2"})
        else:
            self._send(404, {"error": "not found"})

    def _big(self, n: int) -> None:
        """N bytes of the repeating pattern, written in 64 KiB pieces."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        if self.command == "HEAD":
            return
        remaining = n
        while remaining > 0:
            piece = BIG_BLOCK[: min(PIECE, remaining)]
            self.wfile.write(piece)
            remaining -= len(piece)

    def _chunked(self, parts: int, size: int) -> None:
        """`parts` chunks of `size` bytes, framed by hand (size 0 = only the last-chunk)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self.command == "HEAD":
            return
        if size:
            chunk = b"%x\r\n" % size + b"x" * size + b"\r\n"
            for _ in range(parts):
                self.wfile.write(chunk)
        self.wfile.write(b"0\r\n\r\n")


class UpstreamServer(ThreadingHTTPServer):
    """Threaded server that counts requests and remembers the last one."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        self.request_count = 0
        self.heads_seen = 0
        self.last_request: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        super().__init__(address, UpstreamHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A peer that hangs up mid-request is part of the tests, not an error to print."""
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def count_head(self) -> None:
        """Count a request head, before its body is read (shows a body being streamed)."""
        with self._lock:
            self.heads_seen += 1

    def record(self, echo: dict[str, Any]) -> None:
        """Count a request that reached the dispatcher and keep its echo."""
        with self._lock:
            self.request_count += 1
            self.last_request = echo

    def track(self, conn: socket.socket, *, add: bool) -> None:
        """Remember open client connections (see `stop`)."""
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def close_connections(self) -> None:
        """Shut down every open client connection (idle keep-alive ones included)."""
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def start_upstream(
    host: str = "127.0.0.1", port: int = 0
) -> tuple[UpstreamServer, threading.Thread]:
    """Bind (port 0 = ephemeral) and serve on a daemon thread; returns at once.

    `UpstreamServer` is a `ThreadingHTTPServer` that also has `request_count`/`last_request`.
    """
    server = UpstreamServer((host, port))
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="upstream", daemon=True
    )
    thread.start()
    return server, thread


def stop(server: ThreadingHTTPServer) -> None:
    """Stop accepting, close open keep-alive connections, release the socket."""
    server.shutdown()
    if isinstance(server, UpstreamServer):
        server.close_connections()
    server.server_close()
