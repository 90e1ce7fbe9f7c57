"""Request smuggling against the real gateway, judged on the far side.

`tests/test_security_regressions.py` checks the gateway's answers to ambiguous framing
(status, masking, close) and that the test upstream's request counter did not move. Here
the upstream is `RecordingUpstream`, which keeps the raw bytes of every request and parses
them strictly, and every vector is judged by one invariant on what arrived there:

  the upstream never sees a request the gateway did not route and check. Every recorded
  request (a) has a path the vector meant to send legitimately, (b) carries exactly one
  X-Request-Id, the gateway's, equal to the one on a 2xx answer the client received, and
  (c) is well framed: a clean CRLF head, no Transfer-Encoding, a body exactly as long as
  its single Content-Length. And the upstream received exactly as many requests as the
  client got 2xx answers (each 2xx body names the request id it was answered for, so a
  response crossing to the wrong request shows up too).

Besides the invariant, most vectors pin the answer: 400 and close for what is refused
(see `_smuggle_cases`), 2xx for the legal spellings (so refusing everything does not pass).
A request pipelined behind a framing refusal must not arrive either. The generated
mutations at the end apply random edits to valid requests (fixed seed, 300 mutants) and
check the same invariant, and that the gateway still answers a normal request afterwards.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from tests.conftest import RunningGateway, start_gateway
from tests.reliability.recording_upstream import RecordedRequest, RecordingUpstream

# Short timeouts: every connection the gateway keeps open ends within ~1 s by itself,
# so a test can read until the close instead of guessing how many answers will come.
OVERRIDES = {"timeouts": {"header": "1s", "body": "1s", "keepalive": "400ms"}}
REQUEST_ID = re.compile(r"[0-9a-f]{32}")
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*")
LEGIT = frozenset({"/echo"})
SMUGGLED = b"GET /echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
NEXT = b"GET /echo/next HTTP/1.1\r\nHost: x\r\n\r\n"
AFTER = b"GET /echo/after HTTP/1.1\r\nHost: x\r\n\r\n"


# -- client side ---------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    to_head: bool = False  # the answer to a HEAD: no body to check

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        return values[0] if values else None


@dataclass
class Exchange:
    raw: bytes  # everything the gateway sent back
    closed: bool  # the gateway closed (FIN or RST) before our deadline
    answers: list[Answer] = field(default_factory=list)
    leftover: bytes = b""  # bytes after the last parseable answer

    @property
    def statuses(self) -> list[int]:
        return [a.status for a in self.answers]


def parse_answers(raw: bytes, methods: tuple[str, ...] = ()) -> tuple[list[Answer], bytes]:
    """Split what the gateway sent into responses (Content-Length, chunked or to-close);
    `methods[i]` is the method of the i-th request (a HEAD answer has no body)."""
    answers: list[Answer] = []
    final = 0
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        match = STATUS_LINE.fullmatch(lines[0])
        if not sep or match is None:
            break
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower().decode("latin-1"),
                            value.strip().decode("latin-1")))
        answer = Answer(int(match.group(1)), headers, b"")
        head_request = final < len(methods) and methods[final] == "HEAD"
        if answer.status >= 200:
            final += 1
        if answer.status < 200 or answer.status in (204, 304) or head_request:
            answer.to_head = head_request
            answers.append(answer)
            raw = rest
            continue
        if (answer.header("transfer-encoding") or "").lower() == "chunked":
            body, done = b"", False
            while True:
                size_line, sep, after = rest.partition(b"\r\n")
                try:
                    size = int(size_line.split(b";")[0], 16)
                except ValueError:
                    break
                if not sep:
                    break
                if size == 0:
                    trailer_end = after.find(b"\r\n")
                    if trailer_end != 0:
                        break
                    rest, done = after[2:], True
                    break
                body += after[:size]
                rest = after[size + 2:]
            if not done:
                break
            answer.body = body
        elif answer.header("content-length") is not None:
            n = int(answer.header("content-length") or 0)
            if len(rest) < n:
                break
            answer.body, rest = rest[:n], rest[n:]
        else:  # delimited by the close
            answer.body, rest = rest, b""
        answers.append(answer)
        raw = rest
    return answers, raw


def exchange(port: int, payload: bytes, deadline: float = 4.0,
             methods: tuple[str, ...] = ()) -> Exchange:
    """Send `payload` on a fresh connection and read until the gateway closes it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=deadline)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    chunks: list[bytes] = []
    closed = False
    end = time.monotonic() + deadline
    try:
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before all of it was read: what came back still counts
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            except TimeoutError:
                break
            if not data:
                closed = True
                break
            chunks.append(data)
    finally:
        sock.close()
    raw = b"".join(chunks)
    answers, leftover = parse_answers(raw, methods)
    return Exchange(raw, closed, answers, leftover)


# -- the invariant --------------------------------------------------------------------------


def invariant_violations(recorded: list[RecordedRequest], answers: list[Answer],
                         allowed: frozenset[str]) -> list[str]:
    """Everything that breaks the invariant of the module docstring (empty: it holds)."""
    errors: list[str] = []
    ok = [a for a in answers if 200 <= a.status < 300]
    answered_ids = Counter()
    for answer in ok:
        request_id = answer.header("x-request-id")
        answered_ids[request_id] += 1
        if answer.to_head:
            continue
        try:
            echo = json.loads(answer.body)
        except ValueError:
            errors.append(f"a 2xx body that is not the upstream's echo: {answer.body[:200]!r}")
            continue
        if echo.get("request_id") != request_id:
            errors.append(f"a 2xx for request {request_id} carries the upstream's answer to "
                          f"{echo.get('request_id')} (response desync)")
        if echo.get("path") not in allowed:
            errors.append(f"a 2xx answered for path {echo.get('path')!r}")
    for request in recorded:
        where = f"upstream request {request.raw[:300]!r}"
        errors.extend(f"{where}: {problem}" for problem in request.problems)
        if request.path not in allowed:
            errors.append(f"{where}: path {request.path!r} was never sent legitimately")
        ids = request.values("x-request-id")
        if len(ids) != 1 or not REQUEST_ID.fullmatch(ids[0]):
            errors.append(f"{where}: X-Request-Id {ids} is not one gateway-made id")
        elif answered_ids[ids[0]] < 1:
            errors.append(f"{where}: no 2xx reached the client for request id {ids[0]}")
        else:
            answered_ids[ids[0]] -= 1
        lengths = request.values("content-length")
        if request.values("transfer-encoding") or len(lengths) > 1:
            errors.append(f"{where}: not framed by one Content-Length")
        elif (int(lengths[0]) if lengths else 0) != len(request.body):
            errors.append(f"{where}: body of {len(request.body)} bytes, Content-Length {lengths}")
    if len(recorded) != len(ok):
        errors.append(f"the upstream received {len(recorded)} requests, the client got "
                      f"{len(ok)} 2xx answers")
    return errors


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorder() -> Iterator[RecordingUpstream]:
    server = RecordingUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory,
       recorder: RecordingUpstream) -> Iterator[RunningGateway]:
    running = start_gateway(tmp_path_factory.mktemp("smuggling"), recorder.url, OVERRIDES)
    yield running
    running.stop()


def run_vector(gw: RunningGateway, recorder: RecordingUpstream, payload: bytes,
               allowed: frozenset[str] = LEGIT, methods: tuple[str, ...] = ()
               ) -> tuple[Exchange, list[RecordedRequest]]:
    """Send one vector and assert the invariant; returns what both sides saw."""
    mark = recorder.count
    result = exchange(gw.port, payload, methods=methods)
    time.sleep(0.05)  # a request forwarded but never answered is recorded a moment later
    recorded = recorder.since(mark)
    errors = invariant_violations(recorded, result.answers, allowed)
    assert not errors, "\n".join([*errors, f"gateway answered: {result.raw[:600]!r}"])
    assert gw.process.poll() is None, "the gateway died"
    return result, recorded


def assert_refused_and_closed(result: Exchange, recorded: list[RecordedRequest],
                              status: int = 400) -> None:
    assert result.statuses[:1] == [status], result.raw[:600]
    assert result.answers[0].header("connection") == "close", result.raw[:600]
    assert result.closed and not result.leftover, result.raw[:600]
    assert not recorded


# -- vectors --------------------------------------------------------------------------------


def put(framing: bytes, body: bytes, *, target: bytes = b"/echo",
        version: bytes = b"HTTP/1.1", host: bytes = b"Host: x\r\n") -> bytes:
    """A PUT to /echo (any body is declared there, so a body that gets through is
    forwarded rather than refused by validation: the framing alone decides)."""
    return (b"PUT " + target + b" " + version + b"\r\n" + host
            + b"Content-Type: application/octet-stream\r\n" + framing + b"\r\n" + body)


def cl_te(te_line: bytes) -> bytes:
    """CL.TE: Content-Length covers the smuggled request, the (obfuscated) TE ends the body
    before it. A hop that honours the TE forwards GET /echo/smuggled as a second request."""
    body = b"0\r\n\r\n" + SMUGGLED
    return put(b"Content-Length: %d\r\n" % len(body) + te_line, body)


def te_only(te_line: bytes) -> bytes:
    """TE alone: the chunk data is a request, and a valid one is pipelined behind. Honoured,
    the chunk is body bytes (forwarded with a Content-Length); ignored, the chunk-size line
    is the next request line (garbage: 400); forwarded as is, the recorder sees the TE."""
    return put(te_line, b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n") + NEXT


def chunked(body: bytes, *, te: bytes = b"Transfer-Encoding: chunked\r\n") -> bytes:
    return put(te, body)


# name -> (Transfer-Encoding line(s), legal on its own). Legal spellings are plain
# `chunked` (field names and codings are case-insensitive, OWS around values is not part
# of them); with a Content-Length beside them any of them is refused.
TE_SPELLINGS = {
    "xchunked": (b"Transfer-Encoding: xchunked\r\n", False),
    "space-in-value": (b"Transfer-Encoding:  chunked\r\n", True),
    "space-before-name": (b" Transfer-Encoding: chunked\r\n", False),
    "chunked-identity": (b"Transfer-Encoding: chunked, identity\r\n", False),
    "tab-after-colon": (b"Transfer-Encoding:\tchunked\r\n", True),
    "space-before-colon": (b"Transfer-Encoding : chunked\r\n", False),
    "upper-case": (b"TRANSFER-ENCODING: CHUNKED\r\n", True),
    "two-headers": (b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n", False),
    "obs-fold-value": (b"Transfer-Encoding:\r\n chunked\r\n", False),
    "obs-fold-line": (b"X-Folded: a\r\n Transfer-Encoding: chunked\r\n", False),
    "NUL-in-name": (b"Transfer-Encoding\x00: chunked\r\n", False),
    "vertical-tab": (b"Transfer-Encoding:\x0bchunked\r\n", False),
    "quoted": (b'Transfer-Encoding: "chunked"\r\n', False),
}
REFUSED, PASSED, EITHER = "refused", "passed", "either"


def _smuggle_cases() -> Iterator[object]:
    """Each case: payload, the paths that may legitimately reach the upstream, and what
    the client must get besides the invariant:

    - REFUSED: `400`, `Connection: close`, closed, nothing forwarded. Where the RFCs require
      it, and where they allow it and the gateway's policy is to refuse (CL and TE together,
      two Content-Lengths, obs-fold, bare LF: as in test_security_regressions.py);
    - PASSED: a legal request: every answer 2xx (a gateway refusing everything would
      otherwise keep the invariant trivially);
    - EITHER: the RFCs allow both; only the invariant is checked.
    """
    def case(id_: str, payload: bytes, expect: str, allowed: frozenset[str] = LEGIT,
             methods: tuple[str, ...] = ()) -> object:
        return pytest.param(payload, allowed, expect, methods, id=id_)

    with_next = LEGIT | {"/echo/next"}
    # CL.TE and TE.CL in their classic forms
    yield case("CL.TE", cl_te(b"Transfer-Encoding: chunked\r\n"), REFUSED)
    inner = b"GET /echo/smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nx="
    yield case("TE.CL", put(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
                            b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n"), REFUSED)
    # TE.TE: every spelling, with a Content-Length beside it and alone
    for name, (line, legal) in TE_SPELLINGS.items():
        yield case(f"TE.TE-{name}-with-CL", cl_te(line), REFUSED)
        yield case(f"TE.TE-{name}-alone", te_only(line), PASSED if legal else REFUSED,
                   with_next)
    # Content-Length: duplicates and lists (RFC 9110 8.6 allows accepting equal values;
    # the gateway refuses any repetition), then every malformed number
    yield case("CL-duplicate-equal",
               put(b"Content-Length: 2\r\nContent-Length: 2\r\n", b"{}") + NEXT, REFUSED,
               with_next)
    yield case("CL-duplicate-differ",
               put(b"Content-Length: 2\r\nContent-Length: 43\r\n", b"{}" + SMUGGLED), REFUSED)
    yield case("CL-list-equal", put(b"Content-Length: 2, 2\r\n", b"{}") + NEXT, REFUSED,
               with_next)
    yield case("CL-list-differ", put(b"Content-Length: 2, 43\r\n", b"{}" + SMUGGLED), REFUSED)
    for id_, value in [("plus", b"+5"), ("minus", b"-1"), ("hex", b"0x5"),
                       ("float", b"5.0"), ("exponent", b"5e0"), ("underscore", b"0_5"),
                       ("trailing-garbage", b"5x"), ("two-numbers", b"5 5"),
                       ("overflow", b"18446744073709551621"), ("empty", b""),
                       ("comma-only", b","), ("unicode-digit", "\u0665".encode()),
                       ("vertical-tab", b"\x0b5")]:
        yield case(f"CL-{id_}", put(b"Content-Length: " + value + b"\r\n", b"{}xyz") + SMUGGLED,
                   REFUSED)
    # legal spellings (OWS, leading zeros): the body is 5 bytes, then a pipelined request
    for id_, value, expect in [("leading-space", b" 5", PASSED),
                               ("leading-zeros", b"0005", PASSED),
                               ("trailing-space", b"5 ", EITHER), ("tabs", b"\t5\t", EITHER)]:
        yield case(f"CL-{id_}", put(b"Content-Length:" + value + b"\r\n", b"{}xyz") + NEXT,
                   expect, with_next)
    yield case("CL-space-before-colon", put(b"Content-Length : 5\r\n", b"{}xyz") + SMUGGLED,
               REFUSED)
    yield case("CL-obs-fold", put(b"Content-Length:\r\n 5\r\n", b"{}xyz") + SMUGGLED, REFUSED)
    yield case("CL-zero-with-TE", put(b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
                                      b"0\r\n\r\n" + SMUGGLED), REFUSED)
    # a body on a method/operation without one: it must be read (or refused), never
    # taken for the next request
    for method, ctype in [(b"GET", b""), (b"GET", b"Content-Type: application/json\r\n"),
                          (b"HEAD", b""), (b"DELETE", b"Content-Type: text/plain\r\n")]:
        yield case(f"body-on-{method.decode()}{'-typed' if ctype else ''}",
                   method + b" /echo HTTP/1.1\r\nHost: x\r\n" + ctype
                   + b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED, EITHER,
                   methods=(method.decode(),))
    yield case("chunked-body-on-GET",
               b"GET /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n", EITHER)
    # line ends (RFC 9112 2.2 allows accepting a bare LF; the gateway refuses it)
    yield case("bare-LF-everywhere",
               b"PUT /echo HTTP/1.1\nHost: x\nContent-Length: 2\n\n{}" + SMUGGLED, REFUSED)
    body = b"0\r\n\r\n" + SMUGGLED
    yield case("bare-LF-hides-TE",
               put(b"Content-Length: %d\r\nX-A: a\nTransfer-Encoding: chunked\r\n" % len(body),
                   body), REFUSED)
    yield case("bare-LF-request-line", b"PUT /echo HTTP/1.1\nHost: x\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body) + body, REFUSED)
    yield case("bare-LF-end-of-head", b"PUT /echo HTTP/1.1\r\nHost: x\r\n"
               b"Content-Length: %d\r\n\n" % len(body) + body, REFUSED)
    yield case("bare-CR-hides-TE",
               put(b"Content-Length: %d\r\nX-A: a\rTransfer-Encoding: chunked\r\n" % len(body),
                   body), REFUSED)
    yield case("bare-CR-line-ends",
               b"PUT /echo HTTP/1.1\rHost: x\rContent-Length: 2\r\r{}" + SMUGGLED, REFUSED)
    yield case("CR-CR-LF", put(b"X-A: a\r\r\nContent-Length: 2\r\n", b"{}") + SMUGGLED, REFUSED)
    # obs-fold (RFC 9112 5.2: reject, or replace by SP; the gateway rejects)
    yield case("obs-fold-plain", b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tb\r\n\r\n",
               REFUSED)
    # NUL and other CTLs, in names, values and the target
    for id_, line in [("NUL-in-value", b"X-A: a\x00b\r\n"), ("NUL-in-name", b"X\x00A: 1\r\n"),
                      ("SOH-in-value", b"X-A: a\x01b\r\n"), ("ESC-in-value", b"X-A: \x1b[0m\r\n"),
                      ("DEL-in-value", b"X-A: a\x7fb\r\n"), ("DEL-in-name", b"X-A\x7f: 1\r\n"),
                      ("FF-in-value", b"X-A: a\x0cb\r\n"), ("8bit-in-name", b"X-\xe9: 1\r\n"),
                      ("empty-name", b": 1\r\n")]:
        yield case(id_, b"GET /echo HTTP/1.1\r\nHost: x\r\n" + line + b"\r\n" + SMUGGLED,
                   REFUSED)
    for id_, target in [("NUL-in-target", b"/echo\x00/smuggled"),
                        ("SOH-in-target", b"/echo\x01"), ("DEL-in-target", b"/echo\x7f"),
                        ("TAB-in-target", b"/echo\t/smuggled"),
                        ("CR-in-target", b"/echo\r/smuggled"),
                        ("LF-in-target", b"/echo\n/smuggled"),
                        ("8bit-in-target", b"/echo/\xff")]:
        yield case(id_, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n", REFUSED)
    # request line: target forms, methods, versions, separators
    yield case("absolute-form-unknown-path", b"GET http://evil/ HTTP/1.1\r\nHost: x\r\n\r\n",
               EITHER)
    yield case("absolute-form-echo", b"GET http://evil/echo HTTP/1.1\r\nHost: x\r\n\r\n", EITHER)
    yield case("absolute-form-userinfo",
               b"GET http://a@evil/echo HTTP/1.1\r\nHost: x\r\n\r\n", EITHER)
    yield case("absolute-form-other-scheme",
               b"GET gopher://evil/echo HTTP/1.1\r\nHost: x\r\n\r\n", EITHER)
    yield case("asterisk-OPTIONS", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED, EITHER)
    yield case("asterisk-GET", b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", EITHER)
    yield case("CONNECT-then-bytes",
               b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n" + SMUGGLED,
               REFUSED)
    yield case("authority-form-GET", b"GET 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\n", EITHER)
    yield case("double-space-in-line", b"GET  /echo HTTP/1.1\r\nHost: x\r\n\r\n", EITHER)
    yield case("trailing-space-in-line", b"GET /echo HTTP/1.1 \r\nHost: x\r\n\r\n", EITHER)
    yield case("lowercase-method", b"get /echo HTTP/1.1\r\nHost: x\r\n\r\n", EITHER)
    # chunk extensions, trailers and chunk sizes
    yield case("chunk-ext-legit", chunked(b"2;name=value\r\n{}\r\n0\r\n\r\n"), PASSED)
    yield case("chunk-ext-quoted-CRLF-request",
               chunked(b'2;x="\r\n' + SMUGGLED + b'"\r\n{}\r\n0\r\n\r\n'), REFUSED)
    yield case("chunk-ext-bare-LF", chunked(b"2;x\n{}\r\n0\r\n\r\n" + SMUGGLED), REFUSED)
    yield case("chunk-ext-bare-CR", chunked(b"2;x\rGET\r\n{}\r\n0\r\n\r\n"), REFUSED)
    yield case("chunk-ext-NUL", chunked(b"2;x\x00" + SMUGGLED + b"\r\n{}\r\n0\r\n\r\n"), REFUSED)
    yield case("chunk-ext-long", chunked(b"2;" + b"a" * 20000 + b"\r\n{}\r\n0\r\n\r\n"), EITHER)
    yield case("trailer-holds-request", chunked(b"0\r\n" + SMUGGLED), EITHER)
    yield case("trailer-framing-fields",
               chunked(b"0\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n"), EITHER)
    yield case("trailer-bare-LF", chunked(b"0\r\nX-T: 1\n\r\n" + SMUGGLED), REFUSED)
    yield case("trailer-obs-fold",
               chunked(b"0\r\nX-T: 1\r\n Transfer-Encoding: chunked\r\n\r\n"), EITHER)
    for id_, size in [("overflow", b"ffffffffffffffffff"),
                      ("overflow-64bit", b"10000000000000002"), ("0x-prefix", b"0x2"),
                      ("negative", b"-2"), ("space-before", b" 2"), ("tab-before", b"\t2"),
                      ("plus", b"+2"), ("empty", b""), ("underscore", b"0_2")]:
        yield case(f"chunk-size-{id_}", chunked(size + b"\r\n{}\r\n0\r\n\r\n" + SMUGGLED),
                   REFUSED)
    yield case("chunk-size-leading-zeros", chunked(b"0002\r\n{}\r\n0\r\n\r\n"), PASSED)
    yield case("chunk-size-upper-hex", chunked(b"0A\r\n{}12345678\r\n0\r\n\r\n"), PASSED)
    yield case("chunk-size-space-after", chunked(b"2 \r\n{}\r\n0\r\n\r\n"), EITHER)
    yield case("chunk-data-longer-than-size", chunked(b"2\r\n{}xx\r\n0\r\n\r\n" + SMUGGLED),
               REFUSED)
    yield case("chunk-missing-last", chunked(b"2\r\n{}\r\n" + SMUGGLED), REFUSED)
    # other protocols and versions on the HTTP/1.1 port
    yield case("HTTP/0.9", b"GET /echo\r\n\r\n" + SMUGGLED, REFUSED)
    yield case("HTTP/2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
               b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + SMUGGLED, REFUSED)
    yield case("HTTP/1.2", b"GET /echo HTTP/1.2\r\nHost: x\r\n\r\n", EITHER)
    yield case("HTTP/2.0-line", b"GET /echo HTTP/2.0\r\nHost: x\r\n\r\n", REFUSED)
    yield case("HTTP/1.0-keep-alive-pipelined",
               b"GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + NEXT, PASSED, with_next)


@pytest.mark.parametrize("payload, allowed, expect, methods", list(_smuggle_cases()))
def test_smuggling_vector_never_reaches_upstream(gw, recorder, payload, allowed, expect,
                                                 methods):
    result, recorded = run_vector(gw, recorder, payload, allowed, methods)
    if expect == REFUSED:
        assert_refused_and_closed(result, recorded)
    elif expect == PASSED:
        assert result.answers and all(200 <= s < 300 for s in result.statuses), \
            result.raw[:600]


# -- pipelining after a refusal -------------------------------------------------------------

REFUSALS = {
    "CL-and-TE": put(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                     b"0\r\n\r\n"),
    "two-CL-differ": put(b"Content-Length: 2\r\nContent-Length: 3\r\n", b"{}x"),
    "space-before-colon": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A : 1\r\n\r\n",
    "bad-chunk-size": chunked(b"zz\r\n{}\r\n0\r\n\r\n"),
    "NUL-in-value": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "bad-request-line": b"GET /echo HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    "bare-CR": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
    "invalid-CL": put(b"Content-Length: +2\r\n", b"{}"),
    "CONNECT": b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
    "upgrade-h2c": b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                   b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
}


@pytest.mark.parametrize("refusal", list(REFUSALS.values()), ids=list(REFUSALS))
@pytest.mark.parametrize("split", [False, True], ids=["one-packet", "after-answer"])
def test_request_after_a_framing_refusal_never_reaches_upstream(gw, recorder, refusal, split):
    """The gateway closes after a framing refusal: a valid request behind it is dropped,
    whether it came in the same packet or after the refusal was answered."""
    mark = recorder.count
    if not split:
        result = exchange(gw.port, refusal + AFTER)
    else:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=3) as sock:
            sock.sendall(refusal)
            rest = [sock.recv(65536)]  # the refusal (or the start of it)
            time.sleep(0.05)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
                sock.sendall(AFTER)
                while data := sock.recv(65536):
                    rest.append(data)
        answers, leftover = parse_answers(b"".join(rest))
        result = Exchange(b"".join(rest), True, answers, leftover)
    time.sleep(0.05)
    recorded = recorder.since(mark)
    errors = invariant_violations(recorded, result.answers, frozenset())
    assert not errors, "\n".join([*errors, repr(result.raw[:600])])
    assert len(result.answers) == 1 and 400 <= result.statuses[0] < 500, result.raw[:600]
    assert result.answers[0].header("connection") == "close", result.raw[:600]


# -- should-fix items of issue 11 (being fixed elsewhere) ----------------------------------


def test_chunked_on_http10_is_400_and_close(gw, recorder):
    """RFC 9112 6.1: Transfer-Encoding on an HTTP/1.0 request means the framing is faulty."""
    payload = put(b"Transfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n",
                  version=b"HTTP/1.0") + SMUGGLED
    result, recorded = run_vector(gw, recorder, payload)
    assert_refused_and_closed(result, recorded)


@pytest.mark.parametrize("host", [b"a, b", b"a/b?c", b"a b", b"a@b", b"a:b:c", b"[::1",
                                  b"a:99999x"])
def test_host_that_is_not_uri_host_and_port_is_400(gw, recorder, host):
    """RFC 9110 7.2 / RFC 9112 3.2: Host is `uri-host [":" port]`; anything else is 400."""
    mark = recorder.count
    result = exchange(gw.port, b"GET /echo HTTP/1.1\r\nHost: " + host + b"\r\n"
                      b"Connection: close\r\n\r\n")
    time.sleep(0.05)
    recorded = recorder.since(mark)
    assert not invariant_violations(recorded, result.answers, LEGIT)
    assert result.statuses == [400], result.raw[:600]
    assert not recorded


# -- generated mutations --------------------------------------------------------------------

MUTATION_SEED = 20240611
MUTATIONS = 300
BASES = [
    b"GET /echo HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
    b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Length: 7\r\n\r\n{\"a\":1}",
    b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 7\r\n\r\n{\"a\":1}",
]
INSERTS = [b"\r", b"\n", b"\r\n", b" ", b"\t", b"\x00", b":", b",", b"0", b"\x0b"]
FRAMING_LINES = [b"Transfer-Encoding: chunked", b"Content-Length: 0", b"Content-Length: 7",
                 b"Transfer-Encoding: identity", b"Content-Length: 40"]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to three edits: insert a separator or control byte, duplicate a header line,
    add a framing header line, change a character's case, or delete a byte."""
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(("insert", "insert", "insert", "duplicate", "framing", "case",
                           "delete"))
        pos = rng.randrange(len(data))
        if kind == "insert":
            data = data[:pos] + rng.choice(INSERTS) + data[pos:]
        elif kind == "duplicate":
            lines = data.split(b"\r\n")
            head_lines = data.partition(b"\r\n\r\n")[0].count(b"\r\n")
            if head_lines:
                i = rng.randint(1, head_lines)
                lines.insert(i, lines[i])
                data = b"\r\n".join(lines)
        elif kind == "framing":
            head_lines = data.partition(b"\r\n\r\n")[0].count(b"\r\n")
            lines = data.split(b"\r\n")
            lines.insert(rng.randint(1, head_lines + 1), rng.choice(FRAMING_LINES))
            data = b"\r\n".join(lines)
        elif kind == "case":
            data = data[:pos] + data[pos:pos + 1].swapcase() + data[pos + 1:]
        else:
            data = data[:pos] + data[pos + 1:]
    return data


def test_the_invariant_catches_a_desync_when_nothing_is_in_between(recorder):
    """The check is not vacuous: CL.TE sent straight to the recorder (no gateway) shows
    the Transfer-Encoding, the unknown path, the missing request ids and the count."""
    mark = recorder.count
    result = exchange(recorder.port, cl_te(b"Transfer-Encoding: chunked\r\n"), deadline=1.0)
    time.sleep(0.05)
    errors = "\n".join(invariant_violations(recorder.since(mark), result.answers, LEGIT))
    assert "Transfer-Encoding forwarded" in errors
    assert "X-Request-Id [] is not one gateway-made id" in errors
    assert "bytes left unread" in errors  # the smuggled request, behind the TE body
    mark = recorder.count
    result = exchange(recorder.port, put(b"Content-Length: 2\r\n", b"{}") + SMUGGLED,
                      deadline=0.5)
    time.sleep(0.05)
    errors = "\n".join(invariant_violations(recorder.since(mark), result.answers, LEGIT))
    assert "path '/echo/smuggled' was never sent legitimately" in errors


def test_generated_mutations_keep_the_invariant(gw, recorder):
    rng = random.Random(MUTATION_SEED)
    payloads = []
    for i in range(MUTATIONS):
        base = BASES[i % len(BASES)]
        # a valid request pipelined behind the mutant: it may pass only if the mutant was
        # framed as a complete request and the connection stayed usable
        payloads.append(mutate(rng, base) + b"GET /echo/next HTTP/1.1\r\nHost: x\r\n\r\n")
    mark = recorder.count
    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(lambda p: exchange(gw.port, p), payloads))
    time.sleep(0.1)
    recorded = recorder.since(mark)
    answers = [a for r in results for a in r.answers]
    errors = invariant_violations(recorded, answers, LEGIT | {"/echo/next"})
    if errors:  # find the mutant(s) behind it, one connection at a time
        culprits = []
        for payload in payloads:
            mark = recorder.count
            single = exchange(gw.port, payload)
            time.sleep(0.05)
            if invariant_violations(recorder.since(mark), single.answers,
                                    LEGIT | {"/echo/next"}):
                culprits.append(payload)
        pytest.fail("\n".join([*errors[:20], "mutants:", *map(repr, culprits[:10])]))
    statuses = Counter(a.status for a in answers)
    assert statuses[200] > 0 and sum(v for k, v in statuses.items() if k >= 400) > 0, statuses
    assert all(s < 500 for s in statuses), statuses
    assert gw.process.poll() is None
    final = exchange(gw.port, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert final.statuses == [200], final.raw[:600]
