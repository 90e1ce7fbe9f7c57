"""Per-request state shared by the pipeline and both front ends.

A plain class with `__slots__`: one is built per request on the hot path, so it costs
attribute stores, not validation. Header names are lower-case bytes everywhere (HTTP field
names are case-insensitive, RFC 9110 5.1); values are the raw bytes as received.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from apishield.auth.principal import Principal
    from apishield.contract.loader import Operation
    from apishield.contract.router import PathEntry
    from apishield.problems import Problem
    from apishield.state.counters import Decision

Headers = list[tuple[bytes, bytes]]


_ID_BYTES = 16
_POOL_BYTES = _ID_BYTES * 256
_pool = b""
_offset = _POOL_BYTES


def media_type(value: bytes | str) -> str:
    """`type/subtype` of a Content-Type value or a contract `content` key: lower case,
    parameters (`; charset=...`) removed (RFC 9110 8.3.1)."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return text.split(";", 1)[0].strip().lower()


@lru_cache(maxsize=256)
def connection_tokens(value: bytes) -> frozenset[bytes]:
    """The field names a `Connection` header value lists (lower case); memoized, since
    nearly every upstream response says `Connection: keep-alive`."""
    return frozenset(token.strip().lower() for token in value.split(b",") if token.strip())


TOO_LONG = 10**18  # a length of more significant digits than this is over every limit


def content_length(value: bytes) -> int | None:
    """A Content-Length value as a number, None when it is not 1*DIGIT (RFC 9110 8.6).

    The grammar allows leading zeros and llhttp accepts any number of them, while int()
    refuses more than 4,300 digits (a 500 before issue 11): zeros are dropped first, and a
    value of more than 18 significant digits is TOO_LONG, over any limit, never converted."""
    if not value.isdigit():  # bytes.isdigit: ASCII digits only
        return None
    digits = value.lstrip(b"0")
    if len(digits) > 18:
        return TOO_LONG
    return int(digits) if digits else 0


def new_request_id() -> str:
    """128 bits from the OS CSPRNG (checklist C5): unguessable, so safe to show clients.

    The bytes come from `os.urandom` 4 KiB at a time: one `getrandom` syscall per request
    was 6% of the gateway's time under load (bench/RESULTS.md), and slicing a CSPRNG
    buffer keeps every id as unpredictable as a fresh call would be.
    """
    global _pool, _offset
    if _offset >= _POOL_BYTES:
        _pool = os.urandom(_POOL_BYTES)
        _offset = 0
    start = _offset
    _offset = start + _ID_BYTES
    return _pool[start:_offset].hex()


def _discard_pool() -> None:
    global _offset
    _offset = _POOL_BYTES  # a forked worker must never reuse its parent's bytes


os.register_at_fork(after_in_child=_discard_pool)


class Exchange:
    """One request's journey: the request as received and what the steps decided about it.
    Each decided field is written by exactly one step (see pipeline).

    One object per request, not a `Request` inside an `Exchange` inside the connection's
    message: three objects cost three allocations, three `__init__` calls and ~45 attribute
    stores a request (issue 18's profile). The gateway's connection adds its per-request
    state in a subclass (http/server.py `Message`), the middleware uses this class as is.
    """

    __slots__ = (
        "body",
        "body_limit",
        "bytes_in",
        "bytes_out",
        "chunked",
        "client_identity",
        "client_ip",
        "connection_tokens",
        "content_type",
        "content_type_repeated",
        "declared_length",
        "delegated",
        "entry",
        "forwarded_for",
        "headers",
        "held",
        "http_version",
        "id",
        "method",
        "operation",
        "path",
        "path_params",
        "peer_ip",
        "principal",
        "problem",
        "query",
        "rate_limit",
        "raw_path",
        "reason",
        "resumes",
        "scheme",
        "shadowed",
        "started",
        "suspended",
        "trusted_peer",
        "waited_for",
    )

    def __init__(
        self,
        method: str,
        raw_path: bytes,
        query: bytes,
        headers: Headers,
        peer_ip: str,
        scheme: str = "http",
        http_version: str = "1.1",
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.query = query
        self.path = ""  # normalized and decoded, set by the route step
        self.headers = headers
        self.peer_ip = peer_ip
        self.scheme = scheme
        self.http_version = http_version
        self.body = b""
        # header names listed in `Connection` (hop-by-hop, RFC 9110 7.6.1), set by the
        # gateway's parser as it reads them so forwarding needs no second pass
        self.connection_tokens: frozenset[bytes] = frozenset()
        # `X-Apishield-Client-*` headers for the upstream from a verified client certificate
        # (mutual TLS), set by the gateway's connection; never from anything the client sent
        self.client_identity: tuple[tuple[bytes, bytes], ...] = ()
        # framing facts for the limits step, found by the front end in its one pass over
        # the headers (the gateway's parser callback, the middleware's `read_framing`):
        # Content-Length as a number (0 when absent, -1 when not 1*DIGIT), whether a
        # Transfer-Encoding was sent, the first Content-Type and whether there was another
        self.declared_length = 0
        self.chunked = False
        self.content_type: bytes | None = None
        self.content_type_repeated = False
        self.id = new_request_id()
        self.started = time.perf_counter()
        self.client_ip = peer_ip  # client_ip step: trusted-proxy aware
        self.forwarded_for = peer_ip  # client_ip step: X-Forwarded-For to send
        self.trusted_peer = False  # client_ip step: the peer is a configured trusted proxy
        self.entry: PathEntry | None = None  # route step
        self.operation: Operation | None = None  # route step
        self.path_params: dict[str, str] = {}  # route step
        self.body_limit = 0  # limits step
        self.problem: Problem | None = None  # whoever refused
        self.reason = ""  # outcome reason for the access log
        self.shadowed = False  # log-only mode: something would have been refused
        self.principal: Principal | None = None  # authenticate step: the verified caller
        # authenticate step: the delegated scheme(s) the request was admitted with (the
        # upstream verifies them; its 401/403 count as authentication failures)
        self.delegated: str | None = None
        # pipeline: a step waiting for I/O (a JWKS refetch, token introspection) and where
        # to resume; `resumes` counts how often it did, so a step never waits twice
        self.suspended: (tuple[Callable[[], Awaitable[None]], list[Callable[[Exchange], None]], int]
                         | None) = None
        self.resumes = 0
        self.waited_for: object | None = None  # the step whose I/O was awaited last
        # rate_limit step: (policy name, Decision) of the tightest limit, for the headers
        self.rate_limit: tuple[str, Decision] | None = None
        # concurrency step: the in-flight slots this request holds (released by `record`)
        self.held: tuple[str, ...] = ()
        # front end: request body bytes received (0: `len(body)` tells) and response bytes
        # sent, for the usage counts (F4)
        self.bytes_in = 0
        self.bytes_out = 0

    def read_framing(self) -> None:
        """Set the framing facts from `headers` (a front end without a parser callback of
        its own: the middleware; the gateway's `HttpConnection.on_header` sets them as it
        reads each header)."""
        for name, value in self.headers:
            if name == b"content-length":
                length = content_length(value)
                if self.declared_length >= 0:  # an invalid one stays the answer
                    self.declared_length = -1 if length is None else length
            elif name == b"transfer-encoding":
                self.chunked = True
            elif name == b"content-type":
                if self.content_type is None:
                    self.content_type = value
                else:
                    self.content_type_repeated = True

    def header(self, name: bytes) -> bytes | None:
        """The first value of a request header (names are lower case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class Suspend(Exception):
    """Raised by a synchronous step that needs I/O first (a JWKS refetch for an unknown
    `kid`, an introspection call). The pipeline stores `wait` and the step's place on the
    exchange; the front end then takes its async path, awaits `wait()` and the pipeline
    runs the step again (whose answer is now cached) and the steps after it.

    Steps stay synchronous on the hot path this way: a cache hit costs no task, no future.
    `wait` must not raise: it records a failure where the step will find it on its rerun.
    """

    def __init__(self, wait: Callable[[], Awaitable[None]], owner: object | None = None) -> None:
        super().__init__("suspended for I/O")
        self.wait = wait
        self.owner = owner  # the step, which can tell on its rerun that it already waited
