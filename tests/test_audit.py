"""`apishield audit` (issue 15, G1): one small contract (and config) per rule, positive and
negative; the three output formats (SARIF checked against the official 2.1.0 schema);
exit codes; locations with lines; a large generated contract.

The command runs in-process through `apishield.cli.main.main` (the real parser and
handler; nothing is mocked); one test runs it as a subprocess like CI would.
"""

from __future__ import annotations

import copy
import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from apishield.audit import RULES
from apishield.cli.main import main

DATA = Path(__file__).resolve().parent / "data" / "audit"
SARIF_SCHEMA = DATA / "sarif-schema-2.1.0.json"

ISSUER = {"issuer": "https://id.example.com", "audiences": ["api"], "algorithms": ["RS256"],
          "jwks_url": "https://id.example.com/jwks"}

CLEAN: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "t", "version": "1"},
    "servers": [{"url": "https://api.example.com/v1"}],
    "paths": {"/pets": {"get": {
        "operationId": "listPets",
        "security": [{"bearer": []}],
        "parameters": [{"name": "limit", "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100}}],
        "responses": {
            "200": {"description": "ok", "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False,
                "properties": {"name": {"type": "string", "maxLength": 50}}}}}},
            "401": {"description": "no credential"},
            "403": {"description": "not allowed"},
        },
    }}},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
}


def merge(base: Any, patch: Any) -> Any:
    """`patch` deep-merged into a copy of `base` (None deletes a key)."""
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


def audit(tmp_path: Path, contract: dict[str, Any], config: dict[str, Any] | None = None,
          *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    """Run `apishield audit --format json` on these documents; (exit code, report)."""
    contract_file = tmp_path / "openapi.yaml"
    contract_file.write_text(yaml.safe_dump(contract, sort_keys=False))
    argv = ["audit", str(contract_file), "--format", "json", *args]
    if config is not None:
        config_file = tmp_path / "apishield.yaml"
        config_file.write_text(yaml.safe_dump({"contract": "openapi.yaml", **config}))
        argv += ["--config", str(config_file)]
    code = main(argv)
    captured = capsys.readouterr()
    assert code != 2, captured.err
    return code, json.loads(captured.out)


def rules_of(report: dict[str, Any]) -> set[str]:
    return {finding["rule"] for finding in report["findings"]}


def op(**patch: Any) -> dict[str, Any]:
    """A patch to the clean operation GET /pets."""
    return {"paths": {"/pets": {"get": patch}}}


def extra(path: str, method: str, operation: dict[str, Any]) -> dict[str, Any]:
    """A patch adding one operation (with the clean one's 401/403 answers)."""
    base = {"responses": {"200": {"description": "ok"}, "401": {"description": "x"},
                          "403": {"description": "x"}}}
    return {"paths": {path: {method: merge(base, operation)}}}


def body(schema: dict[str, Any]) -> dict[str, Any]:
    return extra("/things", "post", {"operationId": "createThing", "security": [{"bearer": []}],
                                     "requestBody": {"content": {"application/json": {
                                         "schema": schema}}}})


OBJECT = {"type": "object", "properties": {"n": {"type": "string", "maxLength": 5}}}

# (rule, contract patch, config or None, fires)
CASES: list[tuple[str, dict[str, Any], dict[str, Any] | None, bool]] = [
    ("no-security", op(security=None), None, True),
    ("no-security", op(security=[]), None, False),
    ("public-overrides-security", op(**{"x-apishield": {"public": True}}), None, True),
    ("public-overrides-security", op(security=[], **{"x-apishield": {"public": True}}), None,
     False),
    ("api-key-in-query", {"components": {"securitySchemes": {
        "key": {"type": "apiKey", "in": "query", "name": "api_key"}}}}, None, True),
    ("api-key-in-query", {"components": {"securitySchemes": {
        "key": {"type": "apiKey", "in": "header", "name": "x-api-key"}}}}, None, False),
    ("plain-http-server", {"servers": [{"url": "http://api.example.com/v1"}]}, None, True),
    ("plain-http-server", {"servers": [{"url": "http://localhost:8000/v1"}]}, None, False),
    ("oauth-legacy-flow", {"components": {"securitySchemes": {"oauth": {
        "type": "oauth2", "flows": {"password": {"tokenUrl": "https://id.example.com/t",
                                                 "scopes": {"read": "r"}}}}}}}, None, True),
    ("oauth-legacy-flow", {"components": {"securitySchemes": {"oauth": {
        "type": "oauth2", "flows": {"clientCredentials": {
            "tokenUrl": "https://id.example.com/t", "scopes": {"read": "r"}}}}}}}, None, False),
    ("oauth-flow-without-scopes", {"components": {"securitySchemes": {"oauth": {
        "type": "oauth2", "flows": {"clientCredentials": {
            "tokenUrl": "https://id.example.com/t", "scopes": {}}}}}}}, None, True),
    ("oauth-flow-without-scopes", {"components": {"securitySchemes": {"oauth": {
        "type": "oauth2", "flows": {"clientCredentials": {
            "tokenUrl": "https://id.example.com/t", "scopes": {"r": "read"}}}}}}}, None, False),
    ("jwt-issuer-check-off", {}, {"auth": {"issuers": {"main": merge(
        ISSUER, {"issuer": None, "check_issuer": False})}}}, True),
    ("jwt-issuer-check-off", {}, {"auth": {"issuers": {"main": ISSUER}}}, False),
    ("jwt-audience-check-off", {}, {"auth": {"issuers": {"main": merge(
        ISSUER, {"audiences": None, "check_audience": False})}}}, True),
    ("jwt-audience-check-off", {}, {"auth": {"issuers": {"main": ISSUER}}}, False),
    ("jwt-long-lifetime", {}, {"auth": {"issuers": {"main": merge(
        ISSUER, {"max_lifetime": "7d"})}}}, True),
    ("jwt-long-lifetime", {}, {"auth": {"issuers": {"main": {**ISSUER, "max_lifetime": None}}}},
     True),
    ("jwt-long-lifetime", {}, {"auth": {"issuers": {"main": merge(
        ISSUER, {"max_lifetime": "1h"})}}}, False),
    ("open-request-object", body(OBJECT), {"validation": {"strict": False}}, True),
    ("open-request-object", body(OBJECT), None, False),
    ("open-request-object", body(merge(OBJECT, {"additionalProperties": True})), None, True),
    ("unbounded-string", body({"type": "string"}), None, True),
    ("unbounded-string", body({"type": "string", "maxLength": 10}), None, False),
    ("unbounded-array", body({"type": "array", "items": {"type": "integer", "maximum": 3}}),
     None, True),
    ("unbounded-array", body({"type": "array", "maxItems": 3,
                              "items": {"type": "integer", "maximum": 3}}), None, False),
    ("unbounded-number", body({"type": "number"}), None, True),
    ("unbounded-number", body({"type": "number", "maximum": 10}), None, False),
    ("backtracking-pattern", body({"type": "string", "maxLength": 9, "pattern": "^(a+)+$"}),
     None, True),
    ("backtracking-pattern", body({"type": "string", "maxLength": 9, "pattern": "^[a-z]+$"}),
     None, False),
    ("sensitive-response-property", op(responses={"200": {"content": {"application/json": {
        "schema": {"properties": {"password_hash": {"type": "string"}}}}}}}), None, True),
    ("sensitive-response-property", op(responses={"200": {"content": {"application/json": {
        "schema": {"properties": {"password": {"type": "string", "writeOnly": True}}}}}}}),
     None, False),
    ("sensitive-response-property", extra("/oauth/token", "post", {
        "operationId": "issueToken", "security": [], "responses": {"200": {"content": {
            "application/json": {"schema": {"properties": {"access_token": {
                "type": "string"}}}}}}}}), None, False),
    ("undeclared-error-response", op(responses={"401": None}), None, True),
    ("undeclared-error-response", op(responses={"401": None, "4XX": {"description": "x"}}),
     None, False),
    ("undeclared-error-response", {}, {"rate_limiting": {"limits": [
        {"name": "all", "rate": "10/s"}]}}, True),
    ("bola-id-parameter", extra("/pets/{petId}", "get", {
        "security": [{"bearer": []}], "parameters": [
            {"name": "petId", "in": "path", "required": True,
             "schema": {"type": "integer", "maximum": 9}}]}), None, True),
    ("bola-id-parameter", extra("/pets/{petId}", "get", {
        "security": [{"bearer": []}], "x-apishield": {"owner": {"param": "path.petId"}},
        "parameters": [{"name": "petId", "in": "path", "required": True,
                        "schema": {"type": "integer", "maximum": 9}}]}), None, False),
    ("admin-without-role", extra("/admin/users", "get", {"security": [{"bearer": []}]}),
     None, True),
    ("admin-without-role", extra("/admin/users", "get", {
        "security": [{"bearer": []}], "x-apishield": {"require": {"roles": ["admin"]}}}),
     None, False),
    ("credential-endpoint-without-rate-limit", extra("/login", "post", {
        "operationId": "login", "security": []}), None, True),
    ("credential-endpoint-without-rate-limit", extra("/login", "post", {
        "operationId": "login", "security": []}), {"rate_limiting": {"limits": [
            {"name": "login", "rate": "5/m", "operations": ["login"],
             "pre_auth": True}]}}, False),
    ("cors-wildcard", {}, {"cors": {"allow_origins": ["*"]}}, True),
    ("cors-wildcard", {}, {"cors": {"allow_origins": ["https://app.example.com"]}}, False),
    ("tls-off-public-listener", {}, {"listen": {"host": "0.0.0.0"}}, True),
    ("tls-off-public-listener", {}, {"listen": {"host": "127.0.0.1"}}, False),
    ("responses-unfiltered", {}, {"responses": {"mode": "off"}}, True),
    ("responses-unfiltered", op(**{"x-apishield": {"responses": "off"}}), None, True),
    ("responses-unfiltered", {}, {"responses": {"mode": "validate"}}, False),
    ("error-masking-off", {}, {"responses": {"mask_errors": False}}, True),
    ("error-masking-off", {}, {}, False),
    ("shadow-mode", {}, {"mode": "log-only"}, True),
    ("shadow-mode", op(**{"x-apishield": {"mode": "log-only"}}), None, True),
    ("shadow-mode", {}, {"mode": "enforce"}, False),
    ("delegated-scheme", {}, {"auth": {"schemes": {"bearer": {"mode": "delegate"}}}}, True),
    ("delegated-scheme", {}, {"auth": {"schemes": {"bearer": {"mode": "verify"}}}}, False),
]


@pytest.mark.parametrize(("rule", "patch", "config", "fires"), CASES,
                         ids=[f"{c[0]}-{'fires' if c[3] else 'quiet'}-{n}"
                              for n, c in enumerate(CASES)])
def test_rule(tmp_path, capsys, rule, patch, config, fires):
    assert rule in RULES
    _code, report = audit(tmp_path, merge(CLEAN, patch), config, capsys=capsys)
    assert (rule in rules_of(report)) is fires, report["findings"]


STRING = {"type": "string"}
# (response property name, its schema, sensitive?): tuned on real contracts (bench/RESULTS.md,
# "Issue 15: audit vs Spectral OWASP"); the negatives were findings before.
SENSITIVE_NAMES = [
    ("password_hash", STRING, True),
    ("accesstoken", STRING, True),  # run together: matched inside the word
    ("clientSecret", STRING, True),
    ("apiKey", STRING, True),
    ("sshPrivateKey", STRING, True),
    ("socialSecurityNumber", STRING, True),
    ("ssn", STRING, True),
    ("cardNumber", {"type": "integer", "maximum": 10**19}, True),  # card data: any type
    ("nextPageToken", STRING, False),  # a page cursor
    ("NextToken", STRING, False),
    ("continuationToken", STRING, False),
    ("businessName", STRING, False),  # holds "ssn"
    ("IOSSNumber", STRING, False),
    ("tokenType", STRING, False),  # about the token
    ("passwordPolicy", {"type": "object"}, False),
    ("AccessTokenValidity", STRING, False),
    ("secretName", STRING, False),
    ("tokenId", STRING, False),
    ("refresh_token_expires_at", STRING, False),
    ("hasPassword", {"type": "boolean"}, False),  # a flag carries no secret
    ("max_tokens", {"type": "integer", "maximum": 9}, False),  # a count
]


@pytest.mark.parametrize(("name", "schema", "fires"), SENSITIVE_NAMES,
                         ids=[case[0] for case in SENSITIVE_NAMES])
def test_sensitive_property_names(tmp_path, capsys, name, schema, fires):
    patch = op(responses={"200": {"content": {"application/json": {"schema": {
        "type": "object", "additionalProperties": False, "properties": {name: schema}}}}}})
    _code, report = audit(tmp_path, merge(CLEAN, patch), capsys=capsys)
    assert ("sensitive-response-property" in rules_of(report)) is fires, report["findings"]


# (path parameter name, ID-like?): every positive is an id in a real contract of the corpus
ID_NAMES = [("petId", True), ("Id", True), ("ID", True), ("UUID", True), ("userid", True),
            ("AccountSid", True), ("projectGuid", True), ("task_gid", True),
            ("LIVE_STREAM_ID", True), ("order-id", True),
            ("name", False), ("owner", False), ("format", False), ("Identity", False)]


@pytest.mark.parametrize(("name", "fires"), ID_NAMES, ids=[case[0] for case in ID_NAMES])
def test_bola_id_parameter_names(tmp_path, capsys, name, fires):
    patch = extra(f"/things/{{{name}}}", "get", {"security": [{"bearer": []}], "parameters": [
        {"name": name, "in": "path", "required": True,
         "schema": {"type": "string", "maxLength": 9}}]})
    _code, report = audit(tmp_path, merge(CLEAN, patch), capsys=capsys)
    assert ("bola-id-parameter" in rules_of(report)) is fires, report["findings"]


ADMIN_PATHS = [
    ("/admin/users", True), ("/internal/jobs", True),
    ("/admin.apps.approve", True),  # Slack
    ("/providers/Microsoft.Storage.Admin/farms", True),  # Azure Stack
    ("/#X-Amz-Target=Cognito.AdminCreateUser", True),  # AWS
    ("/__admin/mappings", True),  # WireMock
    ("/district_admins", True),
    ("/badminton/courts", False), ("/users/{adminId}", False),  # parameter names not read
    ("/providers/Microsoft.ApiManagement/service", False), ("/pets", False)]


@pytest.mark.parametrize(("path", "fires"), ADMIN_PATHS, ids=[case[0] for case in ADMIN_PATHS])
def test_admin_like_paths(tmp_path, capsys, path, fires):
    parameters = [{"name": "adminId", "in": "path", "required": True,
                   "schema": {"type": "string", "maxLength": 9}}] if "{" in path else []
    patch = extra(path, "get", {"security": [{"bearer": []}], "parameters": parameters,
                                "x-apishield": {"owner": {"param": "path.adminId"}}}
                  if parameters else {"security": [{"bearer": []}]})
    _code, report = audit(tmp_path, merge(CLEAN, patch), capsys=capsys)
    assert ("admin-without-role" in rules_of(report)) is fires, report["findings"]


def test_every_rule_has_a_positive_and_a_negative_case():
    fires = {case[0] for case in CASES if case[3]}
    quiet = {case[0] for case in CASES if not case[3]}
    # jwt-weak-secret needs a secret file: its own tests below
    assert set(RULES) - {"jwt-weak-secret"} == fires == quiet


def test_the_clean_contract_and_config_have_no_finding(tmp_path, capsys):
    code, report = audit(tmp_path, CLEAN, {"auth": {"issuers": {"main": ISSUER}}},
                         capsys=capsys)
    assert (code, report["findings"], report["score"]) == (0, [], 100)
    assert report["summary"] == {"critical": 0, "high": 0, "medium": 0, "low": 0}


def _hs_issuer(secret_file: str, *, allow_weak: bool) -> dict[str, Any]:
    return {"issuer": "https://id.example.com", "audiences": ["api"],
            "algorithms": ["HS256"], "shared_secret": {"file": secret_file},
            "allow_weak_secret": allow_weak}


def test_weak_secret_allowed_is_critical_and_fails_the_run(tmp_path, capsys):
    (tmp_path / "hs.key").write_text("your-256-bit-secret\n")  # jwt.io's published example
    code, report = audit(tmp_path, CLEAN, {"auth": {"issuers": {"main": _hs_issuer(
        "hs.key", allow_weak=True)}}}, capsys=capsys)
    [finding] = [f for f in report["findings"] if f["rule"] == "jwt-weak-secret"]
    assert finding["severity"] == "critical"
    assert finding["location"]["pointer"] == "/auth/issuers/main/allow_weak_secret"
    assert "bytes; HS256 needs at least 32" in finding["message"]
    assert "your-256" not in json.dumps(report)  # the secret itself is never printed
    assert code == 1


def test_weak_secret_without_the_flag_and_a_strong_one(tmp_path, capsys):
    (tmp_path / "hs.key").write_text("a" * 40)
    _code, report = audit(tmp_path, CLEAN, {"auth": {"issuers": {"main": _hs_issuer(
        "hs.key", allow_weak=False)}}}, capsys=capsys)
    assert "repeats a few characters" in next(
        f["message"] for f in report["findings"] if f["rule"] == "jwt-weak-secret")
    (tmp_path / "hs.key").write_text(secrets.token_urlsafe(48))
    _code, report = audit(tmp_path, CLEAN, {"auth": {"issuers": {"main": _hs_issuer(
        "hs.key", allow_weak=False)}}}, capsys=capsys)
    assert "jwt-weak-secret" not in rules_of(report)


def test_findings_point_at_file_pointer_and_line(tmp_path, capsys):
    contract = tmp_path / "openapi.yaml"
    contract.write_text((DATA / "located.yaml").read_text())
    code = main(["audit", str(contract), "--format", "json", "--config",
                 str(DATA / "located-config.yaml")])
    report = json.loads(capsys.readouterr().out)
    where = {f["rule"]: f["location"] for f in report["findings"]}
    assert where["api-key-in-query"] == {
        "file": str(contract), "pointer": "/components/securitySchemes/key", "line": 16}
    assert where["no-security"]["pointer"] == "/paths/~1pets/get"
    assert where["no-security"]["line"] == 5
    assert where["cors-wildcard"]["line"] == 3
    assert where["cors-wildcard"]["file"].endswith("located-config.yaml")
    assert code == 0  # nothing at high or above


def test_text_format_has_a_summary_and_no_colour_off_a_tty(tmp_path, capsys):
    contract = tmp_path / "openapi.yaml"
    contract.write_text(yaml.safe_dump(merge(CLEAN, op(security=None))))
    assert main(["audit", str(contract)]) == 0  # medium < high
    out = capsys.readouterr().out
    assert "MEDIUM   no-security  [A7, API2]" in out
    assert f"at:  {contract}:" in out
    assert "\033[" not in out
    assert "medium           1" in out
    assert "score: 95/100 (1 finding(s), 1 rule(s)" in out


def test_json_format_is_the_documented_shape(tmp_path, capsys):
    _code, report = audit(tmp_path, merge(CLEAN, op(security=None)), capsys=capsys)
    assert set(report) == {"version", "tool", "contract", "config", "score", "summary",
                           "findings"}
    [finding] = report["findings"]
    assert set(finding) == {"rule", "severity", "checklist", "owasp", "title", "location",
                            "message", "why", "fix"}
    assert (finding["checklist"], finding["owasp"]) == ("A7", "API2")


def _validate_sarif(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile", str(SARIF_SCHEMA),
         str(path)], capture_output=True, text=True, timeout=60, check=False)


def test_sarif_is_valid_against_the_official_schema(tmp_path, capsys):
    contract = tmp_path / "openapi.yaml"
    contract.write_text(yaml.safe_dump(merge(CLEAN, merge(op(security=None), {
        "servers": [{"url": "http://api.example.com"}]}))))
    out = tmp_path / "audit.sarif"
    code = main(["audit", str(contract), "--format", "sarif", "--output", str(out)])
    assert code == 1  # plain-http-server is high
    checked = _validate_sarif(out)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    sarif = json.loads(out.read_text())
    run = sarif["runs"][0]
    assert [rule["id"] for rule in run["tool"]["driver"]["rules"]] == list(RULES)
    levels = {r["ruleId"]: r["level"] for r in run["results"]}
    assert levels == {"plain-http-server": "error", "no-security": "warning"}
    result = next(r for r in run["results"] if r["ruleId"] == "no-security")
    location = result["locations"][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"] == contract.as_uri()
    assert location["region"]["startLine"] >= 1
    rule = run["tool"]["driver"]["rules"][result["ruleIndex"]]
    assert rule["id"] == "no-security" and rule["properties"]["security-severity"] == "5.5"
    # the schema check is not vacuous
    del sarif["version"]
    out.write_text(json.dumps(sarif))
    assert _validate_sarif(out).returncode == 1


def test_exit_codes(tmp_path, capsys):
    contract = tmp_path / "openapi.yaml"
    contract.write_text(yaml.safe_dump(merge(CLEAN, op(security=None))))
    assert main(["audit", str(contract), "--fail-on", "medium"]) == 1
    assert main(["audit", str(contract), "--fail-on", "high"]) == 0
    assert main(["audit", str(contract), "--fail-on", "low", "-f", "json"]) == 1
    capsys.readouterr()
    assert main(["audit", str(tmp_path / "missing.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err
    config = tmp_path / "apishield.yaml"
    config.write_text("contract: openapi.yaml\nmode: sometimes\n")
    assert main(["audit", str(contract), "--config", str(config)]) == 2
    assert "mode" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["audit", str(contract), "--fail-on", "severe"])
    assert usage.value.code == 2


def test_missing_config_named(tmp_path, capsys):
    """A config file that does not exist is named in the error, not the contract; a
    contract that does not load is named with the config it was read with."""
    contract = tmp_path / "openapi.yaml"
    contract.write_text(yaml.safe_dump(CLEAN))
    missing = tmp_path / "missing.yaml"
    assert main(["audit", "-c", str(missing), str(contract)]) == 2
    first, problem = capsys.readouterr().err.splitlines()[:2]
    assert first == f"apishield: 1 problem(s) in {missing}:"
    assert "missing.yaml: file not found" in problem
    config = tmp_path / "apishield.yaml"
    config.write_text(f"contract: {contract.name}\n")
    assert main(["audit", "-c", str(config), str(tmp_path / "gone.yaml")]) == 2
    first, problem = capsys.readouterr().err.splitlines()[:2]
    assert first == f"apishield: 1 problem(s) in {tmp_path / 'gone.yaml'} (with {config}):"
    assert "gone.yaml: file not found" in problem


def test_the_default_config_file_is_read_when_present(tmp_path, capsys, monkeypatch):
    """`--config` defaults to apishield.yaml as for every command; absent, the defaults."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "openapi.yaml").write_text(yaml.safe_dump(CLEAN))
    assert main(["audit", "openapi.yaml", "-f", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"] is None
    (tmp_path / "apishield.yaml").write_text("contract: openapi.yaml\nmode: log-only\n")
    assert main(["audit", "openapi.yaml", "-f", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["config"] == "apishield.yaml"
    assert [(f["rule"], f["location"]) for f in report["findings"]] == [
        ("shadow-mode", {"file": "apishield.yaml", "pointer": "/mode", "line": 2})]


def test_the_command_runs_as_a_subprocess(tmp_path):
    contract = tmp_path / "openapi.yaml"
    contract.write_text(yaml.safe_dump(merge(CLEAN, {"servers": [
        {"url": "http://api.example.com"}]})))
    result = subprocess.run([sys.executable, "-m", "apishield", "audit", str(contract)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "HIGH     plain-http-server" in result.stdout
    assert result.stderr == ""


def test_a_large_contract_is_audited(tmp_path, capsys):
    """The ~5 MB generated contract of bench/contract_load.py (3000 operations, 28 000
    `$ref`s): the run completes (the suite's timeout bounds it) and each shared schema
    is reported once, not once per operation using it."""
    from tests.test_large_contract import gen

    gen.write_contract(tmp_path, "json", gen.build_document())
    code = main(["audit", str(tmp_path / "openapi.json"), "--format", "json",
                 "--fail-on", "critical"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    pointers = [(f["rule"], f["location"]["pointer"]) for f in report["findings"]]
    assert len(pointers) == len(set(pointers)) > 1000
    assert all(f["location"]["line"] is None for f in report["findings"])  # JSON: no lines
    assert report["summary"]["low"] > 0


@pytest.mark.parametrize(("text", "credential"), [
    ("/login", True), ("/auth/token", True), ("createSession", True), ("/users/sign-in", True),
    ("resetPassword", True), ("/oauth2/token", True), ("/v1/logIn", True),
    ("/authors", False), ("createAuthor", False), ("/tokenizer-stats", False),
    ("/blogs", False), ("signature", False),
    ("/account/forgot", True), ("/password/reset", True),
    ("VpnGateways_Reset", False), ("/instances/{id}:reset", False)])  # machines, not passwords
def test_credential_endpoints_are_recognised_by_words(text, credential):
    from apishield.audit.access import credential_like

    assert credential_like(text) is credential


def test_every_rule_is_documented():
    """docs/audit.md lists each rule with its severity, checklist row, category, why, fix."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "audit.md").read_text()
    for rule in RULES.values():
        assert f"| [`{rule.id}`](#{rule.id}) | {rule.severity.label} | {rule.checklist} | " \
               f"{rule.owasp} |" in text, rule.id
        section = text.split(f"### `{rule.id}`\n", 1)[1].split("\n### ", 1)[0]
        assert f"**{rule.severity.label}**; checklist {rule.checklist}; OWASP " \
               f"{rule.owasp_title}" in section
        assert f"- Why: {rule.why}" in section and f"- Fix: {rule.fix}" in section
