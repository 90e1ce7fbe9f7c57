"""Authentication and authorization through the real gateway (issue 3, checklist A1-A8).

A real issuer (tests/issuer_server.py: OIDC discovery, JWKS, introspection) and the real
upstream run on 127.0.0.1; the gateway runs as `apishield serve`; API keys are created
and revoked with the real `apishield keys` CLI. Every test asserts what reached the
upstream (or that nothing did), not only the status code.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import RunningGateway, start_gateway
from tests.issuer_server import (
    AUDIENCE,
    CLIENT_SECRET,
    IssuerServer,
    b64,
    forge,
    start_issuer,
    stop_issuer,
)
from tests.upstream_server import UpstreamServer

CONTRACT = """
openapi: 3.1.0
info: {title: auth test, version: "1"}
paths:
  /echo/public:
    get: {operationId: public, security: [], responses: {"200": {description: ok}}}
  /echo/nosec:
    get: {operationId: nosec, responses: {"200": {description: ok}}}
  /echo/token:
    get:
      operationId: token
      security: [{bearer: [read]}]
      responses: {"200": {description: ok}}
  /echo/write:
    get:
      operationId: write
      security: [{bearer: [admin]}]
      responses: {"200": {description: ok}}
  /echo/either:
    get:
      operationId: either
      security: [{bearer: []}, {apiKey: []}]
      responses: {"200": {description: ok}}
  /echo/key:
    get:
      operationId: key
      security: [{apiKey: [reports]}]
      responses: {"200": {description: ok}}
  /echo/qkey:
    get:
      operationId: qkey
      security: [{queryKey: []}]
      parameters: [{name: page, in: query, schema: {type: integer}}]
      responses: {"200": {description: ok}}
  /echo/optional:
    get:
      operationId: optional
      security: [{}, {bearer: []}]
      responses: {"200": {description: ok}}
  /echo/admin:
    get:
      operationId: admin
      security: [{bearer: []}]
      x-apishield: {require: {roles: [admin]}}
      responses: {"200": {description: ok}}
  /echo/reports:
    get:
      operationId: reports
      security: [{bearer: []}, {apiKey: []}]
      x-apishield: {require: {permissions: ["reports:read"]}}
      responses: {"200": {description: ok}}
  /echo/users/{user_id}/orders:
    get:
      operationId: userOrders
      security: [{bearer: []}]
      parameters: [{name: user_id, in: path, required: true, schema: {type: string}}]
      x-apishield: {owner: {param: path.user_id, equals: subject, bypass_roles: [support]}}
      responses: {"200": {description: ok}}
  /echo/transfers:
    post:
      operationId: transfer
      security: [{bearer: []}]
      x-apishield: {owner: {param: body.account.owner, equals: subject}}
      requestBody:
        required: true
        content:
          application/json:
            schema:
              type: object
              required: [account, amount]
              properties:
                account:
                  type: object
                  required: [owner]
                  properties: {owner: {type: string, maxLength: 64}}
                amount: {type: integer}
      responses: {"200": {description: ok}}
  /echo/oidc:
    get:
      operationId: oidc
      security: [{oidc: []}]
      responses: {"200": {description: ok}}
  /echo/opaque:
    get:
      operationId: opaque
      security: [{opaque: []}]
      responses: {"200": {description: ok}}
components:
  securitySchemes:
    bearer: {type: http, scheme: bearer, bearerFormat: JWT}
    oidc: {type: openIdConnect, openIdConnectUrl: "ISSUER/.well-known/openid-configuration"}
    opaque: {type: http, scheme: bearer}
    apiKey: {type: apiKey, in: header, name: X-Api-Key}
    queryKey: {type: apiKey, in: query, name: api_key}
"""


@pytest.fixture(scope="module")
def issuer() -> Iterator[IssuerServer]:
    server = start_issuer()
    yield server
    stop_issuer(server)


def _write_contract(workdir: Path, issuer: IssuerServer) -> Path:
    path = workdir / "auth-contract.yaml"
    path.write_text(CONTRACT.replace("ISSUER", issuer.url))
    return path


def _auth_config(issuer: IssuerServer, secret_file: Path) -> dict[str, Any]:
    return {
        "issuers": {
            "corp": {
                "issuer": issuer.issuer,
                "schemes": ["bearer", "oidc"],
                "discovery": True,
                "audiences": [AUDIENCE],
                "algorithms": ["RS256", "ES256", "EdDSA"],
                "role_claims": ["roles", "realm_access.roles"],
                "jwks": {"unknown_kid_cooldown": "1s", "fetch_timeout": "2s"},
            },
            "legacy": {
                "issuer": "urn:legacy",
                "schemes": ["opaque"],
                "introspection": {
                    "url": f"{issuer.url}/introspect",
                    "client_id": "gateway",
                    "client_secret": {"file": str(secret_file)},
                    "timeout": "2s",
                },
            },
        },
        "roles": {"analyst": ["reports:read"], "admin": ["*"]},
    }


@pytest.fixture(scope="module")
def auth_gateway(tmp_path_factory: pytest.TempPathFactory, upstream_url: str,
                 issuer: IssuerServer) -> Iterator[RunningGateway]:
    workdir = tmp_path_factory.mktemp("authgw")
    secret_file = workdir / "introspection.secret"
    secret_file.write_text(CLIENT_SECRET)
    running = start_gateway(workdir, upstream_url, {"auth": _auth_config(issuer, secret_file)},
                            contract=_write_contract(workdir, issuer))
    yield running
    running.stop()


def keys_cli(gateway: RunningGateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apishield", "keys", *args, "--config", str(gateway.config_path)],
        capture_output=True, text=True, timeout=30, check=False,
    )


def create_key(gateway: RunningGateway, *args: str) -> tuple[str, str]:
    """(key, id) of a new API key made by the real CLI."""
    result = keys_cli(gateway, "create", *args)
    assert result.returncode == 0, result.stderr
    key = result.stdout.splitlines()[0].strip()
    key_id = key.split("_")[1]
    return key, key_id


def seen(response: httpx.Response) -> dict[str, str]:
    """The headers the upstream received (it echoes them), lower-cased."""
    assert response.status_code == 200, response.text
    return {k.lower(): v for k, v in response.json()["headers"]}


def token_header(token: str) -> dict[str, Any]:
    import base64

    part = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- fail-safe defaults ------------------------------------------------------------------

def test_public_operation_needs_nothing_and_client_identity_is_stripped(auth_gateway):
    response = httpx.get(f"{auth_gateway.url}/echo/public",
                         headers={"X-Apishield-Subject": "root", "X_Apishield_Roles": "admin"})
    headers = seen(response)
    assert not any(name.replace("_", "-").startswith("x-apishield-") for name in headers)


def test_operation_without_security_is_refused_to_everyone(auth_gateway, upstream, issuer):
    before = upstream.request_count
    response = httpx.get(f"{auth_gateway.url}/echo/nosec", headers=bearer(issuer.mint()))
    assert response.status_code == 403
    assert response.json()["type"] == "urn:apishield:problem:not-public"
    assert upstream.request_count == before


def test_check_lists_operations_without_security_as_warnings(auth_gateway):
    result = subprocess.run(
        [sys.executable, "-m", "apishield", "check", "--config", str(auth_gateway.config_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "not marked public" in line]
    assert len(warnings) == 1 and "/paths/~1echo~1nosec/get" in warnings[0]


# -- bearer JWTs -------------------------------------------------------------------------

def test_missing_token_is_401_with_a_bearer_challenge_and_nothing_forwarded(
        auth_gateway, upstream):
    before = upstream.request_count
    response = httpx.get(f"{auth_gateway.url}/echo/token")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="api"'
    assert response.json()["type"] == "urn:apishield:problem:unauthorized"
    assert upstream.request_count == before


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_valid_token_reaches_upstream_with_verified_identity(auth_gateway, issuer, alg):
    token = issuer.mint(alg, sub="alice", scope="read write")
    headers = seen(httpx.get(f"{auth_gateway.url}/echo/token", headers={
        **bearer(token), "X-Apishield-Subject": "mallory"}))
    assert headers["x-apishield-subject"] == "alice"
    assert headers["x-apishield-scopes"] == "read,write"
    assert headers["authorization"] == f"Bearer {token}"


def test_every_invalid_token_gets_the_same_answer_and_a_precise_private_reason(
        auth_gateway, upstream, issuer):
    now = int(time.time())
    rsa = issuer.key("RS256")
    header = {"alg": "RS256", "kid": rsa.kid, "typ": "JWT"}
    good = issuer.mint("RS256")
    cases = {
        "jwt-expired": issuer.mint(iat=now - 600, exp=now - 300),
        "jwt-wrong-audience": issuer.mint(aud="https://other-api.example.test"),
        "jwt-wrong-issuer": issuer.mint(iss="https://evil.example.test"),
        "jwt-lifetime-too-long": issuer.mint(iat=now, exp=now + 3 * 86400),
        "jwt-alg-not-allowed": forge({"alg": "none", "typ": "JWT"}, issuer.claims(), b""),
        "jwt-bad-signature": good[:-6] + ("AAAAAA" if not good.endswith("AAAAAA") else "BBBBBB"),
        "jwt-header-key": forge({**header, "jku": "https://evil.example.test/jwks"},
                                issuer.claims(), b"x" * 256),
    }
    before = upstream.request_count
    bodies = {}
    for expected, token in cases.items():
        response = httpx.get(f"{auth_gateway.url}/echo/token", headers=bearer(token))
        assert response.status_code == 401, expected
        assert response.headers["www-authenticate"] == 'Bearer realm="api", error="invalid_token"'
        body = response.json()
        request_id = body.pop("instance").rsplit(":", 1)[1]
        bodies[expected] = body
        entry = auth_gateway.log_entry(request_id)
        assert entry["reason"] == expected, (expected, entry)
    assert upstream.request_count == before
    assert len({json.dumps(b, sort_keys=True) for b in bodies.values()}) == 1  # no oracle
    events = auth_gateway.security_events("authn-failure")
    assert {e["reason"] for e in events} >= set(cases)
    assert all(good not in line for line in auth_gateway.stderr().splitlines())


def test_hs256_signed_with_the_rsa_public_key_is_refused(auth_gateway, issuer):
    """RS256 -> HS256 key confusion (CVE-2015-9235 class)."""
    import hashlib
    import hmac

    rsa = issuer.key("RS256")
    header = b64(json.dumps({"alg": "HS256", "kid": rsa.kid, "typ": "JWT"}).encode())
    payload = b64(json.dumps(issuer.claims()).encode())
    signature = hmac.new(rsa.public_pem(), f"{header}.{payload}".encode(),
                         hashlib.sha256).digest()
    token = f"{header}.{payload}.{b64(signature)}"
    response = httpx.get(f"{auth_gateway.url}/echo/token", headers=bearer(token))
    assert response.status_code == 401


def test_missing_scope_is_403_insufficient_scope(auth_gateway, upstream, issuer):
    before = upstream.request_count
    response = httpx.get(f"{auth_gateway.url}/echo/write",
                         headers=bearer(issuer.mint(scope="read")))
    assert response.status_code == 403
    assert response.json()["type"] == "urn:apishield:problem:access-denied"
    assert 'error="insufficient_scope"' in response.headers["www-authenticate"]
    assert 'scope="admin"' in response.headers["www-authenticate"]
    assert upstream.request_count == before


def test_scopes_as_an_array_claim_count_too(auth_gateway, issuer):
    token = issuer.mint(scope=None, scp=["admin"])
    assert httpx.get(f"{auth_gateway.url}/echo/write", headers=bearer(token)).status_code == 200


def test_openid_connect_scheme_uses_discovery(auth_gateway, issuer):
    headers = seen(httpx.get(f"{auth_gateway.url}/echo/oidc",
                             headers=bearer(issuer.mint("ES256", sub="carol"))))
    assert headers["x-apishield-subject"] == "carol"
    assert issuer.count("/.well-known/openid-configuration") >= 1


def test_key_rotation_at_the_issuer_is_picked_up_without_restart(auth_gateway, issuer):
    fetches = issuer.count("/jwks.json")
    _, new_kid = issuer.rotate("ES256")
    token = issuer.mint("ES256", sub="rotated")
    assert new_kid in token_header(token)["kid"]
    headers = seen(httpx.get(f"{auth_gateway.url}/echo/token", headers=bearer(token)))
    assert headers["x-apishield-subject"] == "rotated"
    assert issuer.count("/jwks.json") == fetches + 1


def test_a_flood_of_unknown_kids_costs_the_issuer_one_fetch_per_cooldown(auth_gateway, issuer):
    time.sleep(1.1)  # past the cooldown of earlier tests
    fetches = issuer.count("/jwks.json")
    with httpx.Client() as client:
        for _ in range(30):
            token = issuer.mint("RS256", kid=f"junk-{uuid.uuid4().hex}")
            response = client.get(f"{auth_gateway.url}/echo/token", headers=bearer(token))
            assert response.status_code == 401
    assert issuer.count("/jwks.json") - fetches <= 2


def test_token_cache_serves_repeat_requests(auth_gateway, issuer):
    token = issuer.mint("RS256", sub="cached")
    with httpx.Client() as client:
        for _ in range(20):
            headers = seen(client.get(f"{auth_gateway.url}/echo/token", headers=bearer(token)))
            assert headers["x-apishield-subject"] == "cached"
    events = [e for e in auth_gateway.security_events("authn-success")
              if e["subject"] == "cached"]
    assert len(events) == 1  # verified once, then served from the cache


def test_subject_with_control_characters_cannot_inject_upstream_headers(auth_gateway, issuer):
    token = issuer.mint("RS256", sub="eve\r\nX-Injected: 1")
    headers = seen(httpx.get(f"{auth_gateway.url}/echo/token", headers=bearer(token)))
    assert "x-injected" not in headers
    assert headers["x-apishield-subject"] == "eve%0D%0AX-Injected:%201"


def test_optional_auth_admits_anonymous_but_not_invalid_tokens(auth_gateway, issuer):
    anonymous = seen(httpx.get(f"{auth_gateway.url}/echo/optional"))
    assert "x-apishield-subject" not in anonymous
    named = seen(httpx.get(f"{auth_gateway.url}/echo/optional",
                           headers=bearer(issuer.mint(sub="dave"))))
    assert named["x-apishield-subject"] == "dave"
    bad = httpx.get(f"{auth_gateway.url}/echo/optional",
                    headers=bearer(issuer.mint(aud="someone-else")))
    assert bad.status_code == 401


# -- opaque tokens -----------------------------------------------------------------------

def test_opaque_token_is_introspected_and_cached(auth_gateway, issuer):
    token = uuid.uuid4().hex
    issuer.tokens[token] = {"active": True, "sub": "opaque-user", "scope": "read",
                            "exp": int(time.time()) + 300, "client_id": "app"}
    before = len(issuer.introspected)
    for _ in range(3):
        headers = seen(httpx.get(f"{auth_gateway.url}/echo/opaque", headers=bearer(token)))
        assert headers["x-apishield-subject"] == "opaque-user"
    assert len(issuer.introspected) - before == 1
    inactive = uuid.uuid4().hex
    response = httpx.get(f"{auth_gateway.url}/echo/opaque", headers=bearer(inactive))
    assert response.status_code == 401
    entry = auth_gateway.log_entry(response.json()["instance"].rsplit(":", 1)[1])
    assert entry["reason"] == "token-inactive"


# -- API keys ----------------------------------------------------------------------------

def test_api_key_lifecycle_through_the_gateway(auth_gateway, upstream):
    key, key_id = create_key(auth_gateway, "--name", "billing", "--scope", "reports")
    headers = seen(httpx.get(f"{auth_gateway.url}/echo/key", headers={"X-Api-Key": key}))
    assert headers["x-apishield-subject"] == "billing"
    assert headers["x-apishield-key-id"] == key_id
    assert headers["x-apishield-scopes"] == "reports"
    # a key without the scope the requirement names
    plain, _ = create_key(auth_gateway, "--name", "plain")
    assert httpx.get(f"{auth_gateway.url}/echo/key",
                     headers={"X-Api-Key": plain}).status_code == 403
    # a wrong secret for an existing id
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    assert httpx.get(f"{auth_gateway.url}/echo/key",
                     headers={"X-Api-Key": forged}).status_code == 401
    # revoked with the CLI while the gateway runs: refused within about a second
    assert keys_cli(auth_gateway, "revoke", key_id).returncode == 0
    deadline = time.monotonic() + 5
    status = 200
    while time.monotonic() < deadline and status == 200:
        status = httpx.get(f"{auth_gateway.url}/echo/key", headers={"X-Api-Key": key}).status_code
        time.sleep(0.1)
    assert status == 401


def test_api_key_rotation_keeps_both_keys_during_the_grace(auth_gateway):
    old, old_id = create_key(auth_gateway, "--name", "rotating", "--scope", "reports")
    result = keys_cli(auth_gateway, "rotate", old_id, "--grace", "2s")
    assert result.returncode == 0, result.stderr
    new = result.stdout.splitlines()[0].strip()
    for key in (old, new):
        assert httpx.get(f"{auth_gateway.url}/echo/key",
                         headers={"X-Api-Key": key}).status_code == 200
    time.sleep(2.5)
    assert httpx.get(f"{auth_gateway.url}/echo/key", headers={"X-Api-Key": old}).status_code == 401
    assert httpx.get(f"{auth_gateway.url}/echo/key", headers={"X-Api-Key": new}).status_code == 200


def test_api_key_in_query_is_accepted_in_strict_mode(auth_gateway):
    key, _ = create_key(auth_gateway, "--name", "query-user")
    response = httpx.get(f"{auth_gateway.url}/echo/qkey", params={"api_key": key, "page": "2"})
    assert seen(response)["x-apishield-subject"] == "query-user"
    assert httpx.get(f"{auth_gateway.url}/echo/qkey",
                     params={"api_key": key, "other": "1"}).status_code == 400


def test_either_alternative_admits(auth_gateway, issuer):
    key, _ = create_key(auth_gateway, "--name", "either-key")
    assert seen(httpx.get(f"{auth_gateway.url}/echo/either",
                          headers={"X-Api-Key": key}))["x-apishield-subject"] == "either-key"
    assert seen(httpx.get(f"{auth_gateway.url}/echo/either",
                          headers=bearer(issuer.mint(sub="t"))))["x-apishield-subject"] == "t"
    missing = httpx.get(f"{auth_gateway.url}/echo/either")
    assert missing.status_code == 401
    assert missing.headers.get_list("www-authenticate") == ['Bearer realm="api"',
                                                           'ApiKey realm="api"']


# -- authorization -----------------------------------------------------------------------

def test_required_role(auth_gateway, issuer):
    assert httpx.get(f"{auth_gateway.url}/echo/admin",
                     headers=bearer(issuer.mint(roles=["user"]))).status_code == 403
    assert httpx.get(f"{auth_gateway.url}/echo/admin",
                     headers=bearer(issuer.mint(realm_access={"roles": ["admin"]}))
                     ).status_code == 200


def test_permissions_come_from_roles_or_scopes_and_nothing_else(auth_gateway, issuer):
    url = f"{auth_gateway.url}/echo/reports"
    assert httpx.get(url, headers=bearer(issuer.mint(roles=["analyst"]))).status_code == 200
    assert httpx.get(url, headers=bearer(issuer.mint(scope="reports:read"))).status_code == 200
    assert httpx.get(url, headers=bearer(issuer.mint(roles=["viewer"]))).status_code == 403
    key, _ = create_key(auth_gateway, "--name", "analyst-key", "--role", "analyst")
    assert httpx.get(url, headers={"X-Api-Key": key}).status_code == 200
    weak, _ = create_key(auth_gateway, "--name", "weak-key")
    assert httpx.get(url, headers={"X-Api-Key": weak}).status_code == 403


def test_ownership_of_a_path_object(auth_gateway, upstream, issuer):
    alice = bearer(issuer.mint(sub="alice"))
    assert httpx.get(f"{auth_gateway.url}/echo/users/alice/orders",
                     headers=alice).status_code == 200
    before = upstream.request_count
    response = httpx.get(f"{auth_gateway.url}/echo/users/bob/orders", headers=alice)
    assert response.status_code == 403
    assert upstream.request_count == before
    entry = auth_gateway.log_entry(response.json()["instance"].rsplit(":", 1)[1])
    assert entry["reason"] == "not-owner"
    support = bearer(issuer.mint(sub="sam", roles=["support"]))
    assert httpx.get(f"{auth_gateway.url}/echo/users/bob/orders",
                     headers=support).status_code == 200


def test_ownership_of_a_body_field(auth_gateway, upstream, issuer):
    alice = bearer(issuer.mint(sub="alice"))
    url = f"{auth_gateway.url}/echo/transfers"
    ok = httpx.post(url, headers=alice, json={"account": {"owner": "alice"}, "amount": 5})
    assert ok.status_code == 200
    before = upstream.request_count
    theft = httpx.post(url, headers=alice, json={"account": {"owner": "bob"}, "amount": 5})
    assert theft.status_code == 403
    assert upstream.request_count == before
    # a body that breaks the schema is a 422 before ownership is even asked
    assert httpx.post(url, headers=alice, json={"amount": 5}).status_code == 422


def test_shadow_mode_logs_auth_refusals_and_forwards(tmp_path, upstream_url, issuer, upstream):
    secret_file = tmp_path / "secret"
    secret_file.write_text(CLIENT_SECRET)
    running = start_gateway(tmp_path, upstream_url,
                            {"auth": _auth_config(issuer, secret_file), "mode": "log-only"},
                            contract=_write_contract(tmp_path, issuer))
    try:
        response = httpx.get(f"{running.url}/echo/token")
        headers = seen(response)
        assert "x-apishield-subject" not in headers
        entry = running.log_entry(response.headers["x-request-id"])
        assert entry["outcome"] == "shadowed" and "credentials-missing" in entry["reason"]
    finally:
        running.stop()


def test_auth_config_errors_are_located(tmp_path, issuer):
    contract = _write_contract(tmp_path, issuer)
    config = {"contract": contract.name, "upstream": {"url": "http://127.0.0.1:9"},
              "auth": {"issuers": {"x": {"issuer": "a", "algorithms": ["none"],
                                         "jwks_url": "ftp://x"}}}}
    path = tmp_path / "apishield.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "apishield", "check", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "auth.issuers.x.algorithms: `none` is never accepted" in result.stderr
    # no issuer at all: the contract's bearer schemes cannot be verified
    config["auth"] = {}
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "apishield", "check", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "components.securitySchemes.bearer: used by" in result.stderr


def test_unknown_scheme_in_a_requirement_is_a_load_error(tmp_path):
    contract = tmp_path / "c.yaml"
    contract.write_text(yaml.safe_dump({
        "openapi": "3.0.3", "info": {"title": "t", "version": "1"},
        "paths": {"/a": {"get": {"security": [{"bearerr": []}],
                                 "responses": {"200": {"description": "ok"}}}}}}))
    path = tmp_path / "apishield.yaml"
    path.write_text(yaml.safe_dump({"contract": "c.yaml",
                                    "upstream": {"url": "http://127.0.0.1:9"}}))
    result = subprocess.run([sys.executable, "-m", "apishield", "check", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "no security scheme named 'bearerr'" in result.stderr


_ = UpstreamServer  # fixture type, imported for readers


# -- the ASGI middleware runs the same authentication --------------------------------------

async def test_middleware_authenticates_and_passes_identity_in_the_scope(tmp_path, issuer):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from apishield import ApiShieldMiddleware
    from apishield.config import config_from_dict

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"headers": [[k, v] for k, v in request.headers.items()]})

    app = Starlette(routes=[Route("/echo/{rest:path}", echo)])
    secret_file = tmp_path / "secret"
    secret_file.write_text(CLIENT_SECRET)
    _write_contract(tmp_path, issuer)
    config = config_from_dict({"contract": "auth-contract.yaml",
                               "auth": _auth_config(issuer, secret_file)},
                              source_dir=tmp_path)
    wrapped = ApiShieldMiddleware(app, config)
    transport = httpx.ASGITransport(app=wrapped)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        missing = await client.get("/echo/token")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == 'Bearer realm="api"'
        # a key rotated after the middleware fetched its keys: the suspended path
        await client.get("/echo/token", headers=bearer(issuer.mint("EdDSA")))
        issuer.rotate("EdDSA")
        response = await client.get("/echo/token", headers={
            **bearer(issuer.mint("EdDSA", sub="mw-user")), "X-Apishield-Subject": "forged"})
        headers = seen(response)
        assert headers["x-apishield-subject"] == "mw-user"
        denied = await client.get("/echo/users/bob/orders",
                                  headers=bearer(issuer.mint(sub="alice")))
        assert denied.status_code == 403
    await wrapped.pipeline.stop()


def test_access_log_names_the_verified_caller(auth_gateway, issuer):
    response = httpx.get(f"{auth_gateway.url}/echo/token",
                         headers=bearer(issuer.mint(sub="logged-user")))
    entry = auth_gateway.log_entry(response.headers["x-request-id"])
    assert entry["subject"] == "logged-user" and entry["key_id"] is None
    assert "eyJ" not in auth_gateway.access_log.read_text()  # no token ever


def test_serve_refuses_to_start_with_a_world_readable_pepper(tmp_path, issuer):
    secret_file = tmp_path / "secret"
    secret_file.write_text(CLIENT_SECRET)
    contract = _write_contract(tmp_path, issuer)
    pepper = tmp_path / "pepper"
    pepper.write_text("p" * 43)
    pepper.chmod(0o644)
    auth = _auth_config(issuer, secret_file)
    auth["api_keys"] = {"pepper": {"file": "pepper"}}
    path = tmp_path / "apishield.yaml"
    path.write_text(yaml.safe_dump({"contract": contract.name, "auth": auth,
                                    "upstream": {"url": "http://127.0.0.1:9"}}))
    result = subprocess.run(
        [sys.executable, "-m", "apishield", "serve", "--config", str(path), "--port", "0"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert "auth.api_keys.pepper" in result.stderr and "readable" in result.stderr
    assert "Traceback" not in result.stderr
