"""`apishield init`: a starter policy that loads, fails closed and says what is left.

The generated file is checked the way a user meets it: written by the CLI, loaded by
`apishield check`, and served by a real gateway in front of the test upstream, where the
schemes it could not set up refuse and the operations without security are closed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from apishield.audit.rules import run_audit
from apishield.cli.init import is_login_like, starter_policy
from apishield.cli.main import _load_and_compile, main
from apishield.config.loading import read_yaml
from apishield.contract.loader import Operation
from apishield.contract.pattern_dialects import rewrite
from tests.conftest import free_port, wait_for, wait_for_port

CONTRACT: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "shop", "version": "1"},
    "servers": [{"url": "https://api.example.com/v2"}, {"url": "https://sandbox.example.com/v2"}],
    "components": {"securitySchemes": {
        "jwt": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
        "oauth": {"type": "oauth2", "flows": {"password": {
            "tokenUrl": "https://login.example.com/token", "scopes": {"read": "read"}}}},
        "oidc": {"type": "openIdConnect",
                 "openIdConnectUrl": "https://login.example.com/.well-known/openid-configuration"},
        "key": {"type": "apiKey", "in": "query", "name": "api_key"},
        "basic": {"type": "http", "scheme": "basic"},
        "digest": {"type": "http", "scheme": "digest"},
        "unused": {"type": "http", "scheme": "bearer"},
    }},
    "paths": {
        "/echo/orders": {
            "get": {"operationId": "listOrders", "security": [{"jwt": []}],
                    "responses": {"200": {"description": "ok"}}},
            "post": {"operationId": "createOrder", "security": [{"oauth": ["read"]}, {"key": []}],
                     "responses": {"201": {"description": "ok"}}},
        },
        "/echo/me": {"get": {"operationId": "me", "security": [{"oidc": []}],
                        "responses": {"200": {"description": "ok"}}}},
        "/echo/admin/report": {"get": {"operationId": "report", "security": [{"basic": []}],
                                  "responses": {"200": {"description": "ok"}}}},
        "/echo/legacy": {"get": {"operationId": "legacy", "security": [{"digest": []}],
                            "responses": {"200": {"description": "ok"}}}},
        "/echo/health": {"get": {"operationId": "health",
                            "responses": {"200": {"description": "ok"}}}},
        "/echo/status": {"get": {"responses": {"200": {"description": "ok"}}}},
        "/echo/auth/login": {"post": {"operationId": "logIn",
                                 "responses": {"200": {"description": "ok"}}}},
        "/echo/users/password-reset": {"post": {"operationId": "resetPassword", "security": [],
                                           "responses": {"204": {"description": "ok"}}}},
    },
}


@pytest.fixture
def contract(tmp_path: Path) -> Path:
    path = tmp_path / "api" / "openapi.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(CONTRACT, sort_keys=False))
    return path


def run_init(contract: Path, output: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apishield", "init", str(contract), "--output", str(output),
         *extra], capture_output=True, text=True, timeout=60, check=False)


def test_the_starter_loads_and_maps_every_scheme(contract: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "conf" / "apishield.yaml"
    output.parent.mkdir()
    done = run_init(contract, output)
    assert done.returncode == 0, done.stderr
    assert "still yours to decide" in done.stdout
    policy = read_yaml(output)  # YAML 1.2, as apishield reads it (`on` is not `true`)
    assert policy["contract"] == "../api/openapi.yaml"  # relative to the file written
    # the servers disagree on the host only: their shared path is the base path
    assert policy["base_path"] == "/v2"
    modes = {name: spec["mode"] for name, spec in policy["auth"]["schemes"].items()}
    assert modes == {"jwt": "refuse", "oauth": "refuse", "oidc": "refuse", "key": "verify",
                     "basic": "verify", "digest": "refuse"}  # `unused` is used by nobody
    assert "issuers" not in policy["auth"]  # the stanzas to fill in are comments
    text = output.read_text()
    assert "#   jwt:" in text and "https://login.example.com/token" in text
    assert "discovery from https://login.example.com/.well-known/openid-configuration" in text
    assert "prefer a header" in text  # the API key travels in the query string
    assert policy["operations"] == {"health": {"public": False}, "logIn": {"public": False}}
    assert "# GET /echo/status: no operationId" in text
    limit = policy["rate_limiting"]["limits"][0]
    assert limit["pre_auth"] is True and limit["operations"] == ["logIn", "resetPassword"]
    assert policy["rate_limiting"]["bans"]["rules"][0]["on"] == ["authn-failure"]

    assert main(["check", "--config", str(output)]) == 0
    out, err = capsys.readouterr()
    assert "OK (9 operations" in out
    # check says what is still closed: the refused schemes and the unsecured operations
    assert "auth.schemes.jwt.mode: refuse" in err and "auth.schemes.digest.mode" in err
    assert "declares no security and is not marked public" in err
    # what init rate-limits is what `audit` asks a limit for: no such finding is left
    gateway = _load_and_compile(str(output))
    found = {f.rule.id for f in run_audit(gateway.contract, gateway.config, output)}
    assert "credential-endpoint-without-rate-limit" not in found
    assert "no-security" in found  # and the rest of the review still happens


def test_a_starter_is_not_written_over_an_existing_file(contract: Path, tmp_path: Path) -> None:
    output = tmp_path / "apishield.yaml"
    output.write_text("# mine\n")
    done = run_init(contract, output)
    assert done.returncode == 2 and "--force" in done.stderr
    assert output.read_text() == "# mine\n"
    assert run_init(contract, output, "--force").returncode == 0
    assert output.read_text().startswith("# apishield policy for")


def test_a_contract_that_does_not_load_is_reported_not_written(tmp_path: Path) -> None:
    broken = tmp_path / "openapi.yaml"
    broken.write_text(yaml.safe_dump({"openapi": "3.0.3", "info": {"title": "t", "version": "1"},
                                      "paths": {"/a/{x}": {}, "/a/{y}": {}}}))
    output = tmp_path / "apishield.yaml"
    done = run_init(broken, output)
    assert done.returncode == 1
    assert "the same path with different parameter names" in done.stderr
    assert "Paths Object forbids it" in done.stderr
    assert not output.exists()


def test_servers_that_disagree_on_the_path_take_the_first_with_a_note(tmp_path: Path) -> None:
    document = {**CONTRACT, "servers": [{"url": "https://a.example.com/v1"},
                                        {"url": "https://b.example.com/beta"}]}
    path = tmp_path / "openapi.yaml"
    path.write_text(yaml.safe_dump(document))
    starter = starter_policy(path, tmp_path)
    assert yaml.safe_load(starter.text)["base_path"] == "/v1"
    assert any("base_path: the servers disagree" in d for d in starter.decisions)
    assert "# servers: the servers declare different base paths ('/v1', '/beta')" in starter.text


def _operation(method: str, path: str, operation_id: str | None) -> Operation:
    from apishield.config.root import OperationPolicy

    return Operation(method, path, operation_id, "/p", (), False, None, OperationPolicy(), {})


@pytest.mark.parametrize(("method", "path", "operation_id", "expected"), [
    ("POST", "/oauth/token", None, True),
    ("POST", "/v1/sessions", "createSession", True),
    ("POST", "/account", "signIn", True),
    ("POST", "/users/{id}/password", None, True),
    ("POST", "/sign-up", None, True),
    ("POST", "/auth/log-in", None, True),
    ("POST", "/orders", "createOrder", False),
    ("GET", "/oauth/token", None, False),  # credentials are POSTed
    ("POST", "/catalog/{token}", None, False),  # a path parameter's name is not a word
])
def test_login_like_operations(method: str, path: str, operation_id: str | None,
                               expected: bool) -> None:
    assert is_login_like(_operation(method, path, operation_id)) is expected


@pytest.mark.parametrize(("java", "ecma", "matches", "refuses"), [
    (r"\p{Print}+", r"[\x20-\x7E]+", "a b~", "tab\there"),
    (r"^[\-\p{Alnum}_:.]+$", r"^[\-a-zA-Z0-9_:.]+$", "node-1:a_b.c", "node 1"),
    (r"[^\p{Cntrl}]+", r"[^\x00-\x1F\x7F]+", "text", "bell\x07"),
    (r"\P{Digit}+", r"[^0-9]+", "abc", "a1"),
    (r"\p{Punct}", r"[!-\/:-@\[-`{-~]", "~", "a"),
    (r"^\p{LD}+$", r"^[\p{L}\p{Nd}]+$", "", ""),  # Java's letter-or-digit (Unicode)
    (r"\p{L}+", r"\p{L}+", "", ""),  # a Unicode property: ECMA-262 already
    (r"[\P{Digit}]", r"[\P{Digit}]", "", ""),  # no ECMA spelling inside a class: kept
    # ECMA-262 Annex B: a dash beside a class escape is a literal dash
    (r"^[\w-\/.]+$", r"^[\w\-\/.]+$", "role-a/b.c", "role a"),
    (r"^[a-zA-Z\d-_]+$", r"^[a-zA-Z\d\-_]+$", "query-1_a", "query+1"),
    (r"^[a-z0-9-]+$", r"^[a-z0-9-]+$", "", ""),  # an ordinary class: untouched
    (r"[\w-]", r"[\w-]", "", ""),  # a trailing dash is literal everywhere
])
def test_other_dialects_are_read_as_written(java: str, ecma: str, matches: str,
                                                refuses: str) -> None:
    import re

    assert rewrite(java) == ecma
    if matches:
        assert re.fullmatch(ecma, matches) and not re.fullmatch(ecma, refuses)


def test_the_starter_fails_closed_behind_a_real_gateway(contract: Path, tmp_path: Path,
                                                        upstream_url: str) -> None:
    """Served as written: a refused scheme answers 401 even to a well-formed token (a
    security event with reason scheme-refused), an operation without security 403, a
    public one passes, and the scheme init set to verify works with an apishield key.
    (The contract's paths live under the test upstream's /echo.)"""
    output = tmp_path / "apishield.yaml"
    assert run_init(contract, output, "--upstream", upstream_url).returncode == 0
    config = output.read_text()
    config = config.replace('base_path: "/v2"', 'base_path: ""')  # the test upstream's paths
    output.write_text(config)
    created = subprocess.run(
        [sys.executable, "-m", "apishield", "keys", "create", "--config", str(output),
         "--name", "shop-client"],
        capture_output=True, text=True, timeout=60, check=False)
    assert created.returncode == 0, created.stderr
    api_key = created.stdout.strip()  # printed once, alone on standard output
    port = free_port()
    stderr_path = tmp_path / "gateway.stderr"
    with stderr_path.open("wb") as stderr_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "apishield", "serve", "--config", str(output), "--port",
             str(port)], stdout=subprocess.DEVNULL, stderr=stderr_file)
    try:
        wait_for_port(port, process)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10) as client:
            token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl"
            refused = client.get("/echo/orders", headers={"authorization": f"Bearer {token}"})
            assert refused.status_code == 401
            assert client.get("/echo/orders").status_code == 401
            assert client.get("/echo/health").status_code == 403
            assert client.get("/echo/legacy", headers={
                "authorization": 'Digest username="a"'}).status_code == 401
            assert client.post("/echo/users/password-reset").status_code < 400  # security: []
            admitted = client.post("/echo/orders", params={"api_key": api_key})
            assert admitted.status_code < 400, admitted.text
        events = wait_for(lambda: [
            line for line in stderr_path.read_text().splitlines()
            if '"reason":"scheme-refused"' in line.replace(" ", "")])
        assert events
    finally:
        process.terminate()
        process.wait(15)
