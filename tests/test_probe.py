"""`apishield probe` (issue 17): attacks generated from the contract, sent to a real target.

The targets are real processes on 127.0.0.1: the gateway (`apishield serve`, started by
conftest's `start_gateway`) in front of the bundled demo API with an API-key requirement
added to its contract, once with the default policy (every attempt refused) and once with
four deliberate holes (the probe reports exactly those); and small local HTTP servers that
count what reaches them, for the safety rules (dry run, one origin, no redirects followed,
--max-requests, writes only with --allow-writes, no prompt without a terminal). The probe
runs in-process through `apishield.cli.main.main` (its real parser, planner and sender).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
import yaml
from cryptography.hazmat.primitives import serialization

import apishield.demo
from apishield.cli.main import main
from apishield.demo.api import DemoServer, make_server
from apishield.probe.plan import SAFE_METHODS
from apishield.probe.rules import CLASSES, PROBE_RULES
from apishield.probe.tokens import JKU, X5U, probe_jwk
from tests.conftest import RunningGateway, free_port, start_gateway, wait_for_port
from tests.issuer_server import AUDIENCE, rsa_key, running_issuer
from tests.weak_verifier import start_weak_verifier, stop_weak_verifier

DEMO_CONTRACT = Path(apishield.demo.__file__).parent / "openapi.yaml"
SARIF_SCHEMA = Path(__file__).resolve().parent / "data" / "audit" / "sarif-schema-2.1.0.json"
FAST = ["--rate", "500", "--yes"]  # 500/s: the loopback gateway keeps up; no timing asserted

# the deliberate holes: one operation each
HOLES = {"listPets": {"strict": False}, "createPet": {"injection": False},
         "getUser": {"public": True}, "getOrder": {"mode": "log-only"}}
EXPECTED_HOLES = {
    ("probe-unknown-parameter", "listPets"),  # strict: false
    *{(rule, "createPet") for rule in ("probe-injection",)},  # injection: false
    ("probe-auth-missing", "getUser"), ("probe-auth-malformed", "getUser"),  # public: true
    # mode: log-only: every refusal of that operation is only logged, the request forwarded
    ("probe-schema-type", "getOrder"), ("probe-schema-bounds", "getOrder"),
    ("probe-unknown-parameter", "getOrder"), ("probe-auth-missing", "getOrder"),
    ("probe-auth-malformed", "getOrder"),
    ("probe-cors-foreign-origin", None),  # cors.allow_origins: ["*"] (every path)
}


# -- targets ------------------------------------------------------------------------------

@pytest.fixture
def demo() -> Iterator[DemoServer]:
    server = make_server("127.0.0.1", 0, record=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


API_KEY = {"type": "apiKey", "in": "header", "name": "X-Api-Key"}
NESTED = {
    "owner": {"type": "object", "additionalProperties": False, "required": ["email"],
              "properties": {"email": {"type": "string", "format": "email", "maxLength": 254},
                             "code": {"type": "string", "pattern": "^[A-Z]{3}$",
                                      "example": "ABC"}}},
    "labels": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "minLength": 2, "maxLength": 16}}}},
}
# rules judged on answers, not sent as attempts of their own
ANSWER_CHECKS = {"probe-stack-trace", "probe-response-undeclared-property",
                 "probe-response-write-only"}


def protected_contract(folder: Path, scheme: dict[str, Any] = API_KEY) -> Path:
    """The demo's contract with `scheme` (an API key) required everywhere but /health."""
    document = yaml.safe_load(DEMO_CONTRACT.read_text())
    document["components"]["securitySchemes"] = {"key": scheme}
    document["security"] = [{"key": []}]
    document["paths"]["/health"]["get"]["security"] = []
    # a readOnly property and an enum parameter, so those attempts have a target too
    document["components"]["schemas"]["NewPet"]["properties"]["id"] = {
        "type": "integer", "minimum": 1, "readOnly": True}
    document["paths"]["/pets"]["get"]["parameters"] += [
        {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"]}},
        # a format and a pattern, for those breaks
        {"name": "since", "in": "query", "schema": {"type": "string", "format": "date"}},
        {"name": "code", "in": "query", "schema": {"type": "string", "pattern": "^[A-Z]{3}$"}}]
    # nested objects and an array of objects in a body, for the deeper breaks
    document["components"]["schemas"]["NewPet"]["properties"].update(NESTED)
    path = folder / "demo-contract.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def demo_gateway(tmp_path: Path, demo: DemoServer, operations: dict[str, Any] | None = None,
                 **more: Any) -> tuple[RunningGateway, str]:
    """A gateway in front of `demo`, and an API key made by the real `keys` CLI."""
    workdir = tmp_path / "gw"
    workdir.mkdir()
    host, port = demo.server_address
    overrides: dict[str, Any] = {"state": "state.db", "operations": operations or {}, **more}
    gateway = start_gateway(workdir, f"http://{host}:{port}", overrides,
                            contract=protected_contract(tmp_path))
    created = subprocess.run(
        [sys.executable, "-m", "apishield", "keys", "create", "--name", "probe", "--config",
         str(gateway.config_path)], capture_output=True, text=True, timeout=30, check=False)
    assert created.returncode == 0, created.stderr
    return gateway, created.stdout.splitlines()[0].strip()


class Recorder(ThreadingHTTPServer):
    """A target that answers everything (200 `{}`, or a redirect) and records each request."""

    daemon_threads = True
    server_address: tuple[str, int]

    def __init__(self, redirect_to: str | None = None, status: int = 200,
                 body: bytes = b"{}", content_type: str = "application/json") -> None:
        self.redirect_to = redirect_to
        self.status, self.body, self.content_type = status, body, content_type
        self.requests: list[tuple[str, str]] = []
        self.api_keys: list[str] = []  # X-Api-Key values received
        self.connections = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _RecordingHandler)

    def get_request(self) -> Any:
        with self.lock:
            self.connections += 1
        return super().get_request()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _RecordingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Recorder

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle_one_request(self) -> None:
        self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline or not self.parse_request():
            self.close_connection = True
            return
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        with self.server.lock:
            self.server.requests.append((self.command, self.path))
            if "X-Api-Key" in self.headers:
                self.server.api_keys.append(self.headers["X-Api-Key"])
        if self.server.redirect_to is not None:
            self.send_response(302)
            self.send_header("Location", self.server.redirect_to + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(self.server.status)
        self.send_header("Content-Type", self.server.content_type)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.server.body)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = start_recorder()
    yield server
    stop_recorder(server)


def start_recorder(redirect_to: str | None = None, status: int = 200,
                   body: bytes = b"{}", content_type: str = "application/json") -> Recorder:
    server = Recorder(redirect_to, status, body, content_type)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def stop_recorder(server: Recorder) -> None:
    server.shutdown()
    server.server_close()


def demo_config(tmp_path: Path) -> Path:
    """A config whose contract is the protected demo's (no upstream: the target is local)."""
    contract = protected_contract(tmp_path)
    config = tmp_path / "apishield.yaml"
    config.write_text(yaml.safe_dump({"contract": contract.name}))
    return config


def probe(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code = main(["probe", *argv])
    out = capsys.readouterr().out
    return code, (json.loads(out) if "--format" in argv and "json" in argv else out)


def got_through(report: dict[str, Any]) -> set[tuple[str, str | None]]:
    return {(a["rule"], a["operation"]) for a in report["attempts"]
            if a["verdict"] == "got-through"}


# -- against the gateway in front of the demo ---------------------------------------------

def test_the_gateway_in_front_of_the_demo_refuses_every_attempt(tmp_path, demo, capsys):
    # CORS for one front end: a preflight from any other origin is refused
    gateway, key = demo_gateway(tmp_path, demo, cors={"allow_origins": ["https://app.test"]})
    try:
        code, report = probe(capsys, "--config", str(gateway.config_path), "--target",
                             gateway.url, "--identity", f"ci={key}", "--allow-writes",
                             "--format", "json", *FAST)
    finally:
        gateway.stop()
    assert got_through(report) == set(), [a for a in report["attempts"]
                                          if a["verdict"] != "refused"]
    assert code == 0
    summary = report["summary"]
    assert summary["sent"] == summary["planned"] == summary["refused"] > 100
    assert summary["skipped_writes"] == 0 and summary["not_sent"] == 0
    rules = {a["rule"] for a in report["attempts"]}
    # every rule this contract can exercise: an API key (no JWT attempts), no 5xx seen;
    # one identity, no roles required, no limit: no multi-step attempts (their own tests:
    # test_probe_identities.py)
    jwt = {r for r in PROBE_RULES if r.startswith("probe-jwt-")}
    several = {r for name in ("bola", "roles", "rate-limit") for r in CLASSES[name]}
    assert rules == set(PROBE_RULES) - jwt - ANSWER_CHECKS - several
    # nested properties are broken one at a time, the rest of the body valid
    whats = {a["what"] for a in report["attempts"]}
    assert {"body property owner.email: not a valid email",
            "required body property owner.email left out",
            "an undeclared property is_admin in body property owner",
            "body property labels[].name: shorter than minLength 2",
            "body property labels: more items than maxItems 3",
            "query parameter code: '!', which does not match pattern ^[A-Z]{3}$",
            "query parameter since: not a valid date"} <= whats, sorted(whats)
    # the identity got the schema attempts past authentication: refused for what they probe
    for attempt in report["attempts"]:
        if attempt["rule"].startswith(("probe-schema", "probe-injection")):
            assert attempt["status"] in (400, 422), attempt
            assert attempt["problem_type"] != "urn:apishield:problem:unauthorized"
        if attempt["rule"] == "probe-auth-missing":
            assert attempt["problem_type"] == "urn:apishield:problem:unauthorized"
        if attempt["rule"] == "probe-injection":  # the rest of the request was valid
            assert attempt["problem_type"] == "urn:apishield:problem:injection-suspected"
        if attempt["rule"] == "probe-security-headers":  # a valid request is answered
            assert attempt["status"] == 200, attempt
    # the report names every request, never the key
    assert key not in json.dumps(report)
    assert {a["target"] for a in report["attempts"]} >= {"/admin", "/pets/0", "/pets/probe"}


def test_a_weakened_policy_is_reported_hole_by_hole_and_nothing_else(tmp_path, demo,
                                                                       capsys):
    gateway, key = demo_gateway(tmp_path, demo, HOLES, cors={"allow_origins": ["*"]})
    try:
        code, report = probe(capsys, "--config", str(gateway.config_path), "--target",
                             gateway.url, "--identity", f"ci={key}", "--allow-writes",
                             "--format", "json", *FAST)
    finally:
        gateway.stop()
    assert code == 1
    assert got_through(report) == EXPECTED_HOLES
    for finding in report["got_through"]:
        rule = PROBE_RULES[finding["rule"]]
        assert (finding["checklist"], finding["owasp"], finding["fix"]) == (
            rule.checklist, rule.owasp, rule.fix)
    # what went through really reached the API: injection payloads in its received bodies
    bodies = [r.body for r in demo.received() if r.method == "POST" and r.path == "/pets"]
    assert any(b and b"<script>alert(1)</script>" in b for b in bodies)


def test_text_report_names_the_checklist_row_owasp_category_and_fix(tmp_path, demo, capsys):
    gateway, key = demo_gateway(tmp_path, demo, {"getUser": {"public": True}})
    try:
        code, text = probe(capsys, "--config", str(gateway.config_path), "--target",
                           gateway.url, "--identity", f"ci={key}", "--only", "auth,headers",
                           *FAST)
    finally:
        gateway.stop()
    assert code == 1
    assert "GOT THROUGH 200 GET /users/1  [probe-auth-missing]" in text
    # a valid request answered with every security header is "ok", not "refused"
    assert "ok          200 GET /pets  [probe-security-headers]" in text
    assert "[A7, API2:2023 Broken Authentication]" in text
    assert "fix: Keep a security requirement on the operation" in text
    assert "refused     401 GET /pets  [probe-auth-missing]" in text
    assert key not in text


def test_dry_run_prints_the_plan_and_sends_nothing(tmp_path, demo, capsys):
    gateway, key = demo_gateway(tmp_path, demo)
    try:
        code, text = probe(capsys, "--config", str(gateway.config_path), "--target",
                           gateway.url, "--identity", f"ci={key}", "--dry-run")
        assert code == 0
        assert demo.received() == []  # the upstream saw nothing
        assert gateway.log_lines() == []  # nor did the gateway
    finally:
        gateway.stop()
    assert "none sent" in text and "GET /pets/probe  [probe-schema-type]" in text
    assert "need --allow-writes" in text and key not in text


# -- safety rules, against recording targets ---------------------------------------------

def test_dry_run_never_connects(tmp_path, recorder, capsys):
    code, _text = probe(capsys, "--config", str(demo_config(tmp_path)), "--target",
                        recorder.url, "--dry-run", "--allow-writes")
    assert code == 0
    assert recorder.connections == 0


def test_a_redirect_to_another_port_is_never_followed(tmp_path, capsys):
    elsewhere = start_recorder()
    redirecting = start_recorder(redirect_to=elsewhere.url)
    try:
        code, report = probe(capsys, "--config", str(demo_config(tmp_path)), "--target",
                             redirecting.url, "--only", "undeclared,schema", "--format",
                             "json", *FAST)
    finally:
        stop_recorder(redirecting)
        stop_recorder(elsewhere)
    assert len(redirecting.requests) == report["summary"]["sent"] > 10
    assert elsewhere.connections == 0 and elsewhere.requests == []
    assert {a["status"] for a in report["attempts"]} == {302}
    assert code == 1  # a redirect is not a refusal


def test_max_requests_is_a_hard_stop(tmp_path, recorder, capsys):
    code, report = probe(capsys, "--config", str(demo_config(tmp_path)), "--target",
                         recorder.url, "--max-requests", "5", "--format", "json", *FAST)
    assert len(recorder.requests) == 5
    summary = report["summary"]
    assert summary["sent"] == 5 and summary["not_sent"] == summary["planned"] - 5 > 0
    sent = [a for a in report["attempts"] if a["verdict"] != "not-sent"]
    # picked round-robin: five different operations or path-wide groups, not the first five
    assert len({a["operation"] or a["pointer"] for a in sent}) == 5
    assert code == 1  # the recorder answers 200 to everything


def test_writes_are_sent_only_with_allow_writes(tmp_path, recorder, capsys):
    config = str(demo_config(tmp_path))
    code, report = probe(capsys, "--config", config, "--target", recorder.url, "--format",
                         "json", *FAST)
    assert code == 1
    assert {method for method, _path in recorder.requests} <= SAFE_METHODS
    assert report["summary"]["skipped_writes"] > 0
    recorder.requests.clear()
    probe(capsys, "--config", config, "--target", recorder.url, "--allow-writes", *FAST)
    assert {"POST", "DELETE"} <= {method for method, _path in recorder.requests}


def test_requests_stay_under_the_target_base_path(tmp_path, recorder, capsys):
    probe(capsys, "--config", str(demo_config(tmp_path)), "--target", recorder.url + "/api",
          "--only", "undeclared", *FAST)
    assert recorder.requests
    assert all(path.startswith("/api/") for _method, path in recorder.requests)


def test_without_a_terminal_it_refuses_unless_yes(tmp_path, recorder):
    result = subprocess.run(
        [sys.executable, "-m", "apishield", "probe", "--config", str(demo_config(tmp_path)),
         "--target", recorder.url], stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=60, check=False)
    assert result.returncode == 2
    assert "pass --yes" in result.stderr
    assert recorder.connections == 0


@pytest.mark.parametrize("argv, message", [
    (["--target", "ftp://example.com"], "scheme must be http or https"),
    (["--target", "http://user:pw@example.com"], "credentials go in --identity"),
    (["--target", "http://127.0.0.1:1", "--only", "schema,nosuch"], "unknown class nosuch"),
    (["--target", "http://127.0.0.1:1", "--identity", "nocredential"], "NAME=CREDENTIAL"),
    (["--target", "http://127.0.0.1:1", "--max-requests", "0"], "at least 1"),
])
def test_usage_errors_exit_2(tmp_path, capsys, argv, message):
    code = main(["probe", "--config", str(demo_config(tmp_path)), *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_identity_from_env_or_file_and_only_classes(tmp_path, recorder, capsys,
                                                    monkeypatch):
    monkeypatch.setenv("PROBE_KEY", "k-from-env")
    code, report = probe(capsys, "--config", str(demo_config(tmp_path)), "--target",
                         recorder.url, "--identity", "ci=env:PROBE_KEY", "--only",
                         "auth,schema", "--format", "json", *FAST)
    assert code == 1
    rules = {a["rule"] for a in report["attempts"]}
    assert rules <= set(CLASSES["auth"]) | set(CLASSES["schema"])
    assert rules & set(CLASSES["auth"]) and rules & set(CLASSES["schema"])
    # the identity is sent where the scheme reads it, except by the attempts about it
    assert "k-from-env" in recorder.api_keys
    assert recorder.api_keys.count("k-from-env") < len(recorder.requests)
    assert "k-from-env" not in json.dumps(report)
    key_file = tmp_path / "key.txt"
    key_file.write_text("k-from-file\n")
    probe(capsys, "--config", str(demo_config(tmp_path)), "--target", recorder.url,
          "--identity", f"ci=file:{key_file}", "--only", "schema", *FAST)
    assert "k-from-file" in recorder.api_keys


def test_sarif_report_is_valid_against_the_official_schema(tmp_path, recorder, capsys):
    out = tmp_path / "probe.sarif"
    code = main(["probe", "--config", str(demo_config(tmp_path)), "--target", recorder.url,
                 "--format", "sarif", "--output", str(out), "--allow-writes", *FAST])
    assert code == 1
    document = json.loads(out.read_text())
    results = document["runs"][0]["results"]
    assert results and {r["ruleId"] for r in results} <= set(PROBE_RULES)
    # each result points at the part under test, with its line in the contract
    where = {(r["ruleId"], r["locations"][0]["logicalLocations"][0]["fullyQualifiedName"]):
             r["locations"][0]["physicalLocation"] for r in results}
    located = where[("probe-schema-type", "/paths/~1pets~1{petId}/get/parameters/0")]
    assert located["artifactLocation"]["uri"].endswith("demo-contract.yaml")
    assert located["region"]["startLine"] > 1
    assert ("probe-undeclared-path", "/paths") in where
    assert ("probe-injection", "/components/schemas/NewPet/properties/name") in where
    assert ("probe-mass-assignment", "/components/schemas/NewOrder") in where
    checked = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile", str(SARIF_SCHEMA),
         str(out)], capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_forged_bearer_tokens_are_refused_and_the_real_one_gets_schema_attempts_through(
        tmp_path, demo, capsys):
    """A bearer scheme with a static RS256 key: the probe forges alg none, expired,
    tampered, bad-signature and unknown-kid tokens from the real one (--identity)."""
    private = rsa_key(0)
    pem = tmp_path / "issuer.pem"
    pem.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    now = int(time.time())
    token = jwt.encode({"iss": "https://issuer.test", "aud": "api", "sub": "ci",
                        "iat": now, "exp": now + 600}, private, algorithm="RS256")
    workdir = tmp_path / "gw"
    workdir.mkdir()
    host, port = demo.server_address
    gateway = start_gateway(
        workdir, f"http://{host}:{port}",
        {"auth": {"issuers": {"ci": {"issuer": "https://issuer.test", "audiences": ["api"],
                                     "algorithms": ["RS256"], "keys": [str(pem)]}}}},
        contract=protected_contract(tmp_path, {"type": "http", "scheme": "bearer"}))
    try:
        code, report = probe(capsys, "--config", str(gateway.config_path), "--target",
                             gateway.url, "--identity", f"ci={token}", "--only",
                             "auth,schema", "--format", "json", *FAST)
    finally:
        gateway.stop()
    assert got_through(report) == set()
    assert code == 0
    by_rule: dict[str, set[int]] = {}
    for attempt in report["attempts"]:
        by_rule.setdefault(attempt["rule"], set()).add(attempt["status"])
    for rule in CLASSES["auth"]:
        assert by_rule[rule] == {401}, rule
    assert by_rule["probe-schema-type"] == {400}  # past authentication with the real token
    assert token not in json.dumps(report)


def test_stack_traces_in_5xx_answers_are_findings(tmp_path, capsys):
    trace = (b'{"error": "Traceback (most recent call last):\\n  File \\"/srv/app.py\\", '
             b'line 88, in get_order"}')
    crashing = start_recorder(status=500, body=trace)
    try:
        code, report = probe(capsys, "--config", str(demo_config(tmp_path)), "--target",
                             crashing.url, "--only", "undeclared,leaks", "--format", "json",
                             *FAST)
        _code, without_leaks = probe(capsys, "--config", str(demo_config(tmp_path)),
                                     "--target", crashing.url, "--only", "undeclared",
                                     "--format", "json", *FAST)
    finally:
        stop_recorder(crashing)
    assert code == 1
    assert all(a["stack_trace"] for a in report["attempts"])
    traces = [f for f in report["got_through"] if f["rule"] == "probe-stack-trace"]
    assert len(traces) == len(report["attempts"]) and traces[0]["checklist"] == "E3"
    assert not any(f["rule"] == "probe-stack-trace" for f in without_leaks["got_through"])


def test_every_rule_and_class_is_documented():
    """docs/probe.md lists each rule with its class, severity, checklist row, category, why
    and fix, and names every class `--only` takes."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "probe.md").read_text()
    for name, rules in CLASSES.items():
        assert f"- **{name}**" in text, name
        for rule_id in rules:
            rule = PROBE_RULES[rule_id]
            assert f"| [`{rule.id}`](#{rule.id}) | {name} | {rule.severity.label} | " \
                   f"{rule.checklist} | {rule.owasp} |" in text, rule.id
            section = text.split(f"### `{rule.id}`\n", 1)[1].split("\n### ", 1)[0]
            assert f"**{rule.severity.label}**; checklist {rule.checklist}; OWASP " \
                   f"{rule.owasp_title}" in section
            assert f"- Why: {rule.why}" in section and f"- Fix: {rule.fix}" in section


@pytest.mark.parametrize("answer, sent", [("n", False), ("y", True)])
def test_on_a_terminal_it_asks_first(tmp_path, recorder, answer, sent):
    import pty

    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "apishield", "probe", "--config",
             str(demo_config(tmp_path)), "--target", recorder.url, "--only", "undeclared",
             "--rate", "500"], stdin=terminal, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        os.write(controller, f"{answer}\n".encode())
        _out, err = process.communicate(timeout=60)
    finally:
        os.close(controller)
        os.close(terminal)
    assert "will send" in err and "Only probe systems you are allowed to test" in err
    if sent:
        assert process.returncode == 1 and recorder.requests  # the recorder answers 200
    else:
        assert process.returncode == 0 and "nothing sent" in err
        assert recorder.connections == 0


def test_optional_security_gets_no_missing_credential_attempt(tmp_path, capsys):
    """`security: [{}, {key: []}]` admits anonymous callers by contract: only a bad
    credential is a hole there."""
    contract = {
        "openapi": "3.1.0", "info": {"title": "t", "version": "1"},
        "components": {"securitySchemes": {"key": API_KEY}},
        "paths": {
            "/open": {"get": {"operationId": "optional", "security": [{}, {"key": []}],
                              "responses": {"200": {"description": "ok"}}}},
            "/closed": {"get": {"operationId": "required", "security": [{"key": []}],
                                "responses": {"200": {"description": "ok"}}}},
        },
    }
    (tmp_path / "openapi.yaml").write_text(yaml.safe_dump(contract))
    config = tmp_path / "apishield.yaml"
    config.write_text("contract: openapi.yaml\n")
    code, text = probe(capsys, "--config", str(config), "--target", "http://127.0.0.1:1",
                       "--only", "auth", "--dry-run")
    assert code == 0
    assert "GET /closed  [probe-auth-missing]" in text
    assert "GET /open  [probe-auth-missing]" not in text
    assert "GET /open  [probe-auth-malformed]" in text


def test_an_https_target_is_verified_and_a_private_ca_is_trusted_with_ca_file(
        tmp_path, make_gateway, capsys):
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key, ca_file = tmp_path / "server.crt", tmp_path / "server.key", tmp_path / "ca.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    gateway = make_gateway({"tls": {"cert": str(cert), "key": str(key)}})
    target = gateway.url.replace("http://", "https://")
    argv = ["probe", "--config", str(gateway.config_path), "--target", target, "--only",
            "headers", *FAST]
    # the CA is not trusted: nothing answers, and that is not a pass
    assert main(argv) == 2
    assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
    code, report = probe(capsys, *argv[1:], "--ca-file", str(ca_file), "--format", "json")
    assert code == 0
    assert report["attempts"] and all(a["verdict"] == "refused" for a in report["attempts"])
    # over https, HSTS is one of the headers every answer must carry (hsts: auto)
    assert all("strict-transport-security" in a["what"] for a in report["attempts"])
    assert main([*argv, "--ca-file", str(tmp_path / "missing.pem")]) == 2


def test_the_bundled_demo_as_shipped_refuses_every_attempt(tmp_path, demo, capsys):
    """What docs/probe.md shows: the demo's own contract (no security), no identity."""
    host, port = demo.server_address
    gateway = start_gateway(tmp_path, f"http://{host}:{port}", contract=DEMO_CONTRACT)
    try:
        code, report = probe(capsys, "--config", str(gateway.config_path), "--target",
                             gateway.url, "--allow-writes", "--format", "json", *FAST)
    finally:
        gateway.stop()
    assert got_through(report) == set()
    assert code == 0 and report["summary"]["refused"] == report["summary"]["planned"] > 50


def test_a_rate_limited_prober_is_blocked_not_refused(tmp_path, demo, capsys):
    """429s say nothing of what was probed: "blocked", and the run is not a pass."""
    host, port = demo.server_address
    gateway = start_gateway(tmp_path, f"http://{host}:{port}", {"rate_limiting": {"limits": [
        {"name": "tight", "key": ["ip"], "rate": "3/m", "pre_auth": True}]}},
        contract=DEMO_CONTRACT)
    try:
        code = main(["probe", "--config", str(gateway.config_path), "--target",
                     gateway.url, "--only", "schema", "--format", "json", *FAST])
        captured = capsys.readouterr()
        report, err = json.loads(captured.out), captured.err
    finally:
        gateway.stop()
    blocked = [a for a in report["attempts"] if a["verdict"] == "blocked"]
    assert blocked and {a["status"] for a in blocked} == {429}
    assert report["summary"]["blocked"] == len(blocked)
    assert code == 2 and "rate-limited" in err


def test_refusals_without_security_headers_are_one_finding_per_status(tmp_path, capsys):
    """A target that refuses everything properly but without the headers C3 asks for on
    every response: the refusals count, the missing headers are reported once per status."""
    refusing = start_recorder(status=404, content_type="application/problem+json",
                              body=b'{"type": "urn:example:not-found", "status": 404}')
    try:
        code, report = probe(capsys, "--config", str(demo_config(tmp_path)), "--target",
                             refusing.url, "--only", "undeclared,schema,headers",
                             "--format", "json", *FAST)
        _code, without_headers_class = probe(
            capsys, "--config", str(demo_config(tmp_path)), "--target", refusing.url,
            "--only", "undeclared,schema", "--format", "json", *FAST)
    finally:
        stop_recorder(refusing)
    assert code == 1
    refusals = [a for a in report["attempts"] if a["rule"] != "probe-security-headers"]
    assert {a["verdict"] for a in refusals} == {"refused"}
    assert {a["problem_type"] for a in refusals} == {"urn:example:not-found"}
    [finding] = [f for f in report["got_through"] if "answer(s)" in f["message"]]
    assert finding["rule"] == "probe-security-headers" and finding["checklist"] == "C3"
    assert finding["message"].startswith(f"{len(refusals)} answer(s) 404 without "
                                         "cache-control, content-security-policy, "
                                         "x-content-type-options")
    # --only without the headers class: headers are not judged
    assert without_headers_class["got_through"] == []


# -- token attacks ------------------------------------------------------------------------

BEARER = {"type": "http", "scheme": "bearer"}
TOKEN_ATTACKS = {"alg-none": "probe-jwt-alg-none", "key-confusion": "probe-jwt-key-confusion",
                 "psychic": "probe-jwt-psychic-signature", "jwk": "probe-jwt-embedded-jwk",
                 "jku": "probe-jwt-jku", "x5u": "probe-jwt-x5u"}


def bearer_config(tmp_path: Path) -> tuple[Path, bytes, str]:
    """A config whose contract needs a bearer token from an RS256 issuer with a static PEM
    key; the PEM's bytes, and a real token that issuer signed."""
    private = rsa_key(0)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "issuer.pem").write_bytes(pem)
    contract = protected_contract(tmp_path, BEARER)
    config = tmp_path / "apishield.yaml"
    config.write_text(yaml.safe_dump({"contract": contract.name, "auth": {"issuers": {"ci": {
        "issuer": "https://issuer.test", "audiences": ["api"], "algorithms": ["RS256"],
        "keys": ["issuer.pem"]}}}}))
    now = int(time.time())
    token = jwt.encode({"iss": "https://issuer.test", "aud": "api", "sub": "ci",
                        "iat": now, "exp": now + 600}, private, algorithm="RS256")
    return config, pem, token


@pytest.mark.parametrize("weakness", [None, *TOKEN_ATTACKS])
def test_each_token_attack_gets_through_the_verifier_weak_to_it(tmp_path, capsys, weakness):
    """A hand-written verifier with one historical weakness (tests/weak_verifier.py): the
    token attack made for it, and only that one, is reported as got through; with none,
    every token is refused."""
    config, pem, token = bearer_config(tmp_path)

    def fetch(url: str) -> dict[str, Any]:  # the named host serves the author's key
        assert url in (JKU, X5U)
        return probe_jwk("RS256")

    weak = start_weak_verifier(pem, "api", {weakness} if weakness else set(), fetch)
    try:
        code, report = probe(capsys, "--config", str(config), "--target", weak.url,
                             "--identity", f"ci={token}", "--only", "auth", "--format",
                             "json", *FAST)
    finally:
        stop_weak_verifier(weak)
    rules = {a["rule"] for a in report["attempts"]}
    assert set(TOKEN_ATTACKS.values()) <= rules  # all planned, from the config's PEM key
    through = {rule for rule, _operation in got_through(report)}
    if weakness is None:
        assert through == set() and code == 0
        assert weak.accepted == []
        return
    assert through == {TOKEN_ATTACKS[weakness]}, through
    assert code == 1
    assert weakness in weak.accepted
    assert token not in json.dumps(report)


def test_token_attacks_against_the_gateway_with_a_jwks_issuer(tmp_path, demo, capsys):
    """A real issuer serving its key set over HTTP and a gateway fetching it: the probe
    never fetches it, so key confusion waits for --issuer-keys (a JWK Set the user
    downloaded); with it, every token attack is refused 401."""
    with running_issuer() as issuer:
        host, port = demo.server_address
        workdir = tmp_path / "gw"
        workdir.mkdir()
        gateway = start_gateway(
            workdir, f"http://{host}:{port}",
            {"auth": {"issuers": {"oidc": {"issuer": issuer.url, "audiences": [AUDIENCE],
                                           "algorithms": ["RS256", "ES256"],
                                           "jwks_url": f"{issuer.url}/jwks.json"}}}},
            contract=protected_contract(tmp_path, BEARER))
        token = issuer.mint("RS256")
        jwks = tmp_path / "jwks.json"
        jwks.write_text(json.dumps(issuer.jwks()))
        base = ["--config", str(gateway.config_path), "--target", gateway.url,
                "--identity", f"ci={token}", "--only", "auth"]
        try:
            code, plan = probe(capsys, *base, "--dry-run")
            assert code == 0
            assert "[probe-jwt-key-confusion]" not in plan
            assert "probe-jwt-key-confusion not planned" in plan and "--issuer-keys" in plan
            assert "[probe-jwt-psychic-signature]" in plan
            code, report = probe(capsys, *base, "--issuer-keys", str(jwks), "--format",
                                 "json", *FAST)
        finally:
            gateway.stop()
        fetched = issuer.count("/jwks.json")
    assert got_through(report) == set()
    assert code == 0
    by_rule: dict[str, set[int]] = {}
    for attempt in report["attempts"]:
        by_rule.setdefault(attempt["rule"], set()).add(attempt["status"])
    for rule in CLASSES["auth"]:
        assert by_rule[rule] == {401}, rule
    # the real token's kid picks one key: one key-confusion token per operation
    confusion = [a for a in report["attempts"] if a["rule"] == "probe-jwt-key-confusion"]
    assert len(confusion) == len({a["operation"] for a in confusion}) > 1
    assert all(f"kid {issuer.key('RS256').kid}" in a["what"] for a in confusion)
    assert "ES256" in next(a["what"] for a in report["attempts"]
                           if a["rule"] == "probe-jwt-psychic-signature")
    assert fetched >= 1  # the gateway fetched the key set; the probe only read the file


def test_issuer_keys_that_do_not_load_are_a_usage_error(tmp_path, capsys):
    config, _pem, _token = bearer_config(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    code = main(["probe", "--config", str(config), "--target", "http://127.0.0.1:1",
                 "--issuer-keys", str(bad), "--dry-run"])
    assert code == 2
    assert "--issuer-keys" in capsys.readouterr().err


# -- response leaks -----------------------------------------------------------------------

LEAKY_CONTRACT = {
    "openapi": "3.1.0", "info": {"title": "leaky", "version": "1"},
    "paths": {"/users/{userId}": {"get": {
        "operationId": "getUser",
        "parameters": [{"name": "userId", "in": "path", "required": True,
                        "schema": {"type": "integer", "minimum": 1}}],
        "responses": {"200": {"description": "a user", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/User"}}}}}}}},
    "components": {"schemas": {"User": {
        "type": "object", "required": ["id", "name"],
        "properties": {"id": {"type": "integer"}, "name": {"type": "string"},
                       "password": {"type": "string", "writeOnly": True},
                       "friends": {"type": "array", "items": {
                           "type": "object", "properties": {"name": {"type": "string"}}}}}}}},
}
# what a careless API serializes: the whole model
LEAKY_BODY = json.dumps({"id": 1, "name": "probe", "password": "hunter2",
                         "password_hash": "$2b$12$notarealhashnotarealhash",
                         "friends": [{"name": "a", "session_token": "t0k"},
                                     {"name": "b", "session_token": "t1k"}]}).encode()


@pytest.mark.parametrize("responses, leaked", [
    ({"mode": "off"}, {("probe-response-write-only", "password"),
                       ("probe-response-undeclared-property", "password_hash"),
                       ("probe-response-undeclared-property", "friends[].session_token")}),
    ({}, set()),  # the default: `filter` cuts them
])
def test_response_leaks_are_found_unless_the_gateway_filters_them(tmp_path, capsys,
                                                                  responses, leaked):
    contract = tmp_path / "leaky.yaml"
    contract.write_text(yaml.safe_dump(LEAKY_CONTRACT))
    upstream = start_recorder(body=LEAKY_BODY)
    workdir = tmp_path / "gw"
    workdir.mkdir()
    overrides: dict[str, Any] = {"operations": {"getUser": {"public": True}}}
    if responses:
        overrides["responses"] = responses
    gateway = start_gateway(workdir, upstream.url, overrides, contract=contract)
    try:
        code, report = probe(capsys, "--config", str(gateway.config_path), "--target",
                             gateway.url, "--only", "headers,leaks", "--format", "json",
                             *FAST)
    finally:
        gateway.stop()
        stop_recorder(upstream)
    found = {(f["rule"], f["message"].split(" with ", 1)[1].split(",", 1)[0])
             for f in report["got_through"] if f["rule"].startswith("probe-response-")}
    assert found == leaked
    # one finding per operation and property, at the operation's response
    assert len([f for f in report["got_through"] if f["rule"].startswith(
        "probe-response-")]) == len(leaked)
    assert all(f["checklist"] == "E3" and f["owasp"] == "API3" for f in report["got_through"]
               if f["rule"].startswith("probe-response-"))
    assert code == (1 if leaked else 0)
    # property names only: never a leaked value
    assert "hunter2" not in json.dumps(report) and "t0k" not in json.dumps(report)
    if leaked:  # without the valid requests of the headers class, no 2xx to read
        code, alone = probe(capsys, "--config", str(gateway.config_path), "--target",
                            "http://127.0.0.1:1", "--only", "leaks", "--dry-run")
        assert "add it (--only headers,leaks)" in alone


# -- progress -----------------------------------------------------------------------------

def test_no_progress_line_when_stderr_is_not_a_terminal(tmp_path, recorder, capsys):
    code = main(["probe", "--config", str(demo_config(tmp_path)), "--target", recorder.url,
                 "--only", "undeclared", *FAST])
    captured = capsys.readouterr()
    assert code == 1 and recorder.requests  # requests were sent...
    assert captured.err == ""  # ...and nothing was drawn


def test_on_a_terminal_a_progress_line_is_drawn_on_stderr(tmp_path, recorder):
    import pty

    controller, terminal = pty.openpty()
    drawn: list[bytes] = []

    def read() -> None:  # until the child's end of the terminal closes (EIO on Linux)
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:
                return
            if not chunk:
                return
            drawn.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "apishield", "probe", "--config",
             str(demo_config(tmp_path)), "--target", recorder.url, "--only", "undeclared",
             "--format", "json", *FAST], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=terminal, text=True)
        os.close(terminal)  # the child holds its own copy
        terminal = -1
        reader.start()
        out, _ = process.communicate(timeout=60)
        reader.join(30)
    finally:
        os.close(controller)
        if terminal != -1:
            os.close(terminal)
    text = b"".join(drawn).decode()
    report = json.loads(out)  # standard output holds the report only
    total = report["summary"]["planned"]
    assert f"\rapishield probe [{'#' * 30}] {total}/{total} (100%)" in text
    assert text.count("apishield probe [") >= 2  # one line, rewritten in place...
    assert text.endswith("\n")  # ...and finished with a newline


# -- the ASGI middleware as the target ----------------------------------------------------

@pytest.fixture
def middleware_target(tmp_path: Path) -> Iterator[Any]:
    """Start the demo operations under ApiShieldMiddleware in a real uvicorn, with the
    operation overrides given; yields a function (overrides) -> (url, config path)."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(operations: dict[str, Any]) -> tuple[str, Path]:
        folder = tmp_path / f"mw{len(processes)}"
        folder.mkdir()
        config = folder / "apishield.yaml"
        config.write_text(yaml.safe_dump({
            "contract": str(DEMO_CONTRACT), "access_log": {"enabled": False},
            "operations": operations}))
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "tests.probe_middleware_app:create",
             "--port", str(port), "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "PROBE_MIDDLEWARE_CONFIG": str(config)})
        processes.append(process)
        wait_for_port(port, process)
        return f"http://127.0.0.1:{port}", config

    yield start
    for process in processes:
        if process.poll() is None:
            process.terminate()
        process.wait(10)


@pytest.mark.parametrize("operations, holes", [
    ({}, set()),
    ({"listPets": {"strict": False}}, {("probe-unknown-parameter", "listPets")}),
])
def test_the_middleware_refuses_every_attempt_and_one_opened_hole_is_reported(
        middleware_target, capsys, operations, holes):
    """The probe against apishield's own ASGI middleware (uvicorn, Starlette app): every
    attempt refused; with `strict: false` on one operation, exactly that hole."""
    url, config = middleware_target(operations)
    code, report = probe(capsys, "--config", str(config), "--target", url, "--allow-writes",
                         "--format", "json", *FAST)
    assert got_through(report) == holes, [a for a in report["attempts"]
                                          if a["verdict"] != "refused"]
    assert bool(report["got_through"]) == bool(holes)
    assert code == (1 if holes else 0)
    summary = report["summary"]
    assert summary["sent"] == summary["planned"] > 50 and summary["no_answer"] == 0
    assert summary["refused"] == summary["planned"] - len(
        [a for a in report["attempts"] if a["verdict"] == "got-through"])
    # the app's own /admin route stays unreachable through the middleware
    admin = next(a for a in report["attempts"] if a["target"] == "/admin")
    assert admin["verdict"] == "refused" and admin["status"] == 404
