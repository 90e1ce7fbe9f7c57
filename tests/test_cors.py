"""CORS: strict allow-list, preflights answered by the gateway, upstream CORS dropped."""

from __future__ import annotations

import httpx
import pytest

from apishield.config import ConfigError, config_from_dict

CORS = {"cors": {"allow_origins": ["https://app.example"], "allow_credentials": True,
                 "allow_headers": ["content-type", "x-trace"]}}


@pytest.fixture
def gw(make_gateway):
    return make_gateway(CORS)


def preflight(gw, path, method="POST", origin="https://app.example", headers="content-type"):
    return httpx.options(f"{gw.url}{path}", headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers})


def test_preflight_answered_by_the_gateway(gw, upstream):
    before = upstream.request_count
    response = preflight(gw, "/echo")
    assert response.status_code == 204 and response.content == b""
    h = response.headers
    assert h["access-control-allow-origin"] == "https://app.example"
    assert h["access-control-allow-methods"] == "POST"
    assert h["access-control-allow-credentials"] == "true"
    assert h["access-control-max-age"] == "600"
    assert h["vary"] == "Origin"
    assert upstream.request_count == before


@pytest.mark.parametrize(("path", "kwargs"), [
    ("/echo", {"origin": "https://evil.example"}),
    ("/echo", {"method": "PATCH"}),            # not declared for /echo in the contract
    ("/echo", {"headers": "x-admin"}),         # header not allowed
    ("/nowhere", {}),                          # path not declared
])
def test_preflight_refused(gw, upstream, path, kwargs):
    response = preflight(gw, path, **kwargs)
    assert response.status_code == 403
    assert response.json()["type"].endswith("cors-refused")
    assert "access-control-allow-methods" not in response.headers


def test_actual_request_gets_headers_only_for_allowed_origins(gw):
    allowed = httpx.get(f"{gw.url}/echo", headers={"Origin": "https://app.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert allowed.headers["access-control-expose-headers"] == "x-request-id"
    other = httpx.get(f"{gw.url}/echo", headers={"Origin": "https://evil.example"})
    assert other.status_code == 200
    assert "access-control-allow-origin" not in other.headers


def test_upstream_cors_headers_are_dropped(gw, gateway):
    # the test upstream answers /cache with `Access-Control-Allow-Origin: *`
    assert httpx.get(f"{gateway.url}/cache").headers["access-control-allow-origin"] == "*"
    evil = httpx.get(f"{gw.url}/cache", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in evil.headers


def test_refusals_carry_cors_headers_so_pages_can_read_them(gw):
    response = httpx.get(f"{gw.url}/slow?ms=abc", headers={"Origin": "https://app.example"})
    assert response.status_code == 400
    assert response.headers["access-control-allow-origin"] == "https://app.example"


def test_wildcard_with_credentials_refused_at_load(tmp_path):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"contract": "c.yaml", "cors": {"allow_origins": ["*"],
                                                         "allow_credentials": True}},
                         source_dir=tmp_path)
    assert any(p.startswith("cors:") and "credentials" in p for p in info.value.problems)


def test_bad_origin_refused_at_load(tmp_path):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"contract": "c.yaml",
                          "cors": {"allow_origins": ["app.example/path"]}},
                         source_dir=tmp_path)
    assert info.value.problems[0].startswith("cors.allow_origins:")


def test_without_cors_config_no_headers_and_options_is_the_contracts(gateway):
    response = httpx.get(f"{gateway.url}/echo", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in response.headers
    assert httpx.options(f"{gateway.url}/echo", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    ).status_code == 405
