"""Request bodies over 64 KiB stream to the upstream as they arrive (never held whole),
within the operation's limit and the body timeout."""

from __future__ import annotations

import re
import socket
import time

import httpx


def _head(port_host: str, length: int) -> bytes:
    return (f"POST /echo HTTP/1.1\r\nHost: {port_host}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _wait_for(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_large_body_arrives_whole_and_exact(make_gateway, upstream):
    gw = make_gateway({"limits": {"max_body_bytes": "8MiB"}})
    body = bytes(range(256)) * (3 * 1024 * 1024 // 256)  # 3 MiB, every byte value
    response = httpx.post(f"{gw.url}/echo", content=body,
                          headers={"content-type": "text/plain"}, timeout=30)
    assert response.status_code == 200
    echoed = response.json()
    assert echoed["body_len"] == len(body)
    assert echoed["body"].encode("latin-1") == body
    sent = {k.lower(): v for k, v in echoed["headers"]}
    assert sent["content-length"] == str(len(body))
    # and the connection is usable again afterwards
    assert httpx.get(f"{gw.url}/echo").status_code == 200


def test_upstream_sees_the_request_before_the_client_finished(make_gateway, upstream):
    gw = make_gateway({"limits": {"max_body_bytes": "8MiB"}})
    before = upstream.heads_seen
    length = 512 * 1024
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(_head(f"127.0.0.1:{gw.port}", length) + b"a" * (length // 2))
        # half the body is sent and the client waits: a buffering proxy would not have
        # contacted the upstream yet
        assert _wait_for(lambda: upstream.heads_seen > before), "upstream never saw the head"
        sock.sendall(b"b" * (length - length // 2))
        data = b""
        while b'"body_len"' not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    assert re.match(rb"HTTP/1\.1 200 ", data)
    assert b'"body_len": %d' % length in data or b'"body_len":%d' % length in data


def test_client_stalling_mid_body_is_cut_and_upstream_never_gets_it_whole(make_gateway,
                                                                          upstream):
    gw = make_gateway({"limits": {"max_body_bytes": "8MiB"}, "timeouts": {"body": "1s"}})
    before_heads = upstream.heads_seen
    before_requests = upstream.request_count
    length = 400 * 1024
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(_head(f"127.0.0.1:{gw.port}", length) + b"x" * (100 * 1024))
        started = time.monotonic()
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        waited = time.monotonic() - started
    assert re.match(rb"HTTP/1\.1 408 ", data), data[:200]
    assert b"application/problem+json" in data
    assert waited < 5
    assert upstream.heads_seen > before_heads  # it was streaming ...
    # ... and the upstream saw the connection end before the body did (a short read, which
    # the test upstream refuses, so nothing complete was ever recorded)
    assert _wait_for(lambda: upstream.heads_seen > before_heads)
    assert upstream.request_count == before_requests


def test_small_bodies_are_still_buffered(gateway, upstream):
    before = upstream.heads_seen
    response = httpx.post(f"{gateway.url}/echo", content=b"x" * 1000,
                          headers={"content-type": "text/plain"})
    assert response.status_code == 200 and response.json()["body_len"] == 1000
    assert upstream.heads_seen == before + 1
