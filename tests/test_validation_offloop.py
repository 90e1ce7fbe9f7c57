"""Large request bodies are validated off the event loop (issue 18), with the same
outcomes as on it: the body step suspends, a thread parses, caps, validates and scans,
and the step's rerun reports what the thread found. Through a real gateway, and at the
step, where a detector that waits for the loop proves the loop runs meanwhile (a
deadlock, not a timing, if it did not)."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import httpx
import pytest

from apishield.config import load_config
from apishield.config.validation import Injection
from apishield.contract.loader import load_contract
from apishield.exchange import Exchange, Suspend
from apishield.problems import BadRequest, InjectionSuspected, InvalidBody
from apishield.steps import validate
from apishield.steps.injection import Detector
from apishield.steps.libinjection_c import Binding, binding
from apishield.steps.validate import OFF_LOOP_BYTES
from tests.conftest import json_lines, wait_for

SCHEMA = {
    "type": "object", "required": ["lines"],
    "properties": {
        "lines": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "properties": {"qty": {"type": "integer", "minimum": 1},
                           "note": {"type": "string"}}}},
        "deep": {},
    },
}
NOTE = "keep dry, deliver to the loading bay at the back of the building"


def large(**changes: object) -> dict:
    """A document whose JSON is over OFF_LOOP_BYTES."""
    document: dict = {"lines": [{"qty": 1 + i % 9, "note": NOTE} for i in range(900)]}
    document.update(changes)
    assert len(json.dumps(document)) > OFF_LOOP_BYTES
    return document


def nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


@pytest.fixture
def step(tmp_path: Path):
    document = {
        "openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "security": [],
        "paths": {"/x": {"post": {
            "operationId": "x",
            "requestBody": {"content": {"application/json": {"schema": SCHEMA}}},
            "responses": {"200": {"description": "ok"}},
        }}},
    }
    (tmp_path / "c.json").write_text(json.dumps(document))
    (tmp_path / "a.yaml").write_text("contract: c.json\n")
    config = load_config(tmp_path / "a.yaml")
    contract = load_contract(config)
    _, body = validate.build(contract, config.validation)
    return body, contract


def exchange_for(contract, document: object) -> Exchange:
    exchange = Exchange("POST", b"/x", b"", [(b"content-type", b"application/json")],
                        "127.0.0.1")
    exchange.operation = contract.operations[0]
    exchange.body = json.dumps(document).encode()
    return exchange


async def outcome(body, exchange: Exchange) -> Exception | None:
    """Run the step as the pipeline does: suspended, awaited, run again."""
    with pytest.raises(Suspend) as suspended:
        body.on_body(exchange)
    await suspended.value.wait()
    exchange.waited_for = suspended.value.owner
    try:
        body.on_body(exchange)
    except Exception as exc:
        return exc
    return None


async def test_a_large_body_has_the_outcomes_it_has_on_the_loop(step):
    body, contract = step
    assert await outcome(body, exchange_for(contract, large())) is None

    lines = large()["lines"]
    lines[800]["note"] = "1' or '1'='1"
    refused = await outcome(body, exchange_for(contract, {"lines": lines}))
    assert isinstance(refused, InjectionSuspected)
    assert refused.errors == [{"pointer": "/body/lines/800/note", "reason": "sql-injection"}]

    lines[800] = {"qty": 0, "note": NOTE}
    invalid = await outcome(body, exchange_for(contract, {"lines": lines}))
    assert isinstance(invalid, InvalidBody)
    assert invalid.errors == [{"pointer": "/body/lines/800/qty", "reason": "minimum"}]

    too_deep = await outcome(body, exchange_for(contract, large(deep=nested(40))))
    assert isinstance(too_deep, BadRequest) and too_deep.reason == "body-too-deep"


async def test_a_small_body_is_validated_in_place(step):
    body, contract = step
    exchange = exchange_for(contract, {"lines": [{"qty": 1, "note": "<script>x</script>"}]})
    with pytest.raises(InjectionSuspected):  # no Suspend: answered on the spot
        body.on_body(exchange)


async def test_the_loop_runs_while_a_large_body_is_validated(step):
    """The detector blocks until a task on the loop lets it go: validated on the loop,
    it would wait for the loop it blocks (and fail after 60 s, not hang)."""
    body, contract = step
    loop_ran = threading.Event()
    threads: set[str] = set()
    real = binding()

    def waiting_xss(text: str) -> bool:
        threads.add(threading.current_thread().name)
        assert loop_ran.wait(60), "the event loop never ran during validation"
        return real.xss(text)

    # A detector built with a waiting XSS function (not a patched method: a compiled
    # Detector's methods are read-only); one note has the `<` that reaches it.
    body.detector = Detector(Injection(), Binding(real.sqli, waiting_xss, real.kind))
    document = large()
    document["lines"][450]["note"] = "a < b and c > d"
    exchange = exchange_for(contract, document)
    with pytest.raises(Suspend) as suspended:
        body.on_body(exchange)
    validating = asyncio.ensure_future(suspended.value.wait())
    await asyncio.sleep(0)  # the loop is free: it runs this test's next line
    loop_ran.set()
    await validating
    exchange.waited_for = suspended.value.owner
    body.on_body(exchange)  # passed
    assert threads and threading.current_thread().name not in threads  # scanned, elsewhere


def test_large_bodies_through_the_gateway(make_gateway):
    """End to end: POST /echo (any JSON object, strings scanned) with bodies over the
    threshold: forwarded intact, or refused as a small one would be."""
    gateway = make_gateway()
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        document = large()
        sent = json.dumps(document).encode()
        response = client.post("/echo", content=sent,
                               headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text
        assert response.json()["body_len"] == len(sent)

        document["lines"][850]["note"] = "<img src=x onerror=alert(1)>"
        refused = client.post("/echo", json=document)
        assert refused.status_code == 400
        assert refused.json()["errors"] == [{"pointer": "/body/lines/850/note",
                                             "reason": "xss"}]

        deep = client.post("/echo", json=large(deep=nested(40)))
        assert deep.status_code == 400
        # and the connection goes on serving small ones
        assert client.post("/echo", json={"a": 1}).status_code == 200
    # the access log's precise reasons, in order
    lines = wait_for(lambda: (found := json_lines(gateway.access_log.read_text(), "access"))
                     and len(found) >= 4 and found)
    assert [line["reason"] for line in lines[:4]] == [None, "injection-in-body",
                                                      "body-too-deep", None]


async def test_large_bodies_through_the_middleware(step, tmp_path):
    """The ASGI front end takes the same suspended path (the app sees only what passed)."""
    from apishield import ApiShieldMiddleware

    seen: list[int] = []

    async def app(scope, receive, send):
        message = await receive()
        seen.append(len(message.get("body", b"")))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    wrapped = ApiShieldMiddleware(app, config=str(tmp_path / "a.yaml"))
    transport = httpx.ASGITransport(app=wrapped)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        sent = json.dumps(large()).encode()
        passed = await client.post("/x", content=sent,
                                   headers={"content-type": "application/json"})
        assert passed.status_code == 200, passed.text
        lines = large()["lines"]
        lines[10]["note"] = "; cat /etc/passwd"
        refused = await client.post("/x", json={"lines": lines})
        assert refused.status_code == 400
        assert refused.json()["errors"] == [{"pointer": "/body/lines/10/note",
                                             "reason": "shell-injection"}]
    assert seen == [len(sent)]
