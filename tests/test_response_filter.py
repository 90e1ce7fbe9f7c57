"""Excessive data exposure (API3): JSON responses are cut to their declared schema."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from apishield.config import config_from_dict
from apishield.contract.loader import load_contract
from apishield.steps.response_filter import ResponseFilter, prune
from tests.conftest import free_port, wait_for_port

DEMO_CONTRACT = Path(__file__).parent.parent / "src" / "apishield" / "demo" / "openapi.yaml"


def test_gateway_cuts_undeclared_fields_small_response(gateway):
    response = httpx.get(f"{gateway.url}/users?n=2")
    assert response.status_code == 200
    assert response.json() == [
        {"id": 0, "name": "user0", "profile": {"bio": "hi"}},
        {"id": 1, "name": "user1", "profile": {"bio": "hi"}},
    ]
    assert "argon2" not in response.text and "ssn" not in response.text
    assert int(response.headers["content-length"]) == len(response.content)


def test_gateway_cuts_undeclared_fields_streamed_response(gateway):
    # ~200 KB: over the 64 KiB the upstream pool hands back whole, so it was streaming
    response = httpx.get(f"{gateway.url}/users?n=1500")
    assert response.status_code == 200
    rows = response.json()
    assert len(rows) == 1500 and rows[-1] == {"id": 1499, "name": "user1499",
                                              "profile": {"bio": "hi"}}
    assert "password_hash" not in response.text


def test_gateway_cuts_a_large_response_in_the_worker_process(gateway):
    """Over 256 KiB the cut runs in the cutter process (apishield/cutter.py): the same
    result, and the access log says it was filtered."""
    response = httpx.get(f"{gateway.url}/users?n=5000")  # ~700 KB
    assert response.status_code == 200
    rows = response.json()
    assert len(rows) == 5000 and rows[-1] == {"id": 4999, "name": "user4999",
                                              "profile": {"bio": "hi"}}
    assert "password_hash" not in response.text
    entry = gateway.log_entry(response.headers["x-request-id"])
    assert entry["reason"] == "response-filtered"
    assert "cutter process died" not in gateway.stderr()


def test_gateway_asks_identity_encoding_for_filtered_operations(gateway, upstream):
    httpx.get(f"{gateway.url}/users?n=1", headers={"Accept-Encoding": "gzip, br"})
    # the test upstream's last request is /users; its headers are in last_request
    names = {k.lower() for k, _ in upstream.last_request["headers"]}
    assert "accept-encoding" not in names


def test_filter_too_large_is_502(make_gateway):
    gw = make_gateway({"responses": {"max_filter_bytes": "100KiB"}})
    response = httpx.get(f"{gw.url}/users?n=3000")
    assert response.status_code == 502
    assert "password_hash" not in response.text


def test_filter_off(make_gateway):
    gw = make_gateway({"responses": {"mode": "off"}})
    assert "password_hash" in httpx.get(f"{gw.url}/users?n=1").text


@pytest.fixture
def demo_upstream():
    from apishield.demo.api import make_server

    server = make_server("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_demo_password_hash_never_reaches_clients(tmp_path, demo_upstream):
    import subprocess

    port = free_port()
    (tmp_path / "apishield.yaml").write_text(yaml.safe_dump({
        "contract": str(DEMO_CONTRACT), "upstream": {"url": demo_upstream},
        "access_log": {"enabled": False},
    }))
    process = subprocess.Popen(
        [sys.executable, "-m", "apishield", "serve", "--config",
         str(tmp_path / "apishield.yaml"), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process)
        direct = httpx.get(f"{demo_upstream}/users/1").json()
        assert "password_hash" in direct  # the demo API leaks it ...
        through = httpx.get(f"http://127.0.0.1:{port}/users/1").json()
        assert "password_hash" not in through  # ... the gateway does not
        assert through == {k: v for k, v in direct.items() if k != "password_hash"}
        # the crash the getting-started table shows reaches the upstream and is masked
        assert "SELECT id" in httpx.get(f"{demo_upstream}/orders/13").text
        crash = httpx.get(f"http://127.0.0.1:{port}/orders/13")
        assert crash.status_code == 500
        assert crash.headers["content-type"] == "application/problem+json"
        assert "SELECT" not in crash.text and "Traceback" not in crash.text
    finally:
        process.terminate()
        process.wait(10)


# -- the shape compiler and the pruning, on small schemas ---------------------------------


def _filter(tmp_path, schemas: dict, response_schema: dict) -> ResponseFilter:
    document = {
        "openapi": "3.1.0", "info": {"title": "t", "version": "1"},
        "paths": {"/x": {"get": {"operationId": "x", "responses": {"200": {
            "description": "ok",
            "content": {"application/json": {"schema": response_schema}}}}}}},
        "components": {"schemas": schemas},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(document))
    config = config_from_dict({"contract": "c.yaml"}, source_dir=tmp_path)
    return ResponseFilter(load_contract(config))


def _shape(flt: ResponseFilter):
    [per_status] = flt.shapes.values()
    return per_status["200"]


def test_write_only_and_undeclared_removed_recursively(tmp_path):
    shape = _shape(_filter(tmp_path, {
        "Node": {"type": "object", "properties": {
            "name": {"type": "string"},
            "secret": {"type": "string", "writeOnly": True},
            "children": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}},
        }},
    }, {"$ref": "#/components/schemas/Node"}))
    document = {"name": "a", "secret": "s", "x": 1,
                "children": [{"name": "b", "secret": "t", "y": 2, "children": []}]}
    assert prune(document, shape) == {"name": "a",
                                      "children": [{"name": "b", "children": []}]}


def test_compositions_keep_the_union_and_open_schemas_keep_all(tmp_path):
    shape = _shape(_filter(tmp_path, {
        "Base": {"type": "object", "properties": {"id": {"type": "integer"}}},
        "Open": {"type": "object", "properties": {"a": {}}, "additionalProperties": True},
    }, {"type": "object", "properties": {
        "both": {"allOf": [{"$ref": "#/components/schemas/Base"},
                           {"type": "object", "properties": {"name": {"type": "string"}}}]},
        "open": {"$ref": "#/components/schemas/Open"},
        "free": {"type": "object"},
    }}))
    document = {"both": {"id": 1, "name": "n", "leak": 1},
                "open": {"a": 1, "b": 2}, "free": {"anything": True}, "extra": 0}
    assert prune(document, shape) == {"both": {"id": 1, "name": "n"},
                                      "open": {"a": 1, "b": 2}, "free": {"anything": True}}


def test_an_object_where_an_array_is_declared_is_logged_once_a_minute(tmp_path, caplog):
    """Filter mode cannot cut an object the contract says is an array: it passes, and the
    log says so (rate-limited), instead of nothing (issue 16)."""
    import logging

    from apishield.exchange import Exchange

    flt = _filter(tmp_path, {}, {"type": "array", "items": {
        "type": "object", "properties": {"id": {"type": "integer"}}}})
    config = config_from_dict({"contract": "c.yaml"}, source_dir=tmp_path)
    operation = load_contract(config).operations[0]
    caplog.set_level(logging.WARNING, logger="apishield")

    def send(body: bytes) -> bytes:
        exchange = Exchange("GET", b"/x", b"", [], "127.0.0.1")
        exchange.operation = operation
        plan = flt.plan_for(exchange, 200, [(b"content-type", b"application/json")])
        assert plan is not None
        return flt.apply(exchange, plan, body)

    assert send(b' {"id": 1, "secret": "s"}') == b' {"id": 1, "secret": "s"}'
    assert send(b'{"id": 2}') == b'{"id": 2}'
    assert send(b'[{"id": 3, "secret": "s"}]') == b'[{"id":3}]'  # an array: cut as declared
    lines = [r.getMessage() for r in caplog.records if "where the contract declares" in
             r.getMessage()]
    assert len(lines) == 1  # the second object is counted, not logged
    assert "is a JSON object where the contract declares an array: passed as it is" in \
        lines[0]
