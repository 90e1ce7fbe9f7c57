"""Encoded credentials in an upstream's 500 never reach the gateway's logs (issue 11, item 5).

An upstream 500 body holding `x-api-key%3A%20ask_...` or `Bearer%20eyJ...` was logged whole:
redaction only knew the plain spellings. Here an upstream of the test's own answers a 500
with the credentials percent-encoded, form-encoded and JSON-escaped; the real gateway must
mask the body for the client (E3), log it for the operator, and leave no secret in its
stderr or its access log.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, unquote_plus

import pytest

from apishield.auth.apikeys import generate_key
from tests.conftest import raw_exchange


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


API_KEY = generate_key()[1]
JWT = ".".join((_b64url(b'{"alg":"RS256","typ":"JWT"}'),
                _b64url(b'{"sub":"alice","scope":"admin"}'), _b64url(bytes(range(64)))))
PASSWORD = "hunter2-S3cret"
SECRETS = (API_KEY, JWT, PASSWORD)
# what a careless upstream puts in its error page: the request it failed on, as it saw it
BODY = "\n".join((
    f"upstream failed: x-api-key%3A%20{API_KEY}",
    f"rejected Bearer%20{JWT} (Authorization%3A%20Bearer%20{JWT})",
    f"retry: GET /login?user=alice&password%3D{PASSWORD}",
    json.dumps({"headers": f"X-Api-Key: {API_KEY}\r\nAuthorization: Bearer {JWT}"},
               ensure_ascii=True).replace(": ", "\\u003a\\u0020"),
    f"form: token=Bearer+{JWT}",
))


class _ErrorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        raw = BODY.encode()
        self.send_response(500)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent."""


@pytest.fixture
def leaky_upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ErrorHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()
    server.server_close()


def _readings(text: str) -> list[str]:
    """`text` and its percent-, form- and JSON-decoded readings."""
    readings = [text]
    for _ in range(2):
        readings += [unquote(r) for r in readings] + [unquote_plus(r) for r in readings]
        readings += [r.replace("\\u003a", ":").replace("\\u0020", " ") for r in readings]
    return readings


def _leaks(text: str) -> list[str]:
    """Any 12-character piece of a secret in any reading of `text`."""
    pieces = {secret[i:i + 12] for secret in SECRETS for i in range(len(secret) - 11)}
    return sorted({piece for reading in _readings(text) for piece in pieces if piece in reading})


def test_encoded_credentials_in_an_upstream_500_are_not_logged(make_gateway, leaky_upstream):
    assert _leaks(BODY)  # the body does carry every secret, in encoded forms
    gateway = make_gateway(upstream=leaky_upstream)
    raw = raw_exchange(gateway.port,
                       b"GET /error HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 ")
    assert json.loads(payload)["type"].endswith("upstream-error")  # masked for the client
    assert not _leaks(payload.decode())
    request_id = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                      if line.lower().startswith(b"x-request-id:"))

    deadline = time.monotonic() + 5
    while request_id not in gateway.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    logged = [line for line in gateway.stderr().splitlines() if request_id in line]
    assert logged, gateway.stderr()
    assert "upstream failed: x-api-key%3A%20<redacted-api-key>" in logged[0]  # still useful
    assert "rejected Bearer%20<redacted-jwt> (Authorization%3A%20<redacted>" in logged[0]
    gateway.log_entry(request_id)  # the access log line is written
    assert not _leaks(gateway.stderr()), gateway.stderr()
    assert not _leaks(gateway.access_log.read_text())
