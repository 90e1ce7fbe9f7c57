"""Every line apishield writes follows the schema of docs/logging.md (issue 13, F1, F2, F6).

The real gateway, the CLI and the middleware under a real uvicorn are started, made to
write every kind of line, and every line they wrote (stderr, access log) is parsed and
checked against the tables of docs/logging.md: its kind and event are documented, its
fields are documented for that kind with the documented type, the fields marked `always`
are there, and the first five come in the documented order. The doc cannot drift.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from apishield import ApiShieldMiddleware
from apishield.config import ConfigError, config_from_dict
from apishield.observe import events
from apishield.observe.logjson import LOGGERS, JsonFormatter, fields
from tests.conftest import DATA, free_port, json_lines, start_gateway, wait_for_port
from tests.logging_app import BOOM_PASSWORD, LEAKED_CARD

DOC = Path(__file__).parent.parent / "docs" / "logging.md"
LEADING = ["ts", "level", "kind", "logger", "msg"]
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,), "null": (type(None),)}


def documented() -> dict[str, dict[str, tuple[list[str], str]]]:
    """kind -> field -> (types, when), from the tables of docs/logging.md; kind `*` holds
    the fields every line has."""
    tables: dict[str, dict[str, tuple[list[str], str]]] = {}
    current: dict[str, tuple[list[str], str]] | None = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            title = line[3:]
            name = "*" if title == "Fields every line has" else (
                title.removeprefix("kind: ") if title.startswith("kind: ") else None)
            current = tables.setdefault(name, {}) if name else None
            continue
        row = re.match(r"^\| `([a-z_]+)` \| ([a-z, ]+) \| ([^|]+) \|", line)
        if current is not None and row:
            current[row[1]] = ([t.strip() for t in row[2].split(",")], row[3].strip())
    return tables


SCHEMA = documented()


def kind_values(field: str, kind: str) -> set[str]:
    """The backquoted values the doc lists for `field` of `kind` (e.g. the events)."""
    text = DOC.read_text()
    row = re.search(rf"^\| `{field}` \| [^|]+ \| [^|]+ \| ([^\n]+)\|$",
                    text.split(f"## kind: {kind}", 1)[1], flags=re.MULTILINE)
    assert row, (field, kind)
    return set(re.findall(r"`([a-z_-]+)`", row[1]))


def problems_of(line: dict[str, Any]) -> list[str]:
    """What is wrong with one log line, measured against the doc (empty: nothing)."""
    found = []
    kind = line.get("kind")
    if list(line)[:5] != LEADING:
        found.append(f"leading fields {list(line)[:5]}")
    if kind not in SCHEMA or kind == "*":
        return [*found, f"undocumented kind {kind!r}"]
    allowed = {**SCHEMA["*"], **SCHEMA[kind]}
    for name, value in line.items():
        if name not in allowed:
            found.append(f"{kind}: undocumented field {name!r}")
            continue
        types = allowed[name][0]
        if not isinstance(value, tuple(t for name in types for t in TYPES[name])) or (
                isinstance(value, bool) and "boolean" not in types):
            found.append(f"{kind}.{name}: {value!r} is not {types}")
    for name, (_, when) in allowed.items():
        if when == "always" and name not in line:
            found.append(f"{kind}: {name} missing")
    if not TS.match(str(line.get("ts"))):
        found.append(f"ts {line.get('ts')!r}")
    if "event" in line and kind in ("security", "audit", "lifecycle"):
        events_documented = (kind_values("event", kind) if kind != "security"
                             else set(re.findall(r"^- `([a-z-]+)` \(", DOC.read_text(),
                                                 flags=re.MULTILINE)))
        if line["event"] not in events_documented:
            found.append(f"{kind}: undocumented event {line['event']!r}")
    return found


def parse_all(text: str) -> list[dict[str, Any]]:
    """Every line of `text` as JSON (a line that is not is a failure)."""
    lines = []
    for raw in text.splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            pytest.fail(f"not a JSON log line: {raw!r}")
    return lines


def assert_schema(lines: list[dict[str, Any]]) -> None:
    bad = {json.dumps(line): problems for line in lines if (problems := problems_of(line))}
    assert bad == {}


def test_the_doc_tables_parse():
    assert set(SCHEMA) == {"*", "access", "security", "audit", "lifecycle", "error", "log"}
    assert list(SCHEMA["*"])[:5] == LEADING
    assert SCHEMA["log"] == {}  # only the common fields
    assert {"authn-failure", "authn-success-summary", "upstream-authn-failure", "ban"} <= set(
        re.findall(r"^- `([a-z-]+)` \(", DOC.read_text(), flags=re.MULTILINE))


CONTRACT = """
openapi: 3.1.0
info: {title: logging test, version: "1"}
security: [{apiKey: []}]
paths:
  /echo/keyed:
    get: {operationId: keyed, responses: {"200": {description: ok}}}
  /echo/admin:
    get:
      operationId: admin
      x-apishield: {require: {roles: [admin]}}
      responses: {"200": {description: ok}}
  /status/{code}:
    post:
      operationId: login
      security: []
      parameters: [{name: code, in: path, required: true, schema: {type: integer}}]
      responses: {"200": {description: ok}, "401": {description: wrong password}}
  /respond/{mode}/{code}/{kind}:
    get:
      operationId: respond
      security: []
      parameters:
        - {name: mode, in: path, required: true, schema: {type: string}}
        - {name: code, in: path, required: true, schema: {type: integer}}
        - {name: kind, in: path, required: true, schema: {type: string}}
      responses: {"200": {description: ok}}
components:
  securitySchemes:
    apiKey: {type: apiKey, in: header, name: X-Api-Key}
"""


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "apishield", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=30, check=False)


def test_gateway_and_cli_write_only_documented_lines(tmp_path, upstream_url):
    contract = tmp_path / "logging-contract.yaml"
    contract.write_text(CONTRACT)
    gw = start_gateway(tmp_path, upstream_url, {
        "trusted_proxies": ["127.0.0.1/32"],
        "redact": {"fields": ["is_admin"]},
        "rate_limiting": {"bans": {"rules": [
            {"name": "stuffing", "on": "authn-failure", "by": "ip", "threshold": 2,
             "window": "1m", "duration": "1m"}]}},
    }, contract=contract)
    try:
        created = cli(gw.config_path, "keys", "create", "--name", "alice")
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()
        audit = json_lines(created.stderr)
        assert_schema(audit)
        assert [(a["kind"], a["event"], a["name"]) for a in audit] == [
            ("audit", "api-key-created", "alice")]
        banned = cli(gw.config_path, "bans", "add", "--ip", "192.0.2.1", "--duration", "1h")
        assert [a["event"] for a in json_lines(banned.stderr, "audit")] == ["ban-added"]
        assert_schema(json_lines(banned.stderr))

        honest = {"X-Forwarded-For": "198.51.100.1", "X-Api-Key": key}
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            assert [client.get("/echo/keyed", headers=honest).status_code
                    for _ in range(3)] == [200] * 3
            assert client.get("/echo/admin", headers=honest).status_code == 403
            refused = client.get("/echo/keyed", headers={
                "X-Forwarded-For": "198.51.100.66", "X-Api-Key": "not-a-key"})
            assert refused.status_code == 401
            client.get("/echo/keyed", headers={"X-Forwarded-For": "198.51.100.66",
                                               "X-Api-Key": "still-not-a-key"})
            login = client.post("/status/401", headers={"X-Forwarded-For": "198.51.100.7"})
            assert login.status_code == 401
            masked = client.get("/respond/x/500/extra")
            assert masked.status_code == 500
        gw.process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
    finally:
        assert gw.stop() == 0

    stderr = parse_all(gw.stderr())
    assert_schema(stderr)
    access = parse_all(gw.access_log.read_text())
    assert_schema(access)
    assert {line["kind"] for line in access} == {"access"}
    assert len(access) == 8
    by_id = {line["request_id"]: line for line in access}
    assert by_id[refused.headers["x-request-id"]]["reason"] == "api-key-malformed"

    seen = {(line["kind"], line.get("event")) for line in stderr}
    assert {("security", event) for event in (
        "authn-failure", "authz-denied", "authn-success-summary", "upstream-authn-failure",
        "ban")} <= seen
    assert {("lifecycle", event) for event in (
        "start", "reload", "signal", "stopping", "stop")} <= seen

    security = [line for line in stderr if line["kind"] == "security"]
    failure = next(line for line in security if line["event"] == "authn-failure")
    assert failure["request_id"] == refused.headers["x-request-id"]
    assert (failure["reason"], failure["client_ip"]) == ("api-key-malformed", "198.51.100.66")
    summary = [line for line in security if line["event"] == "authn-success-summary"]
    assert [(s["subject"], s["count"], s["scheme"]) for s in summary] == [
        ("alice", 4, "apiKey")]  # three allowed, one authenticated then denied its role
    upstream_login = next(line for line in security
                          if line["event"] == "upstream-authn-failure")
    assert (upstream_login["request_id"], upstream_login["status"], upstream_login["operation"]
            ) == (login.headers["x-request-id"], 401, "login")
    ban = next(line for line in security if line["event"] == "ban")
    assert (ban["target"], ban["value"]) == ("ip", "198.51.100.66")

    error = next(line for line in stderr if line["kind"] == "error")
    assert error["request_id"] == masked.headers["x-request-id"] and error["status"] == 500
    assert '"is_admin": <redacted>' in error["msg"] and '"ann"' in error["msg"]
    stop = [line for line in stderr if line.get("event") in ("stopping", "stop")]
    assert [(line["event"], line["reason"]) for line in stop] == [
        ("stopping", "requested"), ("stop", "requested")]
    # the last interval's successes are written before the gateway says it stopped
    assert stderr.index(summary[0]) < stderr.index(stop[-1])


@pytest.fixture
def logging_app(tmp_path):
    """The middleware under a real uvicorn, stderr to a file (scanned for secrets too)."""
    (tmp_path / "contract.yaml").write_text((DATA / "middleware_contract.yaml").read_text())
    access = tmp_path / "access.log"
    config = tmp_path / "apishield.yaml"
    config.write_text(yaml.safe_dump({
        "contract": "contract.yaml", "access_log": {"path": str(access)},
        "redact": {"fields": ["card_number"]}}))
    port = free_port()
    stderr_path = tmp_path / "uvicorn.stderr"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "tests.logging_app:create",
             "--port", str(port), "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=stderr,
            env={**os.environ, "LOGGING_TEST_CONFIG": str(config), "PYTHONUNBUFFERED": "1"})
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}", process, stderr_path, access
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(10)


def test_middleware_under_uvicorn_writes_the_same_schema_redacted(logging_app):
    url, process, stderr_path, access = logging_app
    with httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/items/1").status_code == 200
        boom = client.get("/boom")
        assert boom.status_code == 500
        leak = client.get("/leak")
        assert leak.status_code == 500 and LEAKED_CARD not in leak.text
    process.terminate()
    process.wait(10)

    text = stderr_path.read_text()
    assert BOOM_PASSWORD not in text and LEAKED_CARD not in text
    lines = json_lines(text)  # uvicorn's own lines are uvicorn's, not JSON
    assert_schema(lines)
    errors = {line["request_id"]: line for line in lines if line["kind"] == "error"}
    crash = errors[boom.headers["x-request-id"]]
    assert crash["level"] == "error" and crash["exc_type"] == "RuntimeError"
    assert "password=<redacted>" in crash["traceback"]
    assert crash["traceback"].startswith("Traceback (most recent call last):")
    assert "\n" in crash["traceback"]  # its lines kept, inside one JSON string
    assert "card_number=<redacted>" in errors[leak.headers["x-request-id"]]["msg"]
    logged = parse_all(access.read_text())
    assert_schema(logged)
    assert [line["status"] for line in logged] == [200, 500, 500]


def test_the_middleware_leaves_a_configured_host_alone_but_redacts_its_records(tmp_path):
    """pytest configured the root logger (as a host app would): no handler is added, and
    the host's own format still gets the traceback masked."""
    logger = logging.getLogger("apishield")
    before = list(logger.handlers)
    (tmp_path / "contract.yaml").write_text((DATA / "middleware_contract.yaml").read_text())
    config = tmp_path / "apishield.yaml"
    config.write_text("contract: contract.yaml\naccess_log: {enabled: false}\n")
    ApiShieldMiddleware(lambda *a: None, config=config)  # type: ignore[arg-type,return-value]
    assert logger.handlers == before
    host = io.StringIO()
    handler = logging.StreamHandler(host)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("login failed: password=Xy7-sekrit-99")
        except ValueError:
            logger.error("request %s failed", "r1", exc_info=True)
    finally:
        logger.removeHandler(handler)
    written = host.getvalue()
    assert "ERROR request r1 failed" in written and "ValueError" in written
    assert "Xy7-sekrit-99" not in written and "password=<redacted>" in written
    assert all(any(isinstance(f, logging.Filter) for f in logging.getLogger(name).filters)
               for name in LOGGERS)


def test_formatter_fields_and_kinds_from_a_record():
    formatter = JsonFormatter()
    record = logging.LogRecord("apishield.security", logging.WARNING, __file__, 1,
                               "why %s", ("x",), None)
    line = json.loads(formatter.format(record))
    assert list(line) == LEADING and line["kind"] == "security" and line["msg"] == "why x"
    record = logging.LogRecord("apishield", logging.INFO, __file__, 1, "m", None, None)
    record.__dict__.update(fields("lifecycle", "rid", event="start", msg="not overridden"))
    line = json.loads(formatter.format(record))
    assert (line["kind"], line["request_id"], line["event"], line["msg"]) == (
        "lifecycle", "rid", "start", "m")
    assert problems_of(line) == []


def test_success_summary_counts_per_identity_and_flushes_once(caplog):
    from apishield.auth.principal import Principal

    alice, bob = Principal("apiKey", "alice", key_id="k1"), Principal("bearer", "bob")
    alice_again = Principal("apiKey", "alice", key_id="k1")  # another cached object
    events.flush()  # what earlier in-process tests counted
    for principal in (alice, alice, bob, alice_again):
        events.authenticated(principal)  # no loop here: written at flush
    with caplog.at_level(logging.INFO, "apishield.security"):
        events.flush()
        events.flush()  # nothing more to say
    counted = sorted((r.apishield_fields[2]["subject"], r.apishield_fields[2]["count"])
                     for r in caplog.records)
    assert counted == [("alice", 3), ("bob", 1)]


def test_examples_in_the_doc_load_as_written(tmp_path):
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) == 2
    loaded = [config_from_dict(yaml.safe_load(block), source_dir=tmp_path) for block in blocks]
    assert loaded[0].operations["createSession"].login is True
    assert loaded[0].operations["getStatus"].login is False
    assert loaded[1].redact.fields == ("ssn", "card_number", "x-internal-token")


def test_a_bad_redact_field_is_refused_with_its_location(tmp_path):
    with pytest.raises(ConfigError) as error:
        config_from_dict({"contract": "c.yaml", "redact": {"fields": ["ssn", "a b"]}},
                         source_dir=tmp_path)
    assert error.value.problems == [
        "redact.fields: item 1: 'a b' is not a field or header name; write the bare name, "
        "e.g. ssn or x-internal-token (letters, digits, '-', '_', '.')"]
