"""Delegated schemes (`auth.schemes.<name>.mode: delegate`, issue 16 part 2): the gateway
checks presence and syntax, passes the credential on unchanged, and counts the upstream's
401/403 as authentication failures. A real gateway in front of the test upstream, whose
`/status/401` refuses like an app verifying its own credentials."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from apishield.config import ConfigError, config_from_dict
from apishield.contract.loader import load_contract
from apishield.pipeline import Pipeline
from tests.conftest import RunningGateway, wait_for

CONTRACT = """
openapi: 3.0.3
info: {title: delegated, version: "1"}
components:
  securitySchemes:
    legacyDigest: {type: http, scheme: digest}
    appBasic: {type: http, scheme: basic}
    partnerKey: {type: apiKey, in: header, name: X-Partner-Key}
    oauthLike: {type: http, scheme: oauth}
security:
  - legacyDigest: []
  - appBasic: []
  - partnerKey: []
paths:
  /echo:
    get:
      operationId: echo
      x-apishield: {strict: false}
      responses: {"200": {description: ok}}
  /status/{code}:
    get:
      operationId: status
      parameters: [{name: code, in: path, required: true, schema: {type: integer}}]
      responses: {"200": {description: ok}}
  /public:
    get: {operationId: public, security: [], responses: {"200": {description: ok}}}
"""

DELEGATED = {"legacyDigest": {"mode": "delegate"}, "appBasic": {"mode": "delegate"},
             "partnerKey": {"mode": "delegate"}}


def start(make_gateway: Any, tmp_path: Path, overrides: dict[str, Any] | None = None
          ) -> RunningGateway:
    path = tmp_path / "delegated.yaml"
    path.write_text(CONTRACT)
    return make_gateway({"auth": {"schemes": DELEGATED}, **(overrides or {})}, contract=path)


def compile_problems(tmp_path: Path, auth: dict[str, Any], contract: str = CONTRACT,
                     operations: dict[str, Any] | None = None) -> list[str]:
    (tmp_path / "c.yaml").write_text(contract)
    try:
        config = config_from_dict({"contract": "c.yaml", "auth": auth,
                                   "operations": operations or {},
                                   "access_log": {"enabled": False}}, source_dir=tmp_path)
        Pipeline(config, load_contract(config))
    except ConfigError as exc:
        return exc.problems
    return []


def test_an_undelegated_scheme_apishield_cannot_verify_says_how_to_delegate(
        tmp_path: Path) -> None:
    problems = compile_problems(tmp_path, {"schemes": {
        "appBasic": {"mode": "delegate"}, "partnerKey": {"mode": "delegate"}}})
    assert len(problems) == 1
    assert "components.securitySchemes.legacyDigest" in problems[0]
    assert "'digest'" in problems[0]
    assert "auth.schemes.legacyDigest: {mode: delegate}" in problems[0]


def test_rules_need_a_verified_scheme(tmp_path: Path) -> None:
    problems = compile_problems(tmp_path, {"schemes": DELEGATED},
                                operations={"echo": {"require": {"roles": ["admin"]}}})
    assert len(problems) == 1
    assert "#/paths/~1echo/get" in problems[0] and "require" in problems[0]
    assert "verified caller" in problems[0]
    # one verified alternative is enough for the rule to mean something
    verified = {**DELEGATED, "appBasic": {"mode": "verify"}}
    assert compile_problems(tmp_path, {"schemes": verified},
                            operations={"echo": {"require": {"roles": ["admin"]}}}) == []


def test_schemes_must_exist_and_mutual_tls_cannot_be_delegated(tmp_path: Path) -> None:
    problems = compile_problems(tmp_path, {"schemes": {**DELEGATED, "nope": {"mode":
                                                                             "delegate"}}})
    assert problems == [problems[0]] and problems[0].startswith("auth.schemes.nope:")
    mtls = CONTRACT.replace("openapi: 3.0.3", "openapi: 3.1.0").replace(
        "oauthLike: {type: http, scheme: oauth}", "certs: {type: mutualTLS}")
    problems = compile_problems(tmp_path, {"schemes": {**DELEGATED, "certs": {
        "mode": "delegate"}}}, contract=mtls)
    assert any("auth.schemes.certs.mode" in p and "TLS connection ends" in p
               for p in problems)


def test_check_warns_for_each_delegated_scheme(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(CONTRACT)
    config = tmp_path / "apishield.yaml"
    config.write_text("contract: c.yaml\nupstream: {url: 'http://127.0.0.1:9'}\n"
                      "auth:\n  schemes:\n"
                      + "".join(f"    {name}: {{mode: delegate}}\n" for name in DELEGATED))
    done = subprocess.run([sys.executable, "-m", "apishield", "check", "-c", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "delegated" in line]
    assert len(warnings) == 3  # oauthLike is declared but used by no operation
    assert all("the upstream verifies it; apishield only checks it is present" in w
               for w in warnings)


def test_presence_and_syntax_are_checked_and_the_credential_passes_unchanged(
        make_gateway: Any, tmp_path: Path) -> None:
    gateway = start(make_gateway, tmp_path)
    digest = 'Digest username="alice", realm="app", nonce="abc", response="0123abcd"'
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        missing = client.get("/echo")
        assert missing.status_code == 401
        challenges = missing.headers.get_list("www-authenticate")
        assert 'Digest realm="api"' in challenges and 'Basic realm="api"' in challenges
        assert 'ApiKey realm="api"' in challenges

        passed = client.get("/echo", headers={"Authorization": digest,
                                              "X-Apishield-Subject": "forged"})
        assert passed.status_code == 200
        seen = {k.lower(): v for k, v in passed.json()["headers"]}
        assert seen["authorization"] == digest  # unchanged
        assert not [k for k in seen if k.startswith("x-apishield-")]  # no verified caller

        user = base64.b64encode(b"alice:whatever the app checks").decode()
        assert client.get("/echo", headers={"Authorization": f"Basic {user}"}
                          ).status_code == 200
        assert client.get("/echo", headers={"X-Partner-Key": "pk_live_0123456789"}
                          ).status_code == 200

        malformed = [client.get("/echo", headers=headers) for headers in (
            {"Authorization": "Basic bm9jb2xvbg=="},  # base64 of a value without ':'
            {"Authorization": "Digest"},  # nothing after the scheme
            {"X-Partner-Key": ""},
            {"X-Partner-Key": "k" * 9000},
        )]
    assert [m.status_code for m in malformed] == [401] * 4
    reasons = [e["reason"] for e in gateway.security_events("authn-failure")]
    assert reasons.count("delegated-malformed") == 4


def test_upstream_refusals_count_as_authentication_failures_and_ban(
        make_gateway: Any, tmp_path: Path) -> None:
    gateway = start(make_gateway, tmp_path, {"rate_limiting": {"bans": {"rules": [{
        "name": "upstream-says-no", "on": "authn-failure", "threshold": 3, "window": "1m",
        "duration": "10m"}]}}})
    wrong = {"X-Partner-Key": "pk_wrong_0123456789"}
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        refused = [client.get(f"/status/{code}", headers=wrong) for code in (401, 403, 401)]
        assert [r.status_code for r in refused] == [401, 403, 401]  # the upstream's answers
        assert wait_for(lambda: client.get("/public").status_code == 403)  # banned
    events = wait_for(lambda: len(gateway.security_events("authn-failure")) >= 3
                      and gateway.security_events("authn-failure"))
    assert [(e["reason"], e["scheme"]) for e in events[:3]] == [
        ("upstream-401", "partnerKey"), ("upstream-403", "partnerKey"),
        ("upstream-401", "partnerKey")]
    assert gateway.security_events("ban")[0]["rule"] == "upstream-says-no"


@pytest.mark.parametrize("scheme", ["mutual", "oauth", "digest"])
def test_other_http_schemes_need_their_name_in_authorization(
        tmp_path: Path, scheme: str) -> None:
    from apishield.auth.authenticators import DelegatedAuthenticator
    from apishield.auth.principal import AuthFailure
    from apishield.exchange import Exchange

    authenticator = DelegatedAuthenticator("s", {"type": "http", "scheme": scheme}, "api")
    name = "Digest" if scheme == "digest" else scheme
    assert authenticator.challenge == f'{name} realm="api"'

    def request(value: bytes | None) -> Exchange:
        headers = [] if value is None else [(b"authorization", value)]
        return Exchange("GET", b"/", b"", headers, "127.0.0.1")

    assert authenticator.credential(request(None)) is None
    assert authenticator.credential(request(b"Bearer abc")) is None  # another scheme's
    assert authenticator.credential(request(scheme.upper().encode() + b" x=1")) == ""
    with pytest.raises(AuthFailure):
        authenticator.credential(request(scheme.encode() + b" a\x01b"))
