"""Response modes per operation: `filter` (cut to the schema), `validate` (a response that
breaks its schema, or an undeclared status, becomes a 502 and one log line), `off`.

Through the real gateway in front of the test upstream (its `/respond/<mode>/<status>/
<kind>` route answers a chosen status with a canned body) and through the middleware in
front of a real Starlette app answering the same way.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from apishield import ApiShieldMiddleware
from apishield.config import config_from_dict
from tests.conftest import json_lines
from tests.upstream_server import CANNED

DATA = Path(__file__).parent / "data" / "responses"
CONTRACT = DATA / "contract.yaml"


def canned(kind: str) -> bytes:
    """The upstream's exact bytes for a canned body (its JSON serializer's)."""
    return json.dumps(CANNED[kind]).encode()


def warnings_for(stderr: str, needle: str) -> list[str]:
    """The messages of the warning lines holding `needle`."""
    return [line["msg"] for line in json_lines(stderr)
            if line["level"] == "warning" and needle in line["msg"]]


def wait_for_log(gw, needle: str, count: int = 1) -> list[str]:
    """The gateway's stderr lines holding `needle`, once at least `count` are there."""
    deadline = time.monotonic() + 3
    while True:
        found = warnings_for(gw.stderr(), needle)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.fixture
def gw(make_gateway):
    return make_gateway(contract=CONTRACT)


# -- through the gateway --------------------------------------------------------------------


def test_validate_conforming_response_passes_byte_identical(gw):
    response = httpx.get(f"{gw.url}/respond/validate/200/conforming")
    assert response.status_code == 200
    assert response.content == canned("conforming")


@pytest.mark.parametrize(("kind", "logged"), [
    ("extra", "/body (unevaluated-properties)"),       # an undeclared property
    ("write-only", "/body/password (false-schema)"),   # writeOnly must not come back out
    ("wrong-type", "/body/id (type)"),
])
def test_validate_nonconforming_response_is_502_and_logged(gw, kind, logged):
    response = httpx.get(f"{gw.url}/respond/validate/200/{kind}")
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "urn:apishield:problem:bad-gateway"
    assert "hunter2" not in response.text and "is_admin" not in response.text
    request_id = response.headers["x-request-id"]
    [line] = wait_for_log(gw, request_id)
    assert "respondValidate" in line and "status 200" in line and logged in line
    assert "hunter2" not in line and "one" not in line.split("contract:")[1]  # no values
    entry = gw.log_entry(request_id)
    assert entry["status"] == 502 and entry["reason"] == "response-invalid"


def test_undeclared_status_is_502_in_validate_mode(gw):
    response = httpx.get(f"{gw.url}/respond/validate/203/conforming")
    assert response.status_code == 502
    assert gw.log_entry(response.headers["x-request-id"])["reason"] == \
        "response-status-undeclared"
    [line] = wait_for_log(gw, "status 203 is not declared")
    assert "respondValidate" in line
    # a declared status without a schema passes as it is, whatever its body
    missing = httpx.get(f"{gw.url}/respond/validate/404/write-only")
    assert missing.status_code == 404 and missing.content == canned("write-only")


def test_undeclared_status_is_logged_once_in_filter_mode(gw):
    first = httpx.get(f"{gw.url}/respond/filter/203/extra")
    assert first.status_code == 203 and first.content == canned("extra")  # no schema: as is
    assert gw.log_entry(first.headers["x-request-id"])["reason"] == \
        "response-status-undeclared"
    for _ in range(5):
        assert httpx.get(f"{gw.url}/respond/filter/203/extra").status_code == 203
    time.sleep(0.3)
    lines = warnings_for(gw.stderr(), "status 203 is not declared")
    assert len(lines) == 1 and "respondFilter" in lines[0]  # rate-limited per op + status
    # another status of the same operation has its own line
    assert httpx.get(f"{gw.url}/respond/filter/201/extra").status_code == 201
    assert len(wait_for_log(gw, "status 201 is not declared")) == 1


def test_filter_mode_still_cuts(gw):
    response = httpx.get(f"{gw.url}/respond/filter/200/write-only")
    assert response.status_code == 200
    assert response.json() == {"id": 1, "name": "ann"}


def test_off_mode_passes_untouched(gw):
    response = httpx.get(f"{gw.url}/respond/off/200/write-only")
    assert response.status_code == 200 and response.content == canned("write-only")


def test_ranges(gw):
    assert httpx.get(f"{gw.url}/respond/ranged/201/conforming").status_code == 201
    assert httpx.get(f"{gw.url}/respond/ranged/201/extra").status_code == 502  # 2XX schema
    teapot = httpx.get(f"{gw.url}/respond/ranged/418/extra")  # 4XX declared, no schema
    assert teapot.status_code == 418 and teapot.content == canned("extra")
    assert httpx.get(f"{gw.url}/respond/ranged/302/conforming").status_code == 502


def test_log_only_never_refuses(gw):
    bad = httpx.get(f"{gw.url}/respond/shadow/200/write-only")
    assert bad.status_code == 200 and bad.content == canned("write-only")
    entry = gw.log_entry(bad.headers["x-request-id"])
    assert entry["outcome"] == "shadowed" and entry["reason"] == "response-invalid"
    assert wait_for_log(gw, bad.headers["x-request-id"])  # the would-be refusal is logged
    undeclared = httpx.get(f"{gw.url}/respond/shadow/203/conforming")
    assert undeclared.status_code == 203
    assert gw.log_entry(undeclared.headers["x-request-id"])["outcome"] == "shadowed"


def test_global_mode_and_operations_override(make_gateway):
    strict = make_gateway({"responses": {"mode": "validate"}}, contract=CONTRACT)
    assert httpx.get(f"{strict.url}/respond/global/200/extra").status_code == 502
    assert httpx.get(f"{strict.url}/respond/global/200/conforming").status_code == 200
    relaxed = make_gateway({"responses": {"mode": "validate"},
                            "operations": {"respondGlobal": {"responses": "off"}}},
                           contract=CONTRACT)
    response = httpx.get(f"{relaxed.url}/respond/global/200/extra")
    assert response.status_code == 200 and response.content == canned("extra")


def test_validate_mode_asks_identity_encoding(gw, upstream):
    httpx.get(f"{gw.url}/respond/validate/200/conforming",
              headers={"Accept-Encoding": "gzip"})
    names = {k.lower() for k, _ in upstream.last_request["headers"]}
    assert "accept-encoding" not in names


def test_old_filter_key_is_refused_with_a_hint(tmp_path):
    from apishield.config import ConfigError

    with pytest.raises(ConfigError) as info:
        config_from_dict({"contract": "c.yaml", "responses": {"filter": False}},
                         source_dir=tmp_path)
    assert "mode: off" in info.value.problems[0]


# -- through the middleware, in front of a real Starlette app ---------------------------------


async def respond(request: Request) -> JSONResponse:
    status = int(request.path_params["status"])
    return JSONResponse(CANNED[request.path_params["kind"]], status_code=status)


async def things(request: Request) -> JSONResponse:
    count = int(request.query_params["n"])
    return JSONResponse([{"id": i, "name": f"t{i}", "created": "2026-01-01"}
                         for i in range(count)])


@pytest.fixture
async def client():
    app = Starlette(routes=[Route("/respond/{mode}/{status}/{kind}", respond),
                            Route("/things", things)])
    config = config_from_dict({"contract": str(CONTRACT), "access_log": {"enabled": False}},
                              source_dir=DATA)
    wrapped = ApiShieldMiddleware(app, config=config)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped),
                                 base_url="http://t") as c:
        yield c


def _app_bytes(kind: str) -> bytes:
    return JSONResponse(CANNED[kind]).body


async def test_middleware_validate(client, caplog):
    caplog.set_level(logging.WARNING, logger="apishield")
    ok = await client.get("/respond/validate/200/conforming")
    assert ok.status_code == 200 and ok.content == _app_bytes("conforming")
    bad = await client.get("/respond/validate/200/write-only")
    assert bad.status_code == 502 and "hunter2" not in bad.text
    logged = [r.getMessage() for r in caplog.records
              if bad.headers["x-request-id"] in r.getMessage()]
    assert len(logged) == 1 and "/body/password (false-schema)" in logged[0]
    assert "hunter2" not in logged[0]
    undeclared = await client.get("/respond/validate/203/conforming")
    assert undeclared.status_code == 502


async def test_middleware_undeclared_status_logged_in_filter_mode(client, caplog):
    caplog.set_level(logging.WARNING, logger="apishield")
    for _ in range(3):
        response = await client.get("/respond/filter/209/conforming")
        assert response.status_code == 209 and response.json() == CANNED["conforming"]
    lines = [r.getMessage() for r in caplog.records
             if "status 209 is not declared" in r.getMessage()]
    assert len(lines) == 1 and "respondFilter" in lines[0]


async def test_middleware_off_and_filter_and_shadow(client):
    off = await client.get("/respond/off/200/write-only")
    assert off.status_code == 200 and off.content == _app_bytes("write-only")
    cut = await client.get("/respond/filter/200/write-only")
    assert cut.json() == {"id": 1, "name": "ann"}
    shadow = await client.get("/respond/shadow/200/extra")
    assert shadow.status_code == 200 and shadow.content == _app_bytes("extra")


def test_validate_streamed_response(make_gateway):
    # ~200 KB: over the 64 KiB the upstream pool hands back whole, so it is read in pieces
    gw = make_gateway({"operations": {"listUsers": {"responses": "validate"}}})
    leaky = httpx.get(f"{gw.url}/users?n=1500")
    assert leaky.status_code == 502 and "argon2" not in leaky.text
    [line] = wait_for_log(gw, leaky.headers["x-request-id"])
    assert "/body/0 (unevaluated-properties)" in line and "argon2" not in line
    assert httpx.get(f"{gw.url}/users?n=0").content == b"[]"


async def test_middleware_validate_is_not_capped_and_allows_read_only(client):
    # the request caps (max_array_items 1000, max_string_length) bound what clients send,
    # not what an API answers; readOnly properties are what responses are for
    response = await client.get("/things?n=1500")
    assert response.status_code == 200, response.text
    assert len(response.json()) == 1500 and response.json()[0]["created"] == "2026-01-01"
