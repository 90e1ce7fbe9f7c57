"""An upstream that records the raw bytes of every request it receives (standard library).

The smuggling tests put the gateway in front of it and then look at what actually arrived
on the far side. It parses requests itself, deliberately strictly and without any
leniency, so that anything the gateway lets through that is not a clean HTTP/1.1 request
framed by Content-Length shows up as a `problem` on the recorded request instead of being
silently normalized:

- the head must use CRLF line ends only (no bare CR or LF, no NUL or other CTL), a request
  line `METHOD SP target SP HTTP/1.x`, field lines `token ":" OWS value OWS`, no obs-fold;
- the body must be framed by at most one Content-Length (digits only); a Transfer-Encoding
  is a problem (the gateway re-frames everything it forwards), and so are bytes left over
  when the connection ends.

Each request is answered `200` with a small JSON body (its path and the X-Request-Id it
carried) and a Content-Length, keeping the connection alive: a desync on the way back
(a response reaching the wrong client) shows up as a body naming another request id.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from dataclasses import dataclass, field

HEAD_LIMIT = 64 * 1024
BODY_LIMIT = 4 * 1024 * 1024
TCHAR = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]"
REQUEST_LINE = re.compile(rb"([A-Z]+) ([\x21-\x7e]+) HTTP/(1\.[01])")
FIELD_LINE = re.compile(rb"(" + TCHAR + rb"+):[ \t]*(.*?)[ \t]*")
CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass
class RecordedRequest:
    """One request as it arrived, with everything that was wrong with it."""

    connection: int  # which upstream connection it came on (0, 1, ...)
    raw: bytes  # head, blank line and body, exactly as received
    method: str = ""
    target: str = ""
    version: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)  # names lower-cased
    body: bytes = b""
    problems: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


class _Framing(Exception):
    """The body cannot be delimited: record what came and close the connection."""


def parse_head(head: bytes, request: RecordedRequest) -> None:
    """Fill `request` from `head` (without the blank line), noting every deviation."""
    if b"\r" in head.replace(b"\r\n", b"") or b"\n" in head.replace(b"\r\n", b""):
        request.problems.append("bare CR or LF in the head")
    lines = head.split(b"\r\n")
    match = REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        request.problems.append(f"bad request line {lines[0][:200]!r}")
    else:
        request.method = match.group(1).decode()
        request.target = match.group(2).decode("latin-1")
        request.version = match.group(3).decode()
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            request.problems.append(f"obs-fold line {line[:200]!r}")
            continue
        match = FIELD_LINE.fullmatch(line)
        if match is None:
            request.problems.append(f"bad field line {line[:200]!r}")
            continue
        name, value = match.groups()
        if CTL.search(value):
            request.problems.append(f"CTL in field value {line[:200]!r}")
        request.headers.append((name.decode().lower(), value.decode("latin-1")))


class _Connection:
    """Reads requests off one accepted socket until it closes or framing fails."""

    def __init__(self, server: RecordingUpstream, sock: socket.socket, number: int) -> None:
        self.server = server
        self.sock = sock
        self.number = number
        self.buf = b""
        self.eof = False

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise _Framing(f"connection ended {n - len(self.buf)} bytes short of the body")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if len(self.buf) > HEAD_LIMIT or not self._fill():
                raise _Framing("unterminated chunk line")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _chunked(self) -> bytes:
        """Decode a chunked body (only to keep reading after noting the problem)."""
        out = b""
        while True:
            size_text = self._line().split(b";")[0]
            if not re.fullmatch(rb"[0-9A-Fa-f]{1,8}", size_text):
                raise _Framing(f"bad chunk size {size_text[:40]!r}")
            size = int(size_text, 16)
            if size == 0:
                while self._line():
                    pass
                return out
            out += self._take(size)
            if self._take(2) != b"\r\n":
                raise _Framing("chunk data not followed by CRLF")

    def _one(self) -> bool:
        """Read and answer one request; False when the connection is done."""
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > HEAD_LIMIT or not self._fill():
                if self.buf:
                    self.server.record(RecordedRequest(
                        self.number, self.buf,
                        problems=["bytes that are not a complete request head"]))
                return False
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        request = RecordedRequest(self.number, head + b"\r\n\r\n")
        parse_head(head, request)
        keep = not request.problems
        try:
            te = request.values("transfer-encoding")
            lengths = request.values("content-length")
            if te:
                request.problems.append(f"Transfer-Encoding forwarded: {te}")
                keep = False
                if [v.strip().lower() for v in te] != ["chunked"]:
                    raise _Framing("unknown transfer coding")
                request.body = self._chunked()
            elif lengths:
                if len(lengths) != 1 or not lengths[0].isdigit():
                    raise _Framing(f"bad Content-Length {lengths}")
                n = int(lengths[0])
                if n > BODY_LIMIT:
                    raise _Framing(f"Content-Length {n} over the recorder's limit")
                request.body = self._take(n)
            request.raw += request.body
        except _Framing as exc:
            request.problems.append(str(exc))
            request.raw += self.buf
            self.buf = b""
            self.server.record(request)
            return False
        self.server.record(request)
        ids = request.values("x-request-id")
        payload = json.dumps({"path": request.path, "method": request.method,
                              "request_id": ids[0] if len(ids) == 1 else None,
                              "body_len": len(request.body)}).encode()
        head_out = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n" % len(payload))
        if not keep:
            head_out += b"Connection: close\r\n"
        body_out = b"" if request.method == "HEAD" else payload
        try:
            self.sock.sendall(head_out + b"\r\n" + body_out)
        except OSError:
            return False
        if not keep and self.buf:
            self.server.record(RecordedRequest(
                self.number, self.buf, problems=["bytes left unread behind a request the "
                                                 "recorder could not trust"]))
        return keep

    def serve(self) -> None:
        try:
            while self._one():
                pass
        finally:
            self.server.forget(self.sock)
            try:
                self.sock.close()
            except OSError:
                pass


class RecordingUpstream:
    """`start()` listens on 127.0.0.1 (an ephemeral port); every request is recorded."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(512)
        self.port: int = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._sockets: set[socket.socket] = set()
        self._connections = 0
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="recording-upstream",
                                        daemon=True)

    def start(self) -> RecordingUpstream:
        self._thread.start()
        return self

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self._closed:
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._sockets.add(sock)
                number = self._connections
                self._connections += 1
            threading.Thread(target=_Connection(self, sock, number).serve, daemon=True,
                             name=f"recording-upstream-{number}").start()

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._requests)

    def since(self, mark: int) -> list[RecordedRequest]:
        """The requests recorded after `count` was `mark`."""
        with self._lock:
            return list(self._requests[mark:])

    def stop(self) -> None:
        with self._lock:
            self._closed = True
            sockets = list(self._sockets)
        self._thread.join(2)
        self.listener.close()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
