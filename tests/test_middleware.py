"""ApiShieldMiddleware in-process (httpx ASGITransport) and under a real uvicorn server."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.conftest import free_port, wait_for_port
from tests.middleware_app import CONFIG, create_app, events


@pytest.fixture
async def client():
    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


async def test_declared_route_passes_with_headers(client):
    response = await client.get("/items/7")
    assert response.status_code == 200 and response.json() == {"item_id": "7"}
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    assert len(response.headers["x-request-id"]) == 32


async def test_app_route_missing_from_contract_is_unreachable(client):
    response = await client.get("/admin")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert "admin panel" not in response.text


async def test_405_and_415_and_413(client):
    assert (await client.delete("/items/1")).status_code == 405
    assert (await client.post("/items", content=b"x",
                              headers={"content-type": "text/plain"})).status_code == 415
    big = await client.post("/items", json={"a": "x" * 100})
    assert big.status_code == 413
    ok = await client.post("/items", json={"a": 1})
    assert ok.status_code == 201 and ok.json() == {"received": {"a": 1}}


async def test_path_tricks_refused(client):
    assert (await client.get("/items/a%2fb")).status_code == 400
    assert (await client.get("/items/%ff")).status_code == 400


async def test_app_exception_is_generic_500_without_detail(client, caplog):
    response = await client.get("/boom")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert "hunter2" not in response.text and "RuntimeError" not in response.text
    request_id = response.headers["x-request-id"]
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback is in the log, with the id


async def test_app_5xx_body_is_masked(client, caplog):
    response = await client.get("/leak")
    assert response.status_code == 500
    assert response.json()["type"].endswith("upstream-error")
    assert "hunter2" not in response.text and "Traceback" not in response.text
    logged = [r.getMessage() for r in caplog.records
              if response.headers["x-request-id"] in r.getMessage()]
    assert logged and "Traceback" in logged[0] and "hunter2" not in logged[0]


async def test_streaming_response_passes_and_banners_removed(client):
    response = await client.get("/stream")
    assert response.text == "part0;part1;part2;part3;part4;"
    assert "server" not in response.headers and "x-powered-by" not in response.headers


async def test_identity_headers_stripped_and_request_id_given(client):
    response = await client.get(
        "/headers", headers={"X-Apishield-Subject": "admin", "X-Request-Id": "mine",
                             "X_Apishield_Roles": "admin", "x_request-ID": "mine2",
                             "X-Apishield": "kept", "X-Requested-With": "kept"}
    )
    seen = response.json()
    assert "x-apishield-subject" not in seen
    assert "x_apishield_roles" not in seen and "x_request-id" not in seen  # `_` twins
    assert seen["x-request-id"] == response.headers["x-request-id"] != "mine"
    assert seen["x-apishield"] == seen["x-requested-with"] == "kept"  # not the gateway's


async def test_lifespan_passes_through():
    app = create_app()
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    events.clear()
    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert events == ["startup", "shutdown"]
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_websocket_refused_unless_allowed(tmp_path):
    sent: list[dict] = []

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    await create_app()({"type": "websocket", "path": "/ws", "headers": []}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]


@pytest.fixture
def uvicorn_server():
    port = free_port()
    with subprocess.Popen(  # leaving the block closes the stderr pipe and reaps the process
        [sys.executable, "-m", "uvicorn", "tests.middleware_app:app", "--port", str(port),
         "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    ) as process:
        try:
            wait_for_port(port, process)
            yield f"http://127.0.0.1:{port}", port
        finally:
            process.terminate()
            process.wait(10)


def test_under_real_uvicorn(uvicorn_server):
    url, port = uvicorn_server
    assert httpx.get(f"{url}/items/1").status_code == 200
    assert httpx.get(f"{url}/admin").status_code == 404
    assert httpx.get(f"{url}/items/..%2f..%2fadmin").status_code == 400
    response = httpx.post(f"{url}/items", content=b'{"a":"' + b"x" * 200 + b'"}',
                          headers={"content-type": "application/json"})
    assert response.status_code == 413
    # a websocket handshake is refused by the middleware; uvicorn answers 403
    import base64
    import os
    import socket

    key = base64.b64encode(os.urandom(16))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 403")


def test_config_path_is_used():
    assert CONFIG.exists()


async def _raw_asgi(headers: list[tuple[bytes, bytes]], body: bytes) -> int:
    """POST /items straight through the ASGI interface, with headers exactly as given
    (a client library would fix Content-Length and merge repeated fields)."""
    app = create_app()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/items", "raw_path": b"/items",
             "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


async def test_framing_facts_read_in_one_pass():
    """The middleware finds Content-Length, Transfer-Encoding and Content-Type in its one
    pass over the scope's headers (`Exchange.read_framing`) for the limits step."""
    body = b'{"a": 1}'
    json_type = (b"content-type", b"application/json")
    length = (b"content-length", b"%d" % len(body))
    assert await _raw_asgi([json_type, length], body) == 201
    assert await _raw_asgi([(b"Content-Type", b"application/json"), length], body) == 201
    # a singleton field sent twice: two parsers could disagree on what the body is
    assert await _raw_asgi([json_type, (b"content-type", b"text/plain"), length], body) == 400
    assert await _raw_asgi([json_type, (b"content-length", b"8x")], body) == 400
    assert await _raw_asgi([json_type, (b"content-length", b"8x"), length], body) == 400
    assert await _raw_asgi([json_type, (b"content-length", b"%d" % 10**6)], body) == 413
    assert await _raw_asgi([(b"content-type", b"text/plain"), length], body) == 415


async def test_scopes_and_messages_that_are_mappings_not_dicts():
    """ASGI 3.0 says dicts; the per-request path (asgi_http.py) reads them as dicts and
    copies any other mapping first, so a server or app that sends another mapping gets the
    same answers, compiled or not (a compiled build would refuse a non-dict typed dict)."""
    from collections import UserDict

    from apishield import ApiShieldMiddleware

    async def app(scope, receive, send):
        assert (await receive())["body"] == b""
        status = 500 if scope["path"] == "/leak" else 200
        await send(UserDict({"type": "http.response.start", "status": status,
                             "headers": [(b"content-type", b"text/plain"),
                                         (b"content-length", b"6")]}))
        await send(UserDict({"type": "http.response.body", "body": b"secret"}))

    middleware = ApiShieldMiddleware(app, config=CONFIG)

    async def call(path: str) -> tuple[int, dict[bytes, bytes], bytes]:
        sent: list = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = UserDict({"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                          "method": "GET", "scheme": "http", "path": path,
                          "raw_path": path.encode(), "query_string": b"", "root_path": "",
                          "headers": [(b"host", b"testserver"), (b"x-request-id", b"mine")],
                          "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)})
        await middleware(scope, receive, send)
        start, body = sent
        return start["status"], dict(start["headers"]), body["body"]

    try:
        status, headers, body = await call("/items/7")
        assert (status, body) == (200, b"secret")
        assert headers[b"x-content-type-options"] == b"nosniff"
        assert len(headers[b"x-request-id"]) == 32  # the gateway's, not the client's
        status, headers, body = await call("/leak")  # held whole, then masked
        assert status == 500 and b"secret" not in body
        assert headers[b"content-type"] == b"application/problem+json"
    finally:
        await middleware._shutdown()
