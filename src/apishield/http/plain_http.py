"""The plain-HTTP listener beside the TLS one: redirect to HTTPS or refuse; never forward.

Checklist C1. `tls.plain_http.mode: redirect` answers every request with a 308 (RFC 9110
15.4.9: unlike 301/302 the method and body are kept) to the same path and query on the
TLS listener; `refuse` answers 403 `https-required`. Nothing here reaches the upstream,
and nothing here sends HSTS: RFC 6797 7.2 forbids it over plain HTTP (the browser learns
it on the first HTTPS answer).

The redirect's host is the Host header's hostname, validated (a DNS name or an IP literal,
or 400): the scheme is always `https` and the port is the TLS listener's, so a client can
only redirect itself to a host name it chose, never to another scheme or port. The
connection is closed after one answer; requests are tiny, so this stays a small protocol
of its own instead of a mode of the gateway's `HttpConnection`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote_from_bytes

import httptools

from apishield.contract.paths import split_target
from apishield.exchange import Exchange, Headers
from apishield.problems import (
    PROBLEM_CONTENT_TYPE,
    BadRequest,
    HeadersTooLarge,
    HttpsRequired,
    Problem,
    ProblemRenderer,
    RequestTimeout,
    UriTooLong,
)

if TYPE_CHECKING:
    from apishield.gateway import Gateway

LINGER = 2.0  # seconds to drain what the client still sends before closing (no RST)
LINGER_MAX = 1024 * 1024  # bytes drained at most
HEAD_SLACK = 8 * 1024
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?")
_PORT = re.compile(r":[0-9]{0,5}")
_IPV6 = re.compile(r"[0-9a-f:.]+")
# Already-valid target bytes are kept as sent (`%XX` included); anything else is encoded.
_TARGET_SAFE = bytes(range(0x21, 0x7F))


def redirect_host(value: bytes) -> str | None:
    """The hostname of a Host header value (lower case, IPv6 in brackets), or None when
    it is not a DNS name or an IP literal with an optional port (RFC 9110 7.2)."""
    try:
        text = value.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    if text.startswith("["):
        literal, bracket, rest = text[1:].partition("]")
        if not bracket or not _IPV6.fullmatch(literal):
            return None
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return None
        host = f"[{literal}]"
    else:
        host, colon, port = text.partition(":")
        rest = colon + port
        if len(host) > 253 or not _HOSTNAME.fullmatch(host):
            return None
    if rest and not _PORT.fullmatch(rest):
        return None
    return host


class _Answered(Exception):
    """Raised from a parser callback: the answer is written, parse nothing more."""


class PlainHttpResponder:
    """One per plain listener: what to answer, shared by its connections."""

    def __init__(
        self, gateway: Gateway, mode: Literal["redirect", "refuse"], https_port: int
    ) -> None:
        self.gateway = gateway
        self.mode = mode
        self.port_suffix = "" if https_port == 443 else f":{https_port}"
        config = gateway.config
        self.add_headers = gateway.pipeline.plain_http_headers()
        # with the documentation link when `responses.problem_docs` is set, as the
        # gateway's own refusals (G5)
        self.render = ProblemRenderer(config.responses.problem_docs).render
        self.max_url = config.limits.max_url_length
        self.max_header_bytes = config.limits.max_header_bytes
        self.max_header_count = config.limits.max_header_count
        self.header_timeout = config.timeouts.header
        self.connections: set[PlainHttpConnection] = set()

    def protocol(self) -> PlainHttpConnection:
        return PlainHttpConnection(self)

    def close(self) -> None:
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()

    def location(self, host: str, raw_path: bytes, query: bytes) -> bytes:
        target = quote_from_bytes(raw_path, safe=_TARGET_SAFE)
        if query:
            target += "?" + quote_from_bytes(query, safe=_TARGET_SAFE)
        return f"https://{host}{self.port_suffix}{target}".encode("ascii")


class PlainHttpConnection(asyncio.Protocol):
    def __init__(self, responder: PlainHttpResponder) -> None:
        self.responder = responder
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        self.answered = False
        self.timer: asyncio.TimerHandle | None = None
        self.seen = 0
        self.url: list[bytes] = []
        self.url_len = 0
        self.headers: Headers = []
        self.header_bytes = 0
        self.hosts: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream Protocol is always handed an asyncio.Transport; typeshed types
        # connection_made with BaseTransport (that of every protocol kind)
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        self.responder.connections.add(self)
        self.timer = self.loop.call_later(self.responder.header_timeout, self._on_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.responder.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()

    def eof_received(self) -> bool:
        return False  # close our side too

    def data_received(self, data: bytes) -> None:
        self.seen += len(data)
        if self.answered:  # draining before the close
            if self.seen > LINGER_MAX and self.transport is not None:
                self.transport.close()
            return
        if self.seen > self.responder.max_url + self.responder.max_header_bytes + HEAD_SLACK:
            self._refuse(HeadersTooLarge("head-never-ends"))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, Problem):
                self._refuse(cause)
            elif not isinstance(cause, _Answered):
                raise
        except httptools.HttpParserUpgrade:
            pass  # answered in on_headers_complete already
        except httptools.HttpParserError:
            self._refuse(BadRequest("malformed-request"))

    # -- llhttp callbacks -----------------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self.url_len += len(url)
        if self.url_len > self.responder.max_url:
            raise UriTooLong("url-over-limit")
        self.url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if (self.header_bytes > self.responder.max_header_bytes
                or len(self.headers) >= self.responder.max_header_count):
            raise HeadersTooLarge("header-over-limit")
        name = name.lower()
        if name == b"host":
            self.hosts.append(value)
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        raw_path, query = split_target(b"".join(self.url))  # BadRequest unless origin-form
        exchange = Exchange(
            parser.get_method().decode("ascii", "replace"), raw_path, query, self.headers,
            self.peer_ip, "http", parser.get_http_version(),
        )
        responder = self.responder
        if responder.mode == "refuse":
            self._refuse(HttpsRequired("plain-http-refused"), exchange)
            raise _Answered
        host = redirect_host(self.hosts[0]) if len(self.hosts) == 1 else None
        if host is None:
            reason = "redirect-host-invalid" if self.hosts else "redirect-host-missing"
            self._refuse(BadRequest(reason), exchange)
            raise _Answered
        exchange.reason = "plain-http-redirected"
        location = responder.location(host, raw_path, query)
        self._answer(exchange, 308, [(b"location", location), (b"content-length", b"0")], b"")
        raise _Answered

    # -- answering ----------------------------------------------------------------------
    def _refuse(self, problem: Problem, exchange: Exchange | None = None) -> None:
        if self.answered:
            return
        if exchange is None:  # nothing usable was parsed: logged with method "-"
            exchange = Exchange("-", b"/", b"", [], self.peer_ip, "http")
        exchange.problem = problem
        exchange.reason = problem.reason
        body = self.responder.render(problem, exchange.id)
        if exchange.method == "HEAD":
            body_out = b""
        else:
            body_out = body
        headers: Headers = [
            (b"content-type", PROBLEM_CONTENT_TYPE),
            (b"content-length", b"%d" % len(body)),
            *problem.headers,
        ]
        self._answer(exchange, problem.status, headers, body_out)

    def _answer(self, exchange: Exchange, status: int, headers: Headers, body: bytes) -> None:
        from apishield.http.server import STATUS_LINES  # server imports the pipeline: import late

        self.answered = True
        responder = self.responder
        headers = responder.add_headers(exchange, status, headers)
        headers.append((b"connection", b"close"))
        head = STATUS_LINES[status] + b"\r\n".join([b": ".join(h) for h in headers])
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(head + b"\r\n\r\n" + body)
            # Half-close, then drain what the client is still sending for a moment: closing
            # with unread bytes makes the kernel send a RST that can destroy the answer.
            if transport.can_write_eof():
                transport.write_eof()
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_later(LINGER, transport.close)
        responder.gateway.pipeline.record(exchange, status)

    def _on_timeout(self) -> None:
        if self.seen and not self.answered:
            self._refuse(RequestTimeout("client-too-slow"))
        elif self.transport is not None:
            self.transport.close()
