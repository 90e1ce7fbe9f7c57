"""A deliberately naive pets/users/orders JSON service for `apishield demo`.

It is the "before" picture: it trusts its input, leaks an undeclared `password_hash`
field, answers `GET /orders/13` with a traceback that names an SQL statement, and
advertises its stack in `Server`/`X-Powered-By`. Put the gateway in front of it and each
of those disappears. Standard library only, so the demo needs nothing extra to run.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

JsonObj = dict[str, Any]

SERVER_HEADER = "DemoPets/0.1"
POWERED_BY = "Python-stdlib"

# What a careless app prints when a query blows up; the gateway must mask it.
FAKE_TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/srv/demopets/orders.py", line 88, in get_order\n'
    '    cur.execute("SELECT id, user_id, pet_id, status FROM orders WHERE id = %s" % order_id)\n'
    '  File "/usr/lib/python3.11/sqlite3/dbapi2.py", line 17, in execute\n'
    "sqlite3.OperationalError: no such row: "
    "SELECT id, user_id, pet_id, status FROM orders WHERE id = 0\n"
)


class BadRequest(Exception):
    """The request could not be read (bad framing or JSON): answer 400."""


@dataclass(frozen=True)
class ReceivedRequest:
    """One request exactly as the demo read it, kept only when recording is on.

    Tests put the gateway in front of the demo and check every recorded request against
    the contract: what breaks it must never get this far.
    """

    method: str
    path: str  # raw, still percent-encoded, as it came on the request line
    query: str  # raw, after the first `?` ("" when there is none)
    headers: tuple[tuple[str, str], ...]  # in order, repeats kept
    body: bytes | None  # None: the framing was broken and the body could not be read


class Store:
    """In-memory data; one lock because handlers run on many threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pets: dict[int, JsonObj] = {
            1: {"id": 1, "name": "Rex", "tag": "dog"},
            2: {"id": 2, "name": "Tom", "tag": "cat"},
            3: {"id": 3, "name": "Nemo", "tag": "fish"},
        }
        # password_hash is not in the contract: the leak the gateway's response filter stops.
        self.users: dict[int, JsonObj] = {
            1: {
                "id": 1,
                "name": "Alice",
                "email": "alice@example.com",
                "password_hash": "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$ZmFrZWhhc2gtYWxpY2U",
            },
            2: {
                "id": 2,
                "name": "Bob",
                "email": "bob@example.com",
                "password_hash": "$argon2id$v=19$m=65536,t=3,p=4$cGVwcGVyMTI$ZmFrZWhhc2gtYm9i",
            },
        }
        self.orders: dict[int, JsonObj] = {
            1: {"id": 1, "user_id": 1, "pet_id": 1, "status": "delivered"},
            2: {"id": 2, "user_id": 1, "pet_id": 2, "status": "placed"},
            3: {"id": 3, "user_id": 2, "pet_id": 3, "status": "approved"},
        }
        self.next_pet_id = 4
        self.next_order_id = 4


Response = tuple[int, Any]  # (status, JSON-able body or None)
Route = Callable[["DemoHandler", re.Match[str], JsonObj, bytes], Response]


class DemoHandler(BaseHTTPRequestHandler):
    """Routes by (method, path regex); every request body is read first to keep framing."""

    protocol_version = "HTTP/1.1"
    # Headers and body are two writes; without this, Nagle + delayed ACK stall keep-alive.
    disable_nagle_algorithm = True
    server: DemoServer

    # -- plumbing -----------------------------------------------------------------------

    def version_string(self) -> str:
        """Advertise the stack on purpose; the gateway strips it."""
        return SERVER_HEADER

    def send_response(self, code: int, message: str | None = None) -> None:
        """Add X-Powered-By to every response, including http.server's own errors."""
        super().send_response(code, message)
        self.send_header("X-Powered-By", POWERED_BY)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the demo's console belongs to the gateway's access log."""

    def _read_body(self) -> bytes:
        """Read the body (Content-Length or chunked) so the next request parses cleanly."""
        te = self.headers.get("Transfer-Encoding")
        if te is not None:
            if te.strip().lower() != "chunked":
                raise BadRequest("unsupported transfer-encoding")
            return _read_chunked(self.rfile)
        cl = self.headers.get("Content-Length")
        if cl is None:
            return b""
        if not cl.strip().isdigit():
            raise BadRequest("invalid content-length")
        return self.rfile.read(int(cl))

    def _send(self, status: int, body: Any, content_type: str = "application/json") -> None:
        """Write one response; Content-Length always (keep-alive), none on 204."""
        raw = b""
        if body is not None:
            raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        if status != HTTPStatus.NO_CONTENT:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(raw)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if raw and self.command != "HEAD":
            self.wfile.write(raw)

    def _dispatch(self) -> None:
        """Find the route for this method and path; anything unknown is 404."""
        try:
            body = self._read_body()
        except (BadRequest, ValueError) as exc:
            self.server.record(self, None)
            self.close_connection = True  # framing is lost; do not read another request
            self._send(400, {"error": str(exc)})
            return
        self.server.record(self, body)
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        method = "GET" if self.command == "HEAD" else self.command
        for route_method, pattern, func in ROUTES:
            if route_method != method:
                continue
            match = pattern.fullmatch(parts.path)
            if match is None:
                continue
            try:
                status, payload = func(self, match, query, body)
            except BadRequest as exc:
                status, payload = 400, {"error": str(exc)}
            if status == 500 and isinstance(payload, str):
                self._send(status, payload, "text/plain; charset=utf-8")
            else:
                self._send(status, payload)
            return
        self._send(404, {"error": "not found"})

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch

    # -- endpoints ----------------------------------------------------------------------

    def health(self, m: re.Match[str], q: JsonObj, body: bytes) -> Response:
        """Liveness probe."""
        return 200, {"status": "ok"}

    def list_pets(self, m: re.Match[str], q: JsonObj, body: bytes) -> Response:
        """No range check on `limit`: the contract (1..100) is the gateway's to enforce."""
        try:
            limit = int(q.get("limit", "20"))
        except ValueError:
            raise BadRequest("limit must be an integer") from None
        tag = q.get("tag")
        store = self.server.store
        with store.lock:
            pets = [dict(p) for p in store.pets.values() if tag is None or p.get("tag") == tag]
        return 200, pets[: max(limit, 0)]

    def create_pet(self, m: re.Match[str], q: JsonObj, body: bytes) -> Response:
        """Stores whatever name/tag it is given (no length or type checks)."""
        data = _json_object(body)
        store = self.server.store
        with store.lock:
            pet: JsonObj = {"id": store.next_pet_id, "name": data.get("name")}
            if data.get("tag") is not None:
                pet["tag"] = data["tag"]
            store.pets[pet["id"]] = pet
            store.next_pet_id += 1
            return 201, dict(pet)

    def get_pet(self, m: re.Match[str], q: JsonObj, body: bytes) -> Response:
        """One pet or 404."""
        store = self.server.store
        with store.lock:
            pet = store.pets.get(int(m["id"]))
            return (200, dict(pet)) if pet else (404, {"error": "not found"})

    def delete_pet(self, m: re.Match[str], q: JsonObj, body: bytes) -> Response:
        """204 without a body, or 404."""
        store = self.server.store
        with store.lock:
            if store.pets.pop(int(m["id"]), None) is None:
                return 404, {"error": "not found"}
        return 204, None

    def get_user(self, m: re.Match[str], q: JsonObj, body: bytes) -> Response:
        """Returns the whole record, password_hash included (the leak)."""
        store = self.server.store
        with store.lock:
            user = store.users.get(int(m["id"]))
            return (200, dict(user)) if user else (404, {"error": "not found"})

    def list_user_orders(self, m: re.Match[str], q: JsonObj, body: bytes) -> Response:
        """Orders of one user, 404 if the user does not exist."""
        user_id = int(m["id"])
        store = self.server.store
        with store.lock:
            if user_id not in store.users:
                return 404, {"error": "not found"}
            return 200, [dict(o) for o in store.orders.values() if o["user_id"] == user_id]

    def create_order(self, m: re.Match[str], q: JsonObj, body: bytes) -> Response:
        """Trusts user_id/pet_id as given (no existence or type checks)."""
        data = _json_object(body)
        store = self.server.store
        with store.lock:
            order: JsonObj = {
                "id": store.next_order_id,
                "user_id": data.get("user_id"),
                "pet_id": data.get("pet_id"),
                "status": "placed",
            }
            store.orders[order["id"]] = order
            store.next_order_id += 1
            return 201, dict(order)

    def get_order(self, m: re.Match[str], q: JsonObj, body: bytes) -> Response:
        """Order 13 "crashes" with a traceback body, to show the gateway's error masking
        (an id the contract allows: a 0 would be refused before it got here)."""
        order_id = int(m["id"])
        if order_id == 13:
            return 500, FAKE_TRACEBACK
        store = self.server.store
        with store.lock:
            order = store.orders.get(order_id)
            return (200, dict(order)) if order else (404, {"error": "not found"})


ROUTES: list[tuple[str, re.Pattern[str], Route]] = [
    ("GET", re.compile(r"/health"), DemoHandler.health),
    ("GET", re.compile(r"/pets"), DemoHandler.list_pets),
    ("POST", re.compile(r"/pets"), DemoHandler.create_pet),
    ("GET", re.compile(r"/pets/(?P<id>[0-9]+)"), DemoHandler.get_pet),
    ("DELETE", re.compile(r"/pets/(?P<id>[0-9]+)"), DemoHandler.delete_pet),
    ("GET", re.compile(r"/users/(?P<id>[0-9]+)"), DemoHandler.get_user),
    ("GET", re.compile(r"/users/(?P<id>[0-9]+)/orders"), DemoHandler.list_user_orders),
    ("POST", re.compile(r"/orders"), DemoHandler.create_order),
    ("GET", re.compile(r"/orders/(?P<id>[0-9]+)"), DemoHandler.get_order),
]


def _json_object(body: bytes) -> JsonObj:
    """Parse a JSON object body; anything else is the client's fault (400)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("expected a JSON object")
    return data


def _read_chunked(rfile: io.BufferedIOBase) -> bytes:
    """Decode a chunked body (RFC 9112 7.1), discarding extensions and trailers."""
    out = bytearray()
    while True:
        line = rfile.readline(65537)
        if not line.endswith(b"\n"):
            raise BadRequest("truncated chunk size line")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise BadRequest("invalid chunk size") from None
        if size == 0:
            break
        chunk = rfile.read(size)
        if len(chunk) != size or rfile.readline(3) not in (b"\r\n", b"\n"):
            raise BadRequest("truncated or malformed chunk")
        out += chunk
    while True:  # trailer section ends with an empty line
        line = rfile.readline(65537)
        if line in (b"\r\n", b"\n", b""):
            break
    return bytes(out)


class DemoServer(ThreadingHTTPServer):
    """Threaded server that owns the demo's data.

    With `record=True` it also keeps every request it receives (`received()`), so a test
    can check that nothing breaking the contract got through the gateway. Off by default
    (`apishield demo` never records): the list only grows.
    """

    daemon_threads = True
    server_address: tuple[str, int]  # AF_INET: (host, port); typeshed allows bytes hosts too

    def __init__(self, address: tuple[str, int], *, record: bool = False) -> None:
        self.store = Store()
        self.recording = record
        self._received: list[ReceivedRequest] = []
        self._received_lock = threading.Lock()
        super().__init__(address, DemoHandler)

    def record(self, handler: BaseHTTPRequestHandler, body: bytes | None) -> None:
        """Keep one request (when recording); called before it is answered."""
        if not self.recording:
            return
        path, _, query = handler.path.partition("?")
        request = ReceivedRequest(handler.command, path, query,
                                  tuple(handler.headers.items()), body)
        with self._received_lock:
            self._received.append(request)

    def received(self) -> list[ReceivedRequest]:
        """A copy of what was recorded so far, oldest first."""
        with self._received_lock:
            return list(self._received)


def make_server(host: str = "127.0.0.1", port: int = 0, *, record: bool = False) -> DemoServer:
    """Bind (port 0 = ephemeral, read `server.server_address`); caller runs serve_forever.

    `record=True` keeps every request received (see `DemoServer`); tests only.
    """
    return DemoServer((host, port), record=record)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m apishield.demo.api [--host H] [--port P]`: serve until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m apishield.demo.api",
        description="Naive demo pets API (the upstream of `apishield demo`).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args(argv)
    server = make_server(args.host, args.port)
    host, port = server.server_address[:2]
    try:
        print(f"demo API listening on http://{host}:{port}", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
