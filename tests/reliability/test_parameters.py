"""Oversized numerals against the real gateway: a 400 (or the body's 422) naming the
parameter, never a 500 (issue 11, item 4).

`int()` refuses a decimal string of more than 4,300 digits (Python's int max str digits),
and `float()` turns `1e999` into `inf`. Integer and number parameters (path, query, header,
cookie) and typed form fields (urlencoded and multipart share one path) are bounded before
conversion (`validate.MAX_NUMERAL_LENGTH`); a JSON body's integer past the interpreter's
limit is a 400 too. Requests go over raw sockets to the `apishield serve` process, in front
of the test upstream, with a contract of its own (written next to the gateway's config).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from apishield.steps.validate import MAX_NUMERAL_LENGTH
from tests.conftest import raw_exchange

CONTRACT = """\
openapi: 3.0.3
info: {title: numerals, version: "1"}
security: []
paths:
  /echo/numerals/{n}:
    parameters:
      - {name: n, in: path, required: true, schema: {type: integer}}
    get:
      operationId: numerals
      parameters:
        - {name: q, in: query, schema: {type: integer, maximum: 100}}
        - {name: x, in: query, schema: {type: number}}
        - {name: ids, in: query, explode: false, schema: {type: array, items: {type: integer}}}
        - {name: X-Count, in: header, schema: {type: integer}}
        - {name: count, in: cookie, schema: {type: integer}}
      responses: {"200": {description: ok}}
    post:
      operationId: numeralsBody
      requestBody:
        required: true
        content:
          application/json: {schema: {$ref: "#/components/schemas/Numbers"}}
          application/x-www-form-urlencoded: {schema: {$ref: "#/components/schemas/Numbers"}}
          multipart/form-data: {schema: {$ref: "#/components/schemas/Numbers"}}
      responses: {"200": {description: ok}}
components:
  schemas:
    Numbers:
      type: object
      properties:
        age: {type: integer, maximum: 150}
        price: {type: number}
"""

HUGE = "1" * 5000  # past int()'s 4,300 digits
OVERSIZED = "9" * (MAX_NUMERAL_LENGTH + 1)  # past the gateway's own bound, under int()'s
# the request line must get through to the parameter check: the URL limit is raised
OVERRIDES = {"limits": {"max_url_length": 65536}}


@pytest.fixture
def numerals(make_gateway, tmp_path: Path):
    contract = tmp_path / "numerals.yaml"
    contract.write_text(CONTRACT)
    return make_gateway(OVERRIDES, contract=contract)


def send(port: int, target: str, headers: dict[str, str] | None = None,
         method: str = "GET", body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """One request on its own connection; the status and the JSON body of the answer."""
    lines = [f"{method} {target} HTTP/1.1", "Host: gw", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    raw = raw_exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), raw[:200]
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(payload) if payload.strip() else {}


def assert_refused(answer: tuple[int, dict[str, Any]], pointer: str,
                   reason: str = "out-of-range", status: int = 400) -> None:
    code, document = answer
    assert code == status, (code, document)
    assert {"pointer": pointer, "reason": reason} in document.get("errors", []), document
    assert HUGE[:50] not in json.dumps(document)  # the value is never echoed


@pytest.mark.parametrize("digits", [HUGE, "-" + HUGE, OVERSIZED], ids=["5000", "-5000", "1001"])
def test_integer_parameters_past_the_bound_are_400_in_every_location(numerals, digits):
    port = numerals.port
    assert_refused(send(port, f"/echo/numerals/{digits}"), "/path/n")
    assert_refused(send(port, f"/echo/numerals/1?q={digits}"), "/query/q")
    assert_refused(send(port, f"/echo/numerals/1?ids=1,{digits},3"), "/query/ids")
    assert_refused(send(port, "/echo/numerals/1", {"X-Count": digits}), "/header/x-count")
    assert_refused(send(port, "/echo/numerals/1", {"Cookie": f"a=b; count={digits}"}),
                   "/cookie/count")


def test_integers_within_the_bound_are_still_checked_against_the_schema(numerals):
    port = numerals.port
    longest = "9" * MAX_NUMERAL_LENGTH
    assert_refused(send(port, f"/echo/numerals/1?q={longest}"), "/query/q", "maximum")
    status, echo = send(port, f"/echo/numerals/{longest}?q=7",
                        {"X-Count": longest, "Cookie": f"count={longest}"})
    assert status == 200 and echo["path"] == f"/echo/numerals/{longest}"


@pytest.mark.parametrize("value", [HUGE, HUGE + ".5", "1e999", "-1e999", "1" + "0" * 400 + "e0"],
                         ids=["5000-digits", "5000-digits-fraction", "1e999", "-1e999",
                              "overflow"])
def test_number_parameter_out_of_range_is_400(numerals, value):
    if len(value) <= MAX_NUMERAL_LENGTH:  # short, but no double holds it
        assert float(value) in (float("inf"), float("-inf"))
    assert_refused(send(numerals.port, f"/echo/numerals/1?x={value}"), "/query/x")


def test_number_parameter_in_range_passes(numerals):
    status, echo = send(numerals.port, "/echo/numerals/1?x=-1.5e300")
    assert status == 200 and echo["query"] == "x=-1.5e300"


def test_form_fields_past_the_bound_are_refused_with_their_pointer(numerals):
    """Typed form fields go through the same conversion: the body's 422, not a 500."""
    port = numerals.port
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert_refused(send(port, "/echo/numerals/1", form, "POST", f"age={HUGE}".encode()),
                   "/body/age", status=422)
    assert_refused(send(port, "/echo/numerals/1", form, "POST", b"price=1e999"),
                   "/body/price", status=422)
    boundary = "numerals-boundary"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"age\"\r\n\r\n"
                 f"{HUGE}\r\n--{boundary}--\r\n").encode()
    assert_refused(send(port, "/echo/numerals/1",
                        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
                        "POST", multipart), "/body/age", status=422)


def test_json_body_integer_past_the_interpreter_limit_is_400(numerals):
    json_type = {"Content-Type": "application/json"}
    assert_refused(send(numerals.port, "/echo/numerals/1", json_type, "POST",
                        f'{{"age": {HUGE}}}'.encode()), "/body")
    # within the interpreter's limit it is parsed and checked: the schema's 422
    status, document = send(numerals.port, "/echo/numerals/1", json_type, "POST",
                            f'{{"age": {OVERSIZED}}}'.encode())
    assert status == 422 and {"pointer": "/body/age", "reason": "maximum"} in document["errors"]


def test_gateway_still_serves_after_the_refusals(numerals):
    for target in (f"/echo/numerals/{HUGE}", f"/echo/numerals/1?x={HUGE}"):
        assert send(numerals.port, target)[0] == 400
    with socket.create_connection(("127.0.0.1", numerals.port), timeout=5):
        pass
    status, echo = send(numerals.port, "/echo/numerals/42?q=7&x=2.5", {"X-Count": "3"})
    assert status == 200 and echo["path"] == "/echo/numerals/42"
    assert "Traceback" not in numerals.stderr()
