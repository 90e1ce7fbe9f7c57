"""`mode: log-only`: deploy in front of a live API, watch what would be refused, then enforce.

Contract refusals are logged (outcome `shadowed`, precise reason) and the request goes
through; protocol and safety refusals are enforced whatever the mode.
"""

from __future__ import annotations

import httpx

from tests.conftest import raw_exchange


def test_contract_refusals_are_logged_not_enforced(make_gateway, upstream):
    gw = make_gateway({"mode": "log-only"})
    before = upstream.request_count
    undeclared = httpx.get(f"{gw.url}/admin")
    assert undeclared.status_code == 404  # the upstream's own 404, not the gateway's
    assert undeclared.headers["content-type"] == "application/json"
    bad_param = httpx.get(f"{gw.url}/slow?ms=abc")
    # reached the upstream, which answers its own (JSON, not problem+json) 400
    assert bad_param.headers["content-type"] == "application/json"
    leaky = httpx.get(f"{gw.url}/users?n=1")
    assert "password_hash" in leaky.text  # would have been filtered
    assert upstream.request_count == before + 3
    entries = {e["request_id"]: e for e in gw.log_lines()}
    first = entries[undeclared.headers["x-request-id"]]
    assert first["outcome"] == "shadowed" and first["reason"] == "route-not-declared"
    assert entries[bad_param.headers["x-request-id"]]["reason"] == "parameters-invalid"
    assert entries[leaky.headers["x-request-id"]]["outcome"] == "shadowed"
    assert entries[leaky.headers["x-request-id"]]["reason"] == "response-filtered"


def test_safety_refusals_are_enforced_in_log_only(make_gateway, upstream):
    gw = make_gateway({"mode": "log-only", "limits": {"max_body_bytes": 100}})
    before = upstream.request_count
    assert httpx.get(f"{gw.url}/echo/a%2fb").status_code == 400  # path trick
    too_big = httpx.post(f"{gw.url}/echo", content=b"x" * 1000,
                         headers={"content-type": "text/plain"})
    assert too_big.status_code == 413
    smuggle = raw_exchange(gw.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert smuggle.startswith(b"HTTP/1.1 400 ")
    assert upstream.request_count == before


def test_per_operation_log_only_inside_enforcing_gateway(make_gateway, upstream):
    gw = make_gateway({"operations": {"slow": {"mode": "log-only"}}})
    shadowed = httpx.get(f"{gw.url}/slow?ms=abc")  # reaches the upstream (its own 400)
    assert shadowed.headers["content-type"] == "application/json"
    enforced = httpx.get(f"{gw.url}/big?bytes=abc")
    assert enforced.status_code == 400
    assert enforced.headers["content-type"] == "application/problem+json"
    assert httpx.get(f"{gw.url}/admin").status_code == 404
    assert httpx.get(f"{gw.url}/admin").headers["content-type"] == "application/problem+json"


def test_enforce_is_the_default(gateway):
    response = httpx.get(f"{gateway.url}/slow?ms=abc")
    assert response.status_code == 400
