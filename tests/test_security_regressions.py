"""Attack vectors against the running gateway, over raw sockets (nothing normalizes the bytes).

Each test sends what an attacker would send and asserts four things: the status, that the
answer is a masked `application/problem+json` (no traceback, class name or upstream banner),
whether the connection is closed, and whether anything reached the upstream
(`upstream.request_count` before/after, `upstream.last_request`).
"""

from __future__ import annotations

import json
import re
import socket
import time
from dataclasses import dataclass

import pytest

from tests.conftest import start_gateway

STATUS_LINE = re.compile(rb"^HTTP/1\.1 (\d{3}) ")
PROBLEM_KEYS = {"type", "title", "status", "detail", "instance", "practice"}
# Nothing internal may appear in a refusal: tracebacks, Python/llhttp class names, the
# upstream's banners, or the private `reason` slugs that only the access log carries.
LEAKS = (
    b"Traceback", b'File "', b".py", b"LeakyServer", b"PHP/", b"Exception", b"Error:",
    b"httptools", b"HttpParser", b"llhttp", b"apishield.", b"BadRequest", b"Problem(",
    b"PayloadTooLarge", b"HeadersTooLarge", b"UriTooLong", b"RequestTimeout", b"Forbidden(",
    b"-over-limit", b"not-chunked", b"path-", b"malformed-request", b"client-too-slow",
)
TIGHT = {
    "limits": {"max_url_length": 256, "max_header_bytes": 1024, "max_header_count": 10,
               "max_body_bytes": 1024},
    "timeouts": {"header": "1s", "body": "1s", "keepalive": "1s"},
}


# -- helpers ------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    head: bytes
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def json(self) -> object:
        return json.loads(self.body)


class Conn:
    """One raw TCP connection to the gateway; reads responses one at a time."""

    def __init__(self, port: int, timeout: float = 3.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = b""
        self.eof = False

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        if self.eof:
            raise AssertionError(f"connection closed; unread bytes: {self.buf[:300]!r}")
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        except TimeoutError:
            raise AssertionError(
                f"no complete response within {self.timeout}s; got {self.buf[:300]!r}"
            ) from None
        if not data:
            self.eof = True
            if not self.buf:
                raise AssertionError("connection closed without a response")
        self.buf += data

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def read_response(self, method: str = "GET") -> Response:
        """Exactly one response (a 1xx is returned on its own, without a body)."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        match = STATUS_LINE.match(head)
        assert match, f"not an HTTP/1.1 status line: {head[:100]!r}"
        status = int(match.group(1))
        headers = []
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower().decode("latin-1"),
                            value.strip().decode("latin-1")))
        response = Response(status, head, headers)
        if status < 200 or status in (204, 304) or method == "HEAD":
            return response
        length = response.header("content-length")
        if response.header("transfer-encoding") == "chunked":
            parts = []
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():
                        pass
                    break
                parts.append(self._take(size))
                assert self._take(2) == b"\r\n"
            response.body = b"".join(parts)
        elif length is not None:
            response.body = self._take(int(length))
        else:  # delimited by the close
            while not self.eof:
                try:
                    self._fill()
                except AssertionError:
                    break
            response.body, self.buf = self.buf, b""
        return response

    def is_closed(self, wait: float = 2.0) -> bool:
        """True if the server closes (FIN or RST) within `wait` s without sending more."""
        assert not self.buf, f"unexpected bytes after the response: {self.buf[:300]!r}"
        if self.eof:
            return True
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(self.timeout)
        if data:
            raise AssertionError(f"unexpected bytes after the response: {data[:300]!r}")
        self.eof = True
        return True


def assert_problem(response: Response, status: int) -> dict[str, object]:
    """A masked RFC 9457 refusal with `status`, and nothing internal in it."""
    assert response.status == status, (response.status, response.head, response.body[:300])
    assert response.header("content-type") == "application/problem+json", response.head
    for leak in LEAKS:
        assert leak not in response.body, (leak, response.body)
        assert leak not in response.head, (leak, response.head)
    assert response.header("server") is None and response.header("x-powered-by") is None
    problem = response.json()
    assert isinstance(problem, dict) and set(problem) == PROBLEM_KEYS, problem
    assert problem["status"] == status
    request_id = response.header("x-request-id")
    assert request_id and str(problem["instance"]).endswith(request_id)
    return problem


def refused(port: int, payload: bytes, status: int, *, closes: bool = True) -> Response:
    """Send `payload` on a fresh connection; expect one refusal and (maybe) a close."""
    with Conn(port) as conn:
        conn.send(payload)
        response = conn.read_response()
        assert_problem(response, status)
        if closes:
            assert response.header("connection") == "close", response.head
            assert conn.is_closed(), "the gateway kept the connection open"
        return response


def upstream_headers(upstream) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in upstream.last_request["headers"]]


def post(path: bytes, extra: bytes = b"", body: bytes = b"") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + extra + b"\r\n" + body)


@pytest.fixture(scope="module")
def tight(tmp_path_factory, upstream_url):
    """A gateway with small limits and 1 s timeouts (the module shares one: startup cost)."""
    running = start_gateway(tmp_path_factory.mktemp("tight"), upstream_url, TIGHT)
    yield running
    running.stop()


# -- 1. request smuggling -----------------------------------------------------------------

SMUGGLED = b"GET /echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "framing, body",
    [
        pytest.param(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                     b"2\r\n{}\r\n0\r\n\r\n", id="CL-then-TE"),
        pytest.param(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
                     b"2\r\n{}\r\n0\r\n\r\n", id="TE-then-CL"),
        pytest.param(b"Content-Length: 2\r\nContent-Length: 2\r\n", b"{}", id="two-CL-same"),
        pytest.param(b"Content-Length: 2\r\nContent-Length: 40\r\n", b"{}", id="two-CL-differ"),
        pytest.param(b"Transfer-Encoding: xchunked\r\n", b"2\r\n{}\r\n0\r\n\r\n",
                     id="TE-xchunked"),
        pytest.param(b"Transfer-Encoding: chunked, identity\r\n", b"2\r\n{}\r\n0\r\n\r\n",
                     id="TE-chunked-identity"),
        pytest.param(b"Transfer-Encoding: identity, chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n",
                     id="TE-identity-chunked"),
        pytest.param(b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                     b"2\r\n{}\r\n0\r\n\r\n", id="TE-gzip-then-chunked"),
        pytest.param(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                     b"2\r\n{}\r\n0\r\n\r\n", id="TE-twice"),
        pytest.param(b" Transfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n",
                     id="TE-leading-space-obs-fold"),
        pytest.param(b"Transfer-Encoding:\r\n chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n",
                     id="TE-folded-value"),
        pytest.param(b"Transfer-Encoding : chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n",
                     id="TE-space-before-colon"),
        pytest.param(b"Transfer-Encoding\t: chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n",
                     id="TE-tab-before-colon"),
        pytest.param(b"Transfer-Encoding: \x0bchunked\r\n", b"2\r\n{}\r\n0\r\n\r\n",
                     id="TE-vertical-tab"),
        pytest.param(b"Transfer-Encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n",
                     id="bad-chunk-size"),
        pytest.param(b"Transfer-Encoding: chunked\r\n", b"-2\r\n{}\r\n0\r\n\r\n",
                     id="negative-chunk-size"),
        pytest.param(b"Transfer-Encoding: chunked\r\n", b"fffffffffffffffff1\r\n{}\r\n",
                     id="chunk-size-overflow"),
        pytest.param(b"Transfer-Encoding: chunked\r\n", b"2\n{}\n0\n\n", id="chunk-bare-LF"),
        pytest.param(b"Transfer-Encoding: chunked\r\n", b"2\r\n{}xx\r\n0\r\n\r\n",
                     id="chunk-data-overrun"),
        pytest.param(b"Content-Length: -1\r\n", b"", id="CL-negative"),
        pytest.param(b"Content-Length: abc\r\n", b"", id="CL-non-numeric"),
        pytest.param(b"Content-Length: +2\r\n", b"{}", id="CL-plus-sign"),
        pytest.param(b"Content-Length: 1 2\r\n", b"{}", id="CL-two-numbers"),
        pytest.param(b"Content-Length: 99999999999999999999999\r\n", b"", id="CL-overflow"),
    ],
)
def test_ambiguous_framing_is_400_and_close(gateway, upstream, framing, body):
    before = upstream.request_count
    refused(gateway.port, post(b"/echo", framing, body) + SMUGGLED, 400)
    assert upstream.request_count == before


@pytest.mark.parametrize(
    "framing, body",
    [
        # TE.CL: a CL-reading hop stops after `{}` and takes the rest as a new request.
        pytest.param(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
                     b"2\r\n{}\r\n0\r\n\r\n" + SMUGGLED, id="TE.CL"),
        # CL.TE: a TE-reading hop ends the body at `0\r\n\r\n` and reads the rest as a request.
        pytest.param(b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n"
                     % (5 + len(SMUGGLED)), b"0\r\n\r\n" + SMUGGLED, id="CL.TE"),
    ],
)
def test_smuggled_request_never_reaches_upstream(gateway, upstream, framing, body):
    before = upstream.request_count
    response = refused(gateway.port, post(b"/echo", framing, body), 400)
    assert b"smuggled" not in response.body
    assert upstream.request_count == before
    assert upstream.last_request is None or upstream.last_request["path"] != "/echo/smuggled"


@pytest.mark.parametrize("te", [b"CHUNKED", b"Chunked", b"\tchunked", b"  chunked  "])
def test_transfer_encoding_chunked_case_and_ows_are_legal_and_reframed(gateway, upstream, te):
    # Field values are case-insensitive and OWS around them is not part of the value: these
    # are plain `chunked` (RFC 9112 7, RFC 9110 5.5), decoded by the gateway and re-framed.
    before = upstream.request_count
    with Conn(gateway.port) as conn:
        conn.send(post(b"/echo", b"Transfer-Encoding: " + te + b"\r\n",
                       b"3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n"))
        response = conn.read_response()
        assert response.status == 200, response.head
    assert upstream.request_count == before + 1
    assert upstream.last_request["body"] == '{"a":1}'
    names = dict(upstream_headers(upstream))
    assert names["content-length"] == "7" and "transfer-encoding" not in names


def test_chunked_trailers_are_not_merged_into_forwarded_headers(gateway, upstream):
    # Trailer fields arrive after the head was checked; forwarding them as header fields
    # would let a client add headers (a second Content-Type, ...) past every head check.
    payload = post(b"/echo", b"Transfer-Encoding: chunked\r\n",
                   b"2\r\n{}\r\n0\r\nContent-Type: text/html\r\nX-Evil-Trailer: 1\r\n\r\n")
    with Conn(gateway.port) as conn:
        conn.send(payload)
        response = conn.read_response()
    assert response.status in (200, 400), response.head
    if response.status == 200:
        sent = upstream_headers(upstream)
        assert [v for k, v in sent if k == "content-type"] == ["application/json"], sent
        assert "x-evil-trailer" not in dict(sent), sent


# -- 2. path tricks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        b"/echo/../admin", b"/echo/./1", b"/echo/..", b"/echo/.", b"/echo//1", b"//echo",
        b"/echo/%2e%2e/admin", b"/echo/%2E%2E%2Fadmin", b"/echo/.%2e/admin", b"/echo/%2e",
        b"/echo/a%2fb", b"/echo/a%2Fb", b"/echo/a%5cb", b"/echo\\admin", b"/echo/a\\..\\b",
        b"/echo/%252e%252e", b"/echo/%252fadmin", b"/echo/%zz", b"/echo/%2", b"/echo/%",
        b"/echo/%00", b"/echo/a%0d%0aX-Injected:%201", b"/echo/%7f", b"/echo/%ff%fe",
        b"/echo/%c0%ae%c0%ae", b"/echo/%ed%a0%80",
    ],
)
def test_ambiguous_path_is_400_and_never_forwarded(gateway, upstream, target):
    before = upstream.request_count
    with Conn(gateway.port) as conn:
        conn.send(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert_problem(conn.read_response(), 400)
        # The request was framed correctly: the connection stays usable.
        conn.send(b"GET /echo/next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert conn.read_response().status == 200
    assert upstream.request_count == before + 1
    assert upstream.last_request["path"] == "/echo/next"


@pytest.mark.parametrize(
    "target", [b"/echo/..;/files/a.json", b"/echo/.;x/files/a.json", b"/echo/%2e%2e;/files/a.json",
               b"/echo/..%3b/files/a.json"],
)
def test_dot_segment_with_path_parameter_is_400(gateway, upstream, target):
    # Servlet containers drop `;params` before resolving dot segments: `/echo/..;/files/a.json`
    # is `/files/a.json` there, a resource the contract never declared.
    before = upstream.request_count
    refused(gateway.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400, closes=False)
    assert upstream.request_count == before


def test_valid_utf8_path_passes_raw(gateway, upstream):
    before = upstream.request_count
    with Conn(gateway.port) as conn:
        conn.send(b"GET /echo/%C3%A9t%C3%A9 HTTP/1.1\r\nHost: x\r\n\r\n")
        response = conn.read_response()
    assert response.status == 200
    assert upstream.request_count == before + 1
    assert upstream.last_request["path"] == "/echo/%C3%A9t%C3%A9"  # raw, not re-encoded


@pytest.mark.parametrize(
    "target",
    [b"http://evil/echo", b"http://127.0.0.1/echo", b"//evil/echo#x", b"/echo#frag",
     b"/echo/1#/../admin", b"*"],
    ids=["absolute-form", "absolute-form-local", "fragment-and-empty", "fragment",
         "fragment-traversal", "asterisk"],
)
def test_non_origin_form_target_is_400_and_close(gateway, upstream, target):
    before = upstream.request_count
    refused(gateway.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400)
    assert upstream.request_count == before


def test_undeclared_path_with_body_is_404_not_forwarded(gateway, upstream):
    before = upstream.request_count
    refused(gateway.port, post(b"/admin", b"Content-Length: 2\r\n", b"{}"), 404, closes=False)
    assert upstream.request_count == before


# -- 3. sizes -----------------------------------------------------------------------------


def test_url_at_limit_passes_and_over_limit_is_414(tight, upstream):
    at_limit = b"/echo/" + b"a" * (256 - 6)
    with Conn(tight.port) as conn:
        conn.send(b"GET " + at_limit + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_response().status == 200
    before = upstream.request_count
    refused(tight.port, b"GET " + at_limit + b"b HTTP/1.1\r\nHost: x\r\n\r\n", 414)
    assert upstream.request_count == before


def test_long_url_is_refused_before_the_request_line_ends(tight, upstream):
    before = upstream.request_count
    refused(tight.port, b"GET /echo/" + b"a" * 4000, 414)  # no ` HTTP/1.1\r\n` ever sent
    assert upstream.request_count == before


def test_header_bytes_over_limit_is_431(tight, upstream):
    before = upstream.request_count
    payload = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"
    refused(tight.port, payload, 431)
    assert upstream.request_count == before


def test_unterminated_huge_header_is_431_before_it_ends(tight, upstream):
    # A header value is not buffered without bound waiting for its CRLF (memory exhaustion).
    # The gateway counts the raw bytes of an unfinished head across reads (one read is
    # bounded by the event loop's buffer), so the value is sent in several pieces here.
    import time

    before = upstream.request_count
    with Conn(tight.port, timeout=0.8) as conn:  # under the 1 s header timeout: no 408 race
        conn.send(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(8):
            time.sleep(0.02)
            try:
                conn.send(b"a" * 8 * 1024)
            except OSError:
                break  # refused and closed before everything was sent: fine
        assert_problem(conn.read_response(), 431)
        assert conn.is_closed()
    assert upstream.request_count == before


def test_header_count_at_limit_passes_and_over_limit_is_431(tight, upstream):
    def request(count: int) -> bytes:
        extra = b"".join(b"X-H%d: 1\r\n" % i for i in range(count - 1))
        return b"GET /echo HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n"

    with Conn(tight.port) as conn:
        conn.send(request(10))
        assert conn.read_response().status == 200
    before = upstream.request_count
    refused(tight.port, request(11), 431)
    assert upstream.request_count == before


def test_content_length_over_limit_is_413_before_the_body_is_sent(gateway, upstream):
    before = upstream.request_count
    # Only the head: the 413 must not wait for 2 MB that never come.
    refused(gateway.port, post(b"/echo", b"Content-Length: 2000000\r\n"), 413)
    assert upstream.request_count == before


def test_chunked_body_growing_past_limit_is_413_and_close(tight, upstream):
    before = upstream.request_count
    with Conn(tight.port) as conn:
        conn.send(post(b"/echo", b"Transfer-Encoding: chunked\r\n", b"3e8\r\n" + b"a" * 1000
                       + b"\r\n"))
        time.sleep(0.1)
        conn.send(b"64\r\n" + b"a" * 100 + b"\r\n")  # 1100 > 1024, and no last-chunk yet
        response = conn.read_response()
        assert_problem(response, 413)
        assert response.header("connection") == "close"
        assert conn.is_closed()
    assert upstream.request_count == before


@pytest.mark.parametrize(
    "framing, body, status",
    [
        pytest.param(b"Content-Length: 16\r\n", b'{"a":"12345678"}', 200, id="CL-16-at-limit"),
        pytest.param(b"Content-Length: 17\r\n", b"", 413, id="CL-17-head-only"),
        pytest.param(b"Transfer-Encoding: chunked\r\n",
                     b"a\r\n" + b'{"a":"1234' + b"\r\n9\r\n" + b'5678901"}\r\n', 413,
                     id="chunked-19"),
    ],
)
def test_per_operation_body_limit(gateway, upstream, framing, body, status):
    before = upstream.request_count
    with Conn(gateway.port) as conn:
        conn.send(post(b"/echo/small", framing, body))
        response = conn.read_response()
        if status == 200:
            assert response.status == 200, response.head
            assert upstream.request_count == before + 1
            assert upstream.last_request["body"] == body.decode()
            return
        assert_problem(response, status)
        assert conn.is_closed()
    assert upstream.request_count == before


def test_nothing_after_a_refusal_with_close_is_answered_or_forwarded(gateway, upstream):
    # The 413 says `connection: close`; bytes that arrived in the same read (the refused
    # body, then another request) must not produce another response or upstream request.
    before = upstream.request_count
    payload = post(b"/echo/small", b"Content-Length: 20\r\n", b'{"a":"123456789012"}')
    refused(gateway.port, payload + SMUGGLED, 413)
    assert upstream.request_count == before


# -- 4. slow clients ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "partial",
    [
        pytest.param(b"GET /ec", id="half-request-line"),
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n", id="unfinished-headers"),
        pytest.param(post(b"/echo", b"Content-Length: 10\r\n", b'{"a'), id="partial-body"),
    ],
)
def test_stalled_request_is_408_and_closed(tight, upstream, partial):
    before = upstream.request_count
    start = time.monotonic()
    with Conn(tight.port, timeout=4) as conn:
        conn.send(partial)
        response = conn.read_response()
        assert_problem(response, 408)
        assert conn.is_closed()
    assert 0.8 <= time.monotonic() - start < 3.0
    assert upstream.request_count == before


def test_drip_fed_headers_are_cut_at_the_header_timeout(tight):
    # Each header line arrives well within any per-read timeout; the whole head must not.
    start = time.monotonic()
    with Conn(tight.port, timeout=4) as conn:
        conn.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        conn.sock.settimeout(0.25)
        for i in range(16):  # up to 4 s of dripping
            try:
                if conn.sock.recv(1, socket.MSG_PEEK):
                    break
            except TimeoutError:
                pass
            try:
                conn.send(b"X-Drip-%d: 1\r\n" % i)
            except (BrokenPipeError, ConnectionResetError):
                break
        conn.sock.settimeout(conn.timeout)
        assert_problem(conn.read_response(), 408)
        assert conn.is_closed()
    assert time.monotonic() - start < 2.5


@pytest.mark.parametrize("first", [b"", b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"],
                         ids=["never-sends", "idle-keepalive"])
def test_idle_connection_is_closed_silently(tight, first):
    start = time.monotonic()
    with Conn(tight.port, timeout=4) as conn:
        if first:
            conn.send(first)
            response = conn.read_response()
            assert response.status == 200 and response.header("connection") is None
            start = time.monotonic()
        assert conn.is_closed(wait=3.0), "idle connection was not closed"
    assert time.monotonic() - start < 2.0


def test_stalled_body_behind_a_slow_response_is_still_timed_out(tight, upstream):
    # The body timer of the second request fires while the first is being answered; it
    # must not be lost, or a client keeps the connection forever with a partial body.
    with Conn(tight.port, timeout=3.5) as conn:
        conn.send(b"GET /slow?ms=1300 HTTP/1.1\r\nHost: x\r\n\r\n"
                  + post(b"/echo", b"Content-Length: 10\r\n", b'{"a'))
        assert conn.read_response().status == 200
        answered = time.monotonic()
        before = upstream.request_count
        assert_problem(conn.read_response(), 408)
        assert conn.is_closed()
        assert time.monotonic() - answered < 2.5
    assert upstream.request_count == before


# -- 5. upgrades --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "upgrade",
    [
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
    ],
    ids=["websocket", "h2c"],
)
def test_upgrade_is_403_and_close(gateway, upstream, upgrade):
    before = upstream.request_count
    payload = b"GET /echo HTTP/1.1\r\nHost: x\r\n" + upgrade + b"\r\n" + SMUGGLED
    response = refused(gateway.port, payload, 403)
    assert response.header("upgrade") is None
    assert upstream.request_count == before


def test_connect_is_400_and_close(gateway, upstream):
    before = upstream.request_count
    refused(gateway.port, b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n", 400)
    assert upstream.request_count == before


# -- 6. malformed requests ----------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX\x00A: 1\r\n\r\n",
        b"GET /echo http/1.1\r\nHost: x\r\n\r\n",
        b"GET /echo x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /echo/\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
    ],
    ids=["header-without-colon", "garbage", "NUL-in-value", "NUL-in-name", "lowercase-version",
         "space-in-target", "raw-8bit-target", "h2-preface", "tls-client-hello"],
)
def test_malformed_request_is_400_and_close(gateway, upstream, payload):
    before = upstream.request_count
    refused(gateway.port, payload, 400)
    assert upstream.request_count == before


# -- 7. pipelining ------------------------------------------------------------------------


def test_good_then_malformed_pipelined(gateway, upstream):
    before = upstream.request_count
    with Conn(gateway.port) as conn:
        conn.send(b"GET /echo/first HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET / HTTP/1.1\r\nBad Header\r\n\r\n" + SMUGGLED)
        first = conn.read_response()
        assert first.status == 200 and first.json()["path"] == "/echo/first"
        assert_problem(conn.read_response(), 400)
        assert conn.is_closed()
    assert upstream.request_count == before + 1
    assert upstream.last_request["path"] == "/echo/first"


@pytest.mark.parametrize("count", [10, 40])  # 40 > the pipelining backlog: reading pauses
def test_pipelined_gets_answered_in_order(gateway, upstream, count):
    before = upstream.request_count
    payload = b"".join(b"GET /echo/p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(count))
    with Conn(gateway.port, timeout=5) as conn:
        conn.send(payload)
        for i in range(count):
            response = conn.read_response()
            assert response.status == 200 and response.json()["path"] == f"/echo/p{i}"
        assert not conn.is_closed(wait=0.2)  # keep-alive: still open
    assert upstream.request_count == before + count


# -- 8. header injection and Host ---------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [b"X-A: a\rX-Injected: 1", b"X-A: a\nX-Injected: 1", b"X-A: a\r\rX-Injected: 1"],
    ids=["bare-CR", "bare-LF", "double-CR"],
)
def test_header_value_with_bare_cr_or_lf_is_400(gateway, upstream, header):
    before = upstream.request_count
    refused(gateway.port, b"GET /echo HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n", 400)
    assert upstream.request_count == before


def test_missing_host_on_http11_is_400(gateway, upstream):
    # RFC 9112 3.2: an HTTP/1.1 request without Host MUST get a 400.
    before = upstream.request_count
    refused(gateway.port, b"GET /echo HTTP/1.1\r\n\r\n", 400)
    assert upstream.request_count == before


def test_http10_without_host_upstream_still_gets_exactly_one_host(gateway, upstream,
                                                                  upstream_url):
    # HTTP/1.0 has no Host requirement; the gateway owns the upstream Host anyway.
    with Conn(gateway.port) as conn:
        conn.send(b"GET /echo HTTP/1.0\r\n\r\n")
        assert conn.read_response().status == 200
    hosts = [v for k, v in upstream_headers(upstream) if k == "host"]
    assert hosts == [upstream_url.removeprefix("http://")]
    assert "x-forwarded-host" not in dict(upstream_headers(upstream))


def test_duplicate_host_is_400(gateway, upstream):
    # RFC 9112 3.2: more than one Host is a 400; otherwise which one is forwarded as
    # X-Forwarded-Host (used by apps to build links) depends on who reads first or last.
    before = upstream.request_count
    payload = b"GET /echo HTTP/1.1\r\nHost: good.example\r\nHost: evil.example\r\n\r\n"
    refused(gateway.port, payload, 400, closes=False)
    assert upstream.request_count == before


# -- 9. spoofing --------------------------------------------------------------------------


def test_client_identity_and_forwarding_headers_are_replaced(gateway, upstream):
    with Conn(gateway.port) as conn:
        conn.send(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\n"
                  b"x-forwarded-for: 7.7.7.7\r\nX-Apishield-Subject: admin\r\n"
                  b"X-APISHIELD-ROLES: root\r\nX-Request-Id: attacker-id\r\n"
                  b"Forwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n"
                  b"Connection: X-Forwarded-For, X-Request-Id\r\n\r\n")
        response = conn.read_response()
    assert response.status == 200
    sent = upstream_headers(upstream)
    names = [k for k, _ in sent]
    assert [v for k, v in sent if k == "x-forwarded-for"] == ["127.0.0.1"]
    assert [v for k, v in sent if k == "x-request-id"] == [response.header("x-request-id")]
    assert response.header("x-request-id") != "attacker-id"
    assert not any(k.startswith("x-apishield-") for k in names), names
    assert "forwarded" not in names and "x-real-ip" not in names
    assert "6.6.6.6" not in json.dumps(sent) and "admin" not in json.dumps(sent)


def test_underscore_variants_of_owned_headers_do_not_reach_upstream(gateway, upstream):
    # CGI/WSGI map `X_Apishield_Subject` and `X-Apishield-Subject` to the same
    # HTTP_X_APISHIELD_SUBJECT: the underscore form must not slip past the dash-only filter.
    with Conn(gateway.port) as conn:
        conn.send(b"GET /echo HTTP/1.1\r\nHost: x\r\nX_Apishield_Subject: admin\r\n"
                  b"X_Forwarded_For: 6.6.6.6\r\nX_Request_Id: attacker-id\r\n\r\n")
        response = conn.read_response()
    if response.status != 200:  # refusing the request is as safe as dropping the fields
        assert_problem(response, 400)
        return
    normalized = [k.replace("_", "-") for k, _ in upstream_headers(upstream)]
    assert "x-apishield-subject" not in normalized, normalized
    assert normalized.count("x-forwarded-for") == 1 and normalized.count("x-request-id") == 1


# -- 10. Expect: 100-continue -------------------------------------------------------------


def test_expect_continue_allowed_post(gateway, upstream):
    with Conn(gateway.port) as conn:
        conn.send(post(b"/echo", b"Content-Length: 7\r\nExpect: 100-continue\r\n"))
        interim = conn.read_response()
        assert interim.status == 100
        conn.send(b'{"a":1}')
        final = conn.read_response()
        assert final.status == 200
    assert upstream.last_request["body"] == '{"a":1}'
    assert "expect" not in dict(upstream_headers(upstream))


def test_expect_continue_too_large_is_413_without_continue(gateway, upstream):
    before = upstream.request_count
    response = refused(gateway.port,
                       post(b"/echo", b"Content-Length: 2000000\r\nExpect: 100-continue\r\n"), 413)
    assert b"100 Continue" not in response.head
    assert upstream.request_count == before


def test_expect_continue_refused_route_answers_without_waiting_for_body(gateway, upstream):
    # A client that sent `Expect: 100-continue` waits for a status before sending the body;
    # a request already refused at the head must get its final status now (RFC 9110 10.1.1).
    before = upstream.request_count
    with Conn(gateway.port, timeout=2) as conn:
        conn.send(post(b"/admin", b"Content-Length: 2\r\nExpect: 100-continue\r\n"))
        assert_problem(conn.read_response(), 404)
    assert upstream.request_count == before


def test_a_body_trickling_below_the_minimum_rate_is_cut_before_the_body_timeout(
        make_gateway, upstream):
    gw = make_gateway({"timeouts": {"body": "20s", "min_body_rate": "1KiB",
                                    "body_rate_grace": "1s"}})
    head = (b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 5000\r\n\r\n")
    before = upstream.request_count
    start = time.monotonic()
    with Conn(gw.port, timeout=6) as conn:
        conn.send(head)
        conn.sock.settimeout(0.25)
        for _ in range(40):  # 50 bytes every 0.25 s: 200 B/s, under the 1 KiB/s floor
            try:
                if conn.sock.recv(1, socket.MSG_PEEK):
                    break
            except TimeoutError:
                pass
            try:
                conn.send(b"x" * 50)
            except (BrokenPipeError, ConnectionResetError):
                break
        conn.sock.settimeout(conn.timeout)
        assert_problem(conn.read_response(), 408)
        assert conn.is_closed()
    assert time.monotonic() - start < 4.0  # long before the 20 s body timeout
    assert upstream.request_count == before
    # a body that keeps the pace passes, however long it takes within `timeouts.body`
    with Conn(gw.port, timeout=6) as conn:
        conn.send(head)
        for _ in range(5):
            time.sleep(0.3)
            conn.send(b"y" * 1000)  # ~3.3 KB/s
        assert conn.read_response().status == 200
    assert upstream.request_count == before + 1
