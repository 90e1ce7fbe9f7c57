"""Contract-driven fuzzing of the real gateway in front of the demo API (issue 4).

schemathesis generates requests from the demo contract, valid ones and deliberately
invalid ones (wrong types, out-of-range values, missing or extra fields, bad media types,
...), and sends them to a gateway started as `apishield serve` in front of the demo API.
Two properties must hold for every one of them:

1. the gateway never answers 5xx (a crash or an unhandled case in the gateway; the demo
   upstream answers none for requests that obey its contract);
2. nothing that breaks the contract reaches the upstream: the demo records every request
   it receives and each is checked by `tests/contract_checker.py`, an oracle written from
   the OpenAPI specification and docs/validation.md that validates with the pure-Python
   `jsonschema` package, not with apishield's own validators.

Bounded and reproducible: a fixed number of examples per operation and mode, a fixed
seed, deterministic generation, no deadline (the first request of a connection is slower).

schemathesis speaks well-formed HTTP through `requests`, so it cannot send what only a raw
socket can (a repeated Content-Type, an empty chunked body): `RAW_PROBES` sends those, with
the same two properties checked.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hypothesis
import pytest
import requests
import schemathesis
import yaml
from schemathesis import GenerationMode

from apishield.demo.api import DemoServer, ReceivedRequest, make_server
from tests.conftest import RunningGateway, raw_exchange, start_gateway
from tests.contract_checker import ContractChecker

DEMO_CONTRACT = Path(__file__).parent.parent / "src" / "apishield" / "demo" / "openapi.yaml"
MAX_EXAMPLES = 100  # per operation and phase: ~2,000 requests, ~10 s on 2 cores

schema = schemathesis.openapi.from_path(
    DEMO_CONTRACT,
    config=schemathesis.Config.from_dict({
        "seed": 4,  # issue 4; any fixed value: the run is the same on every machine
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True,
                       "database": "none"},
        "phases": {"stateful": {"enabled": False}},
    }),
)


@dataclass
class FuzzTarget:
    """The running pair and what the fuzzing saw, for the summary test at the end."""

    gateway: RunningGateway
    upstream: DemoServer
    checker: ContractChecker
    session: requests.Session
    statuses: Counter[str] = field(default_factory=Counter)
    forwarded: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def demo_upstream() -> Iterator[DemoServer]:
    """The bundled demo API, recording every request it receives."""
    server = make_server("127.0.0.1", 0, record=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def credentials() -> dict[str, str]:
    """Headers every fuzzed request carries. Empty while the demo contract is public
    (`security: []`); when its operations require an API key, return it here, e.g.
    `{"X-Api-Key": DEMO_KEY}`, and configure the gateway fixture with that key."""
    return {}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory,
           demo_upstream: DemoServer) -> Iterator[FuzzTarget]:
    """`apishield serve` (the CLI, as in production) with the demo contract in front of
    the recording demo upstream: the wiring of `apishield demo`."""
    host, port = demo_upstream.server_address[:2]
    gateway = start_gateway(tmp_path_factory.mktemp("fuzz"), f"http://{host}:{port}",
                            contract=DEMO_CONTRACT)
    checker = ContractChecker(yaml.safe_load(DEMO_CONTRACT.read_text()))
    with requests.Session() as session:
        fuzz = FuzzTarget(gateway, demo_upstream, checker, session)
        yield fuzz
    gateway.stop()
    if fuzz.statuses:  # the schemathesis test ran in this process: it must have meant it
        assert_exercised_both_sides(fuzz)


def check_received(target: FuzzTarget, received: ReceivedRequest) -> list[str]:
    """The oracle's verdict on one request as the upstream got it."""
    target.forwarded[f"{received.method} {received.path.split('/')[1]}"] += 1
    found = target.checker.check(received.method, received.path, received.query,
                                 received.headers, received.body)
    target.violations += found
    return found


def describe(request: ReceivedRequest) -> str:
    body = request.body if request.body is None or len(request.body) < 300 \
        else request.body[:300] + b"..."
    return f"{request.method} {request.path}?{request.query} body={body!r}"


@schema.parametrize()
@hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                     database=None, suppress_health_check=list(hypothesis.HealthCheck))
def test_gateway_holds_the_contract(case: schemathesis.Case, target: FuzzTarget,
                                    credentials: dict[str, str]) -> None:
    """No 5xx from the gateway; every request the upstream gets obeys the contract."""
    before = len(target.upstream.received())
    response = case.call(base_url=target.gateway.url, session=target.session,
                         headers=credentials, timeout=10, allow_redirects=False)
    mode = "negative" if case.meta is not None and \
        case.meta.generation.mode == GenerationMode.NEGATIVE else "positive"
    target.statuses[f"{mode} {response.status_code}"] += 1
    assert response.status_code < 500, (
        f"gateway answered {response.status_code} to {case.method} {case.formatted_path} "
        f"{response.text[:500]}\nreproduce: {case.as_curl_command()}")
    for received in target.upstream.received()[before:]:
        found = check_received(target, received)
        assert not found, (
            f"the upstream received a request that breaks the contract: {found}\n"
            f"received: {describe(received)}\nreproduce: {case.as_curl_command()}")


def _raw(method: str, target: str, *headers: str, body: bytes = b"") -> bytes:
    """One HTTP/1.1 request, byte for byte, on a connection closed after it."""
    head = [f"{method} {target} HTTP/1.1", "Host: demo", *headers, "Connection: close"]
    if body and not any(h.lower().startswith(("content-length", "transfer-encoding"))
                        for h in headers):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


JSON = "Content-Type: application/json"
CHUNKED = "Transfer-Encoding: chunked"
# An invalid NewPet: an undeclared field (mass assignment) and a script in `name`.
BAD_PET = b'{"name": "<script>alert(1)</script>", "admin": true}'
RAW_PROBES = {
    # Regression (bug found by this module): the limits step checked the LAST
    # Content-Type, the body step validated by the FIRST; `text/plain` first skipped
    # validation, so BAD_PET reached the upstream with a 201.
    "content-type-repeated-plain-first": _raw(
        "POST", "/pets", "Content-Type: text/plain", JSON, body=BAD_PET),
    "content-type-repeated-json-first": _raw(
        "POST", "/pets", JSON, "Content-Type: text/plain", body=BAD_PET),
    # Regression (bug found by this module): `requestBody.required` was checked from the
    # head only, so an empty chunked body reached the upstream.
    "required-body-empty-chunked": _raw("POST", "/orders", JSON, CHUNKED, body=b"0\r\n\r\n"),
    "required-body-content-length-0": _raw("POST", "/pets", JSON, "Content-Length: 0"),
    "required-body-absent": _raw("POST", "/pets", JSON),
    "body-on-get": _raw("GET", "/pets", JSON, body=b"{}"),
    "chunked-body-on-get": _raw("GET", "/pets", CHUNKED, body=b"2\r\n{}\r\n0\r\n\r\n"),
    "invalid-body-chunked": _raw("POST", "/pets", JSON, CHUNKED,
                                 body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(BAD_PET), BAD_PET)),
    "duplicate-key": _raw("POST", "/orders", JSON,
                          body=b'{"user_id": 1, "pet_id": 1, "user_id": 2}'),
    "charset-not-utf8": _raw("POST", "/pets", "Content-Type: application/json; charset=latin-1",
                             body=b'{"name": "a"}'),
    "byte-order-mark": _raw("POST", "/pets", JSON, body=b'\xef\xbb\xbf{"name": "a"}'),
    "plus-json-undeclared": _raw("POST", "/pets", "Content-Type: application/merge-patch+json",
                                 body=b'{"name": "a"}'),
    "query-repeated": _raw("GET", "/pets?limit=1&limit=2"),
    "query-signed-integer": _raw("GET", "/pets?limit=%2B5"),
    "query-empty-integer": _raw("GET", "/pets?limit="),
    "query-semicolon": _raw("GET", "/pets?limit=5;tag=x"),
    "query-not-utf8": _raw("GET", "/pets?tag=%FF"),
    "query-undeclared": _raw("GET", "/pets?limit=5&admin=1"),
    "path-zero": _raw("GET", "/orders/0"),
    "path-leading-zero": _raw("GET", "/pets/01"),
    "path-huge": _raw("GET", "/pets/" + "9" * 400),
    "path-matrix": _raw("GET", "/pets/1;x"),
    "path-dot-segment": _raw("GET", "/pets/../users/1"),
    "path-encoded-slash": _raw("GET", "/users/1%2forders"),
    "method-undeclared": _raw("PATCH", "/pets/1", JSON, body=b'{"name": "a"}'),
    "head-of-get": _raw("HEAD", "/pets/1"),  # allowed: HEAD is GET without a body
    # Regression (bug found by this module): an escaped lone surrogate parses with Python's
    # json, so it was validated and stored upstream; then every response carrying it (the
    # 201, and GET /pets for every client afterwards) was a 502, orjson refusing it in the
    # response filter. Last on purpose: while the bug lives it poisons the demo's store.
    "lone-surrogate": _raw("POST", "/pets", JSON, body=b'{"name": "\\ud800"}'),
}


@pytest.mark.parametrize("payload", RAW_PROBES.values(), ids=RAW_PROBES.keys())
def test_raw_request_is_refused_or_conforms(target: FuzzTarget, payload: bytes) -> None:
    """Requests only a raw socket can send: no 5xx, and whatever the upstream receives
    obeys the contract."""
    before = len(target.upstream.received())
    answer = raw_exchange(target.gateway.port, payload, timeout=5)
    status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    assert status_line.startswith("HTTP/1.1 "), answer[:200]
    assert int(status_line.split()[1]) < 500, answer[:500]
    for received in target.upstream.received()[before:]:
        found = check_received(target, received)
        assert not found, (f"the upstream received a request that breaks the contract: "
                           f"{found}\nreceived: {describe(received)}\nsent: {payload!r}\n"
                           f"gateway answered: {status_line}")


def assert_exercised_both_sides(target: FuzzTarget) -> None:
    """A fuzz run that refused everything (or forwarded nothing) would prove nothing:
    valid requests must have reached the upstream and invalid ones must have been
    refused, for the bodies and the parameters alike. Checked when the module's target is
    torn down, in the process that ran the fuzzing (pytest-xdist may run this module's
    tests in two processes, each with its own target: a test reading the sums could land
    in the other one and see nothing)."""
    refused = sum(n for key, n in target.statuses.items()
                  if key.startswith("negative 4"))
    assert refused >= 50, target.statuses
    assert target.forwarded["POST pets"] >= 5, target.forwarded
    assert target.forwarded["POST orders"] >= 5, target.forwarded
    assert target.forwarded["GET pets"] >= 5, target.forwarded


def test_demo_records_only_when_asked() -> None:
    """`apishield demo` builds its upstream with the default: nothing is kept."""
    for record, expected in ((False, 0), (True, 1)):
        server = make_server("127.0.0.1", 0, record=record)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            answer = raw_exchange(server.server_address[1], _raw("GET", "/pets?limit=1"))
            assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
            assert len(server.received()) == expected
        finally:
            server.shutdown()
            server.server_close()
    assert server.received()[0] == ReceivedRequest(
        "GET", "/pets", "limit=1", (("Host", "demo"), ("Connection", "close")), b"")
