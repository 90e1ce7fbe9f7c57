"""Request framing the gateway must refuse (issue 11, should-fix), over raw sockets.

- RFC 9112 6.1: a Transfer-Encoding in an HTTP/1.0 request means the framing is faulty:
  400 and close (an HTTP/1.0 hop behind may delimit the body by its length or not at all).
- RFC 9112 3.2 / RFC 9110 7.2: Host is `uri-host [":" port]`; anything else (a list, a path,
  a query) is 400 and never reaches the upstream as `X-Forwarded-Host`.
"""

from __future__ import annotations

import pytest

from tests.conftest import raw_exchange


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_chunked_http10_request_is_400_and_closes(gateway, upstream):
    before = upstream.request_count
    response = raw_exchange(
        gateway.port,
        b"POST /echo HTTP/1.0\r\nHost: a\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        b"GET /echo HTTP/1.0\r\nHost: a\r\n\r\n",
    )
    assert status_of(response) == 400
    assert response.count(b"HTTP/1.") == 1  # closed: the pipelined request is not read
    assert b"connection: close" in response.lower()
    assert upstream.request_count == before


@pytest.mark.parametrize(
    "host",
    [b"a, b", b"a/b?c", b"a b", b"a@b", b"a:b:c", b"a:80x", b"[::1", b"[zz::1]", b"a\\b",
     b"a#b", b"\"a\""],
)
def test_invalid_host_is_400(gateway, upstream, host):
    before = upstream.request_count
    response = raw_exchange(gateway.port, b"GET /echo HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert status_of(response) == 400
    assert upstream.request_count == before


@pytest.mark.parametrize(
    "host",
    [b"api.example.com", b"api.example.com:8443", b"127.0.0.1:80", b"[::1]:8080", b"[::1]",
     b"under_score.example", b"xn--bcher-kva.example", b"a.b.", b"localhost:"],
)
def test_valid_host_passes(gateway, upstream, host):
    response = raw_exchange(
        gateway.port, b"GET /echo HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
    )
    assert status_of(response) == 200
    headers = dict(upstream.last_request["headers"])
    assert headers["x-forwarded-host"] == host.decode()


def test_empty_host_is_allowed_for_http11(gateway):
    """RFC 9112 3.2: a target without authority is sent with an empty Host."""
    response = raw_exchange(gateway.port,
                            b"GET /echo HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200


def test_content_length_with_thousands_of_leading_zeros_is_read_as_its_value(gateway):
    """1*DIGIT allows leading zeros, llhttp accepts them, and int() refuses 4,300+ digits:
    this was a 500 (issue 11)."""
    length = b"0" * 5000 + b"2"
    response = raw_exchange(
        gateway.port,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + length + b"\r\nConnection: close\r\n\r\n{}",
    )
    assert status_of(response) == 200


def test_content_length_of_thirty_digits_is_refused_cleanly(gateway, upstream):
    """llhttp refuses a length that overflows 64 bits (400); the middleware's limit step
    sees it as over any limit (413)."""
    before = upstream.request_count
    response = raw_exchange(
        gateway.port,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + b"9" * 30 + b"\r\n\r\n{}",
    )
    assert status_of(response) in (400, 413)
    assert upstream.request_count == before
