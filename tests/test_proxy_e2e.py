"""The gateway started through its CLI, in front of a real upstream, driven over HTTP."""

from __future__ import annotations

import json
import re
import socket
import threading

import httpx
import pytest

from tests.conftest import raw_exchange


def test_declared_operation_passes_with_security_headers(gateway, upstream):
    response = httpx.get(f"{gateway.url}/echo?x=1")
    assert response.status_code == 200
    echoed = response.json()
    assert echoed["path"] == "/echo" and echoed["query"] == "x=1"
    headers = response.headers
    assert headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store"
    assert "strict-transport-security" not in headers  # plain HTTP: never HSTS (RFC 6797)
    assert "server" not in headers and "x-powered-by" not in headers
    assert len(headers["x-request-id"]) == 32


def test_undeclared_path_is_404_problem(gateway, upstream):
    before = upstream.request_count
    response = httpx.get(f"{gateway.url}/admin")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 404 and body["type"].endswith("route-not-found")
    assert body["instance"].endswith(response.headers["x-request-id"])
    assert response.headers["x-content-type-options"] == "nosniff"  # refusals too
    assert upstream.request_count == before  # never reached the upstream


def test_undeclared_method_is_405_with_allow(gateway):
    response = httpx.patch(f"{gateway.url}/echo")
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET, HEAD, POST, PUT"
    assert response.json()["type"].endswith("method-not-allowed")


def test_head_is_served_by_the_get_operation(gateway):
    response = httpx.head(f"{gateway.url}/echo")
    assert response.status_code == 200
    assert response.content == b""
    assert int(response.headers["content-length"]) > 0


def test_templated_paths_and_literal_precedence(gateway, upstream):
    assert httpx.get(f"{gateway.url}/echo/42").status_code == 200
    assert httpx.get(f"{gateway.url}/echo/42/files/report.json").status_code == 200
    assert httpx.get(f"{gateway.url}/echo/42/files/report.txt").status_code == 404
    assert httpx.get(f"{gateway.url}/echo/static/files/a.json").status_code == 200
    assert upstream.last_request["path"] == "/echo/static/files/a.json"


def test_trailing_slash_is_a_different_path(gateway):
    assert httpx.get(f"{gateway.url}/echo/").status_code == 404


def test_request_id_reaches_upstream_and_log(gateway, upstream):
    response = httpx.get(f"{gateway.url}/echo", headers={"X-Request-Id": "client-chosen"})
    request_id = response.headers["x-request-id"]
    assert request_id != "client-chosen"
    sent = dict((k.lower(), v) for k, v in response.json()["headers"])
    assert sent["x-request-id"] == request_id
    entry = gateway.log_entry(request_id)
    assert entry["route"] == "/echo" and entry["operation"] == "echoGet"
    assert entry["status"] == 200 and entry["outcome"] == "allowed"


def test_forwarded_headers_are_set_by_the_gateway(gateway):
    response = httpx.get(
        f"{gateway.url}/echo",
        headers={"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https",
                 "Forwarded": "for=6.6.6.6", "X-Real-Ip": "6.6.6.6",
                 "X-Apishield-Subject": "admin"},
    )
    sent = [(k.lower(), v) for k, v in response.json()["headers"]]
    as_dict = dict(sent)
    assert as_dict["x-forwarded-for"] == "127.0.0.1"  # the spoofed value is not trusted
    assert as_dict["x-forwarded-proto"] == "http"
    assert as_dict["x-forwarded-host"] == f"127.0.0.1:{gateway.port}"
    assert "forwarded" not in as_dict and "x-real-ip" not in as_dict
    assert "x-apishield-subject" not in as_dict  # identity namespace is the gateway's alone
    assert [k for k, _ in sent].count("x-forwarded-for") == 1


def test_trusted_proxy_chain_is_walked_right_to_left(make_gateway):
    gw = make_gateway({"trusted_proxies": ["127.0.0.0/8", "10.0.0.0/8"]})
    response = httpx.get(
        f"{gw.url}/echo",
        headers={"X-Forwarded-For": "1.1.1.1, 203.0.113.9, 10.0.0.2",
                 "X-Forwarded-Proto": "https"},
    )
    sent = dict((k.lower(), v) for k, v in response.json()["headers"])
    assert sent["x-forwarded-for"] == "1.1.1.1, 203.0.113.9, 10.0.0.2, 127.0.0.1"
    assert sent["x-forwarded-proto"] == "https"
    entry = gw.log_entry(response.headers["x-request-id"])
    assert entry["client_ip"] == "203.0.113.9"  # not the leftmost, client-chosen entry


def test_hop_by_hop_headers_removed_both_ways(gateway):
    response = httpx.get(
        f"{gateway.url}/hop", headers={"Connection": "X-Secret", "X-Secret": "1", "TE": "trailers"}
    )
    assert response.status_code == 200
    assert "x-hop-secret" not in response.headers and "keep-alive" not in response.headers
    assert response.headers["x-normal"] == "1"
    echoed = httpx.get(f"{gateway.url}/echo", headers={"Connection": "X-Secret",
                                                       "X-Secret": "1"}).json()
    names = {k.lower() for k, _ in echoed["headers"]}
    assert "x-secret" not in names and "te" not in names and "connection" not in names


def test_post_body_and_media_types(gateway, upstream):
    response = httpx.post(f"{gateway.url}/echo", json={"a": 1})
    assert response.status_code == 200 and response.json()["body"] == '{"a":1}'
    text = httpx.post(f"{gateway.url}/echo", content=b"hi",
                      headers={"content-type": "text/plain; charset=utf-8"})
    assert text.status_code == 200  # matches the declared text/*
    bad = httpx.post(f"{gateway.url}/echo", content=b"<x/>",
                     headers={"content-type": "application/xml"})
    assert bad.status_code == 415
    missing = httpx.post(f"{gateway.url}/echo", content=b"{}", headers={"content-type": ""})
    assert missing.status_code == 415
    no_body = httpx.post(f"{gateway.url}/echo")
    assert no_body.status_code == 400  # requestBody.required
    anything = httpx.put(f"{gateway.url}/echo", content=b"x",
                         headers={"content-type": "application/x-whatever"})
    assert anything.status_code == 200  # */* via a $ref'd requestBody


def test_body_on_operation_without_request_body_is_415(gateway):
    response = httpx.request("DELETE", f"{gateway.url}/echo", content=b"{}",
                             headers={"content-type": "application/json"})
    assert response.status_code == 415


def test_per_operation_body_limit(gateway):
    ok = httpx.post(f"{gateway.url}/echo/small", content=b'{"a":1}',
                    headers={"content-type": "application/json"})
    assert ok.status_code == 200
    big = httpx.post(f"{gateway.url}/echo/small", content=b'{"a":"' + b"x" * 64 + b'"}',
                     headers={"content-type": "application/json"})
    assert big.status_code == 413
    assert big.headers["connection"] == "close"


def test_chunked_request_body_is_forwarded_with_length(gateway):
    def parts():
        yield b'{"a":'
        yield b'"chunked"}'

    response = httpx.post(f"{gateway.url}/echo", content=parts(),
                          headers={"content-type": "application/json"})
    assert response.status_code == 200
    echoed = response.json()
    assert echoed["body"] == '{"a":"chunked"}'
    names = {k.lower(): v for k, v in echoed["headers"]}
    assert names["content-length"] == "15" and "transfer-encoding" not in names


def test_large_response_is_streamed_intact(gateway):
    size = 5 * 1024 * 1024 + 7
    with httpx.stream("GET", f"{gateway.url}/big?bytes={size}") as response:
        assert response.headers["content-length"] == str(size)
        data = b"".join(response.iter_bytes())
    pattern = b"0123456789abcdef"
    assert len(data) == size
    assert data == (pattern * (size // len(pattern) + 1))[:size]


def test_chunked_response_is_rechunked(gateway):
    response = httpx.get(f"{gateway.url}/chunked?parts=7&size=100")
    assert response.status_code == 200 and response.content == b"x" * 700


def test_upstream_server_error_is_masked_and_logged_redacted(gateway):
    response = httpx.get(f"{gateway.url}/error")
    assert response.status_code == 500  # the status is kept ...
    assert response.headers["content-type"] == "application/problem+json"
    document = response.json()  # ... the stack trace and the SQL are not
    assert document["type"].endswith("upstream-error") and document["practice"] == "E3"
    for leak in ("Traceback", "psycopg2", "SELECT", "/srv/app.py"):
        assert leak not in response.text
    assert "server" not in response.headers
    request_id = response.headers["x-request-id"]
    deadline = __import__("time").monotonic() + 3
    while request_id not in gateway.stderr() and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.05)
    logged = [line for line in gateway.stderr().splitlines() if request_id in line]
    assert logged and "psycopg2" in logged[0]  # the operator still sees what happened
    assert "password='...'" not in logged[0] and "password=<redacted>" in logged[0]


def test_upstream_5xx_json_secret_never_reaches_client_or_log(gateway):
    response = httpx.get(f"{gateway.url}/status/503")
    assert response.status_code == 503
    assert response.json()["type"].endswith("upstream-error")
    leaked = httpx.get(f"{gateway.url}/server-error-json")
    assert "hunter2" not in leaked.text


def test_status_codes_without_body(gateway):
    assert httpx.get(f"{gateway.url}/status/204").status_code == 204
    assert httpx.get(f"{gateway.url}/status/304").status_code == 304
    # and the pooled connection is still usable afterwards
    assert httpx.get(f"{gateway.url}/echo").status_code == 200


def test_cache_control_kept_only_for_public_operations(gateway):
    assert httpx.get(f"{gateway.url}/cache").headers["cache-control"] == "public, max-age=60"
    # a non-public operation: refused without a key here, and never cacheable either way
    private = httpx.get(f"{gateway.url}/cache-private")
    assert private.status_code == 401
    assert private.headers["cache-control"] == "no-store"


def test_upstream_drop_is_502(gateway):
    response = httpx.get(f"{gateway.url}/drop")
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/problem+json"
    assert "LeakyServer" not in response.text


def test_upstream_unreachable_is_502(make_gateway):
    from tests.conftest import free_port

    gw = make_gateway(upstream=f"http://127.0.0.1:{free_port()}")
    response = httpx.get(f"{gw.url}/echo")
    assert response.status_code == 502
    entry = gw.log_entry(response.headers["x-request-id"])
    assert entry["reason"] == "upstream-unreachable" and entry["outcome"] == "error"


def test_upstream_read_timeout_is_504(make_gateway):
    gw = make_gateway({"upstream": {"read_timeout": "300ms"}})
    response = httpx.get(f"{gw.url}/slow?ms=2000", timeout=10)
    assert response.status_code == 504
    assert httpx.get(f"{gw.url}/slow?ms=10").status_code == 200


def test_keepalive_connection_is_reused(gateway):
    with httpx.Client() as client:
        for _ in range(20):
            assert client.get(f"{gateway.url}/echo").status_code == 200


def test_pipelined_requests_answered_in_order(gateway):
    payload = (
        b"GET /echo/1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /slow?ms=200 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /echo/4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    data = raw_exchange(gateway.port, payload)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", data)
    assert statuses == [b"200", b"404", b"200", b"200"]
    assert data.index(b'"/echo/1"') < data.index(b"route-not-found") < data.index(b'"slept"')
    assert data.index(b'"slept"') < data.index(b'"/echo/4"')


def test_concurrent_clients(gateway):
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with httpx.Client() as client:
                for i in range(25):
                    r = client.get(f"{gateway.url}/echo/{n}-{i}")
                    assert r.status_code == 200 and r.json()["path"] == f"/echo/{n}-{i}"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_access_log_has_no_secrets(gateway):
    httpx.get(f"{gateway.url}/echo?api_key=SECRET-QUERY",
              headers={"Authorization": "Bearer SECRET-TOKEN", "Cookie": "s=SECRET-COOKIE",
                       "X-Api-Key": "SECRET-KEY"})
    gateway.log_lines()
    text = gateway.access_log.read_text()
    assert "SECRET" not in text
    for line in text.splitlines():
        entry = json.loads(line)
        assert set(entry) == {"ts", "level", "kind", "logger", "msg", "request_id", "method",
                              "route", "operation", "status", "duration_ms", "client_ip",
                              "outcome", "reason"}


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_graceful_shutdown_finishes_in_flight_requests(make_gateway, signal_name):
    import signal as signals
    import time

    gw = make_gateway()
    result: dict[str, object] = {}

    def slow_request() -> None:
        try:
            result["status"] = httpx.get(f"{gw.url}/slow?ms=800", timeout=10).status_code
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.3)
    gw.process.send_signal(getattr(signals, signal_name))
    time.sleep(0.1)
    with pytest.raises(OSError):  # no longer accepting
        socket.create_connection(("127.0.0.1", gw.port), timeout=1).close()
    thread.join(10)
    assert result.get("status") == 200, result
    assert gw.process.wait(10) == 0
    assert "stopped" in gw.stderr()
