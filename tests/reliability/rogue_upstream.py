"""An upstream that breaks HTTP framing on purpose, over raw sockets (issue 11).

Each path names a misbehaviour: bytes after a complete response (a second response, or
more body than Content-Length said), a body answered to HEAD, a body on a 204, each sent in
the same packet as the response or `LATE` seconds after it. `/ok` answers correctly with
the request id it saw, so a test can tell whose response a client received.
"""

from __future__ import annotations

import json
import socket
import threading
import time

LATE = 0.05
INJECTED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Injected: yes\r\n"
    b"Content-Length: 19\r\n\r\n{\"who\": \"injected\"}"
)
SECRET_BODY = b'{"who": "head-leak", "secret": "s3cr3t-of-another-client"}'


def _response(status: str, body: bytes, extra: bytes = b"", length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return (
        b"HTTP/1.1 %b\r\nContent-Type: application/json\r\n%bContent-Length: %d\r\n\r\n"
        % (status.encode(), extra, size)
    )


class RogueUpstream:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.requests: list[bytes] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop = True
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                self.requests.append(head)
                try:
                    self._answer(conn, head)
                except OSError:
                    return

    def _answer(self, conn: socket.socket, head: bytes) -> None:
        request_line, *lines = head.split(b"\r\n")
        method, target, _ = request_line.split(b" ", 2)
        headers = dict(line.lower().split(b": ", 1) for line in lines)
        path = target.decode()
        late = path.endswith("/late")
        if path.startswith("/ok"):
            body = json.dumps({"who": "ok", "id": headers[b"x-request-id"].decode()}).encode()
            conn.sendall(_response("200 OK", body) + (b"" if method == b"HEAD" else body))
            return
        if path.startswith("/second-response"):
            body = b'{"who": "first"}'
            first, rest = _response("200 OK", body) + body, INJECTED
        elif path.startswith("/overlong"):
            body = b'{"who": "short"}'
            first, rest = _response("200 OK", body) + body, b'{"who": "overflow"}'
        elif path.startswith("/head-body"):
            first, rest = _response("200 OK", SECRET_BODY), SECRET_BODY
        elif path.startswith("/no-content"):
            first, rest = b"HTTP/1.1 204 No Content\r\n\r\n", SECRET_BODY
        else:
            conn.sendall(_response("404 Not Found", b"{}") + b"{}")
            return
        if late:
            conn.sendall(first)
            time.sleep(LATE)
            conn.sendall(rest)
        else:
            conn.sendall(first + rest)


CONTRACT = """
openapi: 3.0.3
info: {title: rogue, version: "1"}
security: []
components:
  schemas:
    Who:
      type: object
      properties: {who: {type: string}, id: {type: string}, secret: {type: string}}
paths:
"""
for _name in ("ok", "second-response", "overlong", "head-body", "no-content"):
    for _timing in ("now", "late"):
        CONTRACT += f"""
  /{_name}/{_timing}:
    get:
      responses:
        "200":
          description: ok
          content: {{application/json: {{schema: {{$ref: "#/components/schemas/Who"}}}}}}
        "204": {{description: none}}
"""
