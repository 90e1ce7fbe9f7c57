"""The request head the gateway sends upstream is byte-identical to the one built before
issue 18's one-pass header handling.

Since issue 18, `HttpConnection.on_header` picks and formats the header lines to forward
as llhttp reports them (`Message.forward`) and `Gateway.serialize_request` only takes out
those dropped late. `reference_head` below is the serializer as it was before (one loop
over the parsed header list at forwarding time), kept here as the oracle: each case runs
the real parser, the real pipeline head and body phases and the real serializer, and the
bytes must equal the oracle's for the same parsed request.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from apishield.auth.identity import identity_headers
from apishield.config import load_config
from apishield.gateway import BODY_METHODS, Gateway, build_gateway
from apishield.http.server import HttpConnection, Message
from apishield.http.upstream import IDENTITY_PREFIX, REQUEST_OWNED

CONTRACT = {
    "openapi": "3.0.3",
    "info": {"title": "forward head", "version": "1"},
    "security": [],
    "paths": {
        "/open": {
            "get": {"operationId": "openGet", "x-apishield": {"strict": False},
                    "responses": {"200": {"description": "ok"}}},
            "post": {
                "operationId": "openPost",
                "requestBody": {"content": {"application/json": {"schema": {}}}},
                "responses": {"200": {"description": "ok"}},
            },
        },
        "/filtered": {
            "get": {
                "operationId": "filtered",
                "responses": {"200": {"description": "ok", "content": {"application/json": {
                    "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}}}},
            },
        },
    },
}


def reference_head(gateway: Gateway, exchange: Message) -> bytes:
    """The serializer before issue 18 (gateway.py at fd53ed5), on the parsed header list."""
    target = gateway.upstream_prefix + exchange.raw_path
    if exchange.query:
        target += b"?" + exchange.query
    dropped = REQUEST_OWNED
    if exchange.connection_tokens:
        dropped = dropped | exchange.connection_tokens
    if gateway.pipeline.filters_operation(exchange):
        dropped = dropped | {b"accept-encoding"}
    client_host = b""
    forwarded_proto = exchange.scheme.encode()
    forwarded_host = b""
    lines = [b"%b %b HTTP/1.1" % (exchange.method.encode(), target)]
    for name, value in exchange.headers:
        if b"_" in name:
            dashed = name.replace(b"_", b"-")
            if dashed in REQUEST_OWNED or dashed.startswith(IDENTITY_PREFIX):
                continue
        if name in dropped or name.startswith(IDENTITY_PREFIX):
            if name == b"host":
                client_host = value
            elif exchange.trusted_peer:
                if name == b"x-forwarded-proto":
                    forwarded_proto = value
                elif name == b"x-forwarded-host":
                    forwarded_host = value
            continue
        lines.append(b"%b: %b" % (name, value))
    host = gateway.upstream_host_header
    if gateway.preserve_host and client_host:
        host = client_host
    lines.append(b"host: %b\r\nx-forwarded-for: %b\r\nx-forwarded-proto: %b" % (
        host, exchange.forwarded_for.encode(), forwarded_proto))
    if forwarded_host or client_host:
        lines.append(b"x-forwarded-host: %b" % (forwarded_host or client_host))
    lines.append(b"x-request-id: %b" % exchange.id.encode())
    if exchange.client_identity:
        lines.extend([b": ".join(pair) for pair in exchange.client_identity])
    if exchange.principal is not None:
        lines.extend([b": ".join(pair) for pair in identity_headers(exchange.principal)])
    body = exchange.body
    if body or exchange.method in BODY_METHODS:
        lines.append(b"content-length: %d" % len(body))
    return b"%b\r\n\r\n%b" % (b"\r\n".join(lines), body)


CASES: list[tuple[str, bytes]] = [
    ("host only (wrk)", b"GET /open HTTP/1.1\r\nHost: a.example\r\n\r\n"),
    ("curl-like", b"GET /open?x=1&y=2 HTTP/1.1\r\nHost: a.example:8443\r\n"
                  b"User-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n"),
    ("no host, http/1.0", b"GET /open HTTP/1.0\r\nAccept: text/plain\r\n\r\n"),
    ("mixed case names, repeated fields", b"GET /open HTTP/1.1\r\nHOST: a.example\r\n"
     b"X-Custom: 1\r\nx-custom: 2\r\nCookie: a=b\r\nCookie: c=d\r\nAccept-Encoding: gzip\r\n\r\n"),
    ("owned fields replaced", b"GET /open HTTP/1.1\r\nHost: a.example\r\n"
     b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: gopher\r\nX-Forwarded-Host: evil\r\n"
     b"X-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Request-Id: mine\r\n"
     b"Expect: 100-continue\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
     b"Proxy-Authorization: Basic eA==\r\nUpgrade-Insecure-Requests: 1\r\n\r\n"),
    ("identity namespace and underscore twins", b"GET /open HTTP/1.1\r\nHost: a.example\r\n"
     b"X-Apishield-Subject: admin\r\nx-apishield-roles: root\r\nX_Apishield_Subject: admin\r\n"
     b"X_Forwarded_For: 6.6.6.6\r\nX_Custom_Thing: kept\r\nx-apishield_a: b\r\n\r\n"),
    ("connection names fields", b"GET /open HTTP/1.1\r\nHost: a.example\r\n"
     b"X-Secret: 1\r\nConnection: X-Secret, keep-alive, X-Later\r\nX-Later: 2\r\n"
     b"X-Kept: 3\r\n\r\n"),
    ("connection: close only", b"GET /open HTTP/1.1\r\nHost: a.example\r\n"
     b"Connection: close\r\nAccept: */*\r\n\r\n"),
    ("filtered operation drops accept-encoding", b"GET /filtered HTTP/1.1\r\n"
     b"Host: a.example\r\nAccept-Encoding: gzip, br\r\nAccept: application/json\r\n\r\n"),
    ("filtered operation, connection names a field", b"GET /filtered HTTP/1.1\r\n"
     b"Host: a.example\r\nConnection: x-a\r\nX-A: 1\r\nX-B: 2\r\n\r\n"),
    ("post with body", b"POST /open HTTP/1.1\r\nHost: a.example\r\n"
     b"Content-Type: application/json\r\nContent-Length: 9\r\n\r\n{\"a\": 1}\n"),
    ("post chunked", b"POST /open HTTP/1.1\r\nHost: a.example\r\n"
     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"2\r\n{}\r\n0\r\n\r\n"),
    ("empty values", b"GET /open HTTP/1.1\r\nHost: \r\nX-Empty: \r\n"
     b"X-Forwarded-Proto: \r\nX-Forwarded-Host: \r\n\r\n"),
]


def run(tmp_path: Path, config: dict[str, object], payload: bytes) -> list[tuple[bytes, bytes]]:
    """Parse `payload` with a real connection of a real gateway (its steps run); for each
    request it queued, the head the gateway would send and the oracle's."""
    (tmp_path / "contract.yaml").write_text(yaml.safe_dump(CONTRACT))
    path = tmp_path / "apishield.yaml"
    path.write_text(yaml.safe_dump({"contract": str(tmp_path / "contract.yaml"),
                                    "upstream": {"url": "http://127.0.0.1:9"},
                                    "access_log": {"path": "-"}, **config}))

    async def main() -> list[tuple[bytes, bytes]]:
        gateway = build_gateway(load_config(str(path)))
        gateway.start_pool()
        await gateway.pipeline.start()
        connection = HttpConnection(gateway)
        connection.peer_ip = "10.0.0.7"
        connection.busy = True  # queue the parsed requests: nothing is sent anywhere
        try:
            connection.parser.feed_data(payload)
            pairs = []
            for message in connection.queue:
                assert message.problem is None, message.problem
                pairs.append((gateway.serialize_request(message),
                              reference_head(gateway, message)))
            return pairs
        finally:
            connection.queue.clear()
            gateway.pipeline.close()
            await gateway.close()

    return asyncio.run(main())


@pytest.mark.parametrize(("case", "payload"), CASES, ids=[case for case, _ in CASES])
@pytest.mark.parametrize("config", [
    {},
    {"trusted_proxies": ["10.0.0.0/8"], "upstream": {"url": "http://127.0.0.1:9",
                                                      "host_header": "client"}},
], ids=["default", "trusted-proxy-client-host"])
def test_forwarded_head_is_byte_identical(tmp_path: Path, case: str, payload: bytes,
                                          config: dict[str, object]) -> None:
    pairs = run(tmp_path, config, payload)
    assert len(pairs) == 1
    sent, expected = pairs[0]
    assert sent == expected


def test_pipelined_requests_keep_their_own_headers(tmp_path: Path) -> None:
    """The parser's per-request facts (lines, Host, rare fields) never leak into the next
    request on the connection."""
    cases = [(case, payload) for case, payload in CASES
             if not payload.startswith(b"POST") and b"Connection: close" not in payload
             and b"HTTP/1.0" not in payload]
    pairs = run(tmp_path, {"trusted_proxies": ["10.0.0.0/8"]},
                b"".join(payload for _, payload in cases))
    assert len(pairs) == len(cases)
    for sent, expected in pairs:
        assert sent == expected
    owned = [case for case, _ in cases].index("owned fields replaced")
    assert b"x-forwarded-proto: gopher" in pairs[owned][0]  # trusted: the client's value
    assert b"gopher" not in pairs[owned + 1][0]  # and only on the request that sent it
