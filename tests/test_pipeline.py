"""The pipeline's fixed step order and its single problem renderer."""

from __future__ import annotations

import json
from pathlib import Path

from apishield.config import config_from_dict
from apishield.contract.loader import load_contract
from apishield.exchange import Exchange
from apishield.pipeline import Pipeline
from apishield.problems import ALL_PROBLEMS, InternalError

DATA = Path(__file__).parent / "data"


def _pipeline(**extra):
    config = config_from_dict({"contract": "contract.yaml", "access_log": {"enabled": False},
                               **extra}, source_dir=DATA)
    return Pipeline(config, load_contract(config))


def test_steps_run_in_the_documented_order():
    pipeline = _pipeline(trusted_proxies=["10.0.0.0/8"],
                         cors={"allow_origins": ["https://app.example"]},
                         operations={"cachePrivate": {"require": {"roles": ["admin"]},
                                                      "ip": {"allow": ["10.0.0.0/8"]}},
                                     "echoPost": {"public": False,
                                                  "owner": {"param": "body.owner"}}},
                         rate_limiting={
                             "limits": [{"name": "a", "rate": "5/s"},
                                        {"name": "b", "rate": "5/s", "pre_auth": True}],
                             "concurrency": {"per_identity": 2}})
    head_order, body_order, response_order = pipeline.order
    assert pipeline.step_names() == [*head_order, *body_order, *response_order]
    assert head_order == ("client_ip", "ip_filter", "cors", "route", "operation_ip", "limits",
                          "pre_auth_limit", "authenticate", "authorize", "rate_limit",
                          "concurrency", "validate_parameters")
    assert response_order == ("cors", "rate_limit_headers", "security_headers")
    assert body_order == ("validate_body", "authorize")


def test_disabled_steps_cost_nothing():
    pipeline = _pipeline()
    names = pipeline.step_names()
    assert pipeline.order == _pipeline(trusted_proxies=["10.0.0.0/8"]).order  # the plan is fixed
    assert "client_ip" not in names  # no trusted proxies: no step at all
    assert "authorize" not in names  # no roles or ownership rules: no step either
    assert "pre_auth_limit" not in names and "concurrency" not in names


def test_every_problem_renders_masked_with_request_id():
    pipeline = _pipeline()
    for cls in ALL_PROBLEMS:
        exchange = Exchange("GET", b"/echo", b"", [], "127.0.0.1")
        status, headers, body = pipeline.problem_response(exchange, cls("secret-internal-reason"))
        document = json.loads(body)
        assert status == cls.status == document["status"]
        assert document["instance"] == f"urn:apishield:request:{exchange.id}"
        assert "secret-internal-reason" not in body.decode()
        names = dict(headers)
        assert names[b"content-type"] == b"application/problem+json"
        assert names[b"x-request-id"] == exchange.id.encode()
        assert names[b"x-content-type-options"] == b"nosniff"
        assert exchange.reason == "secret-internal-reason"


def test_internal_error_logs_traceback_but_sends_nothing(caplog):
    pipeline = _pipeline()
    exchange = Exchange("GET", b"/echo", b"", [], "127.0.0.1")
    try:
        raise ValueError("password=hunter2")
    except ValueError as exc:
        status, _, body = pipeline.internal_error(exchange, exc)
    assert status == InternalError.status
    assert b"hunter2" not in body and b"ValueError" not in body
    assert any(exchange.id in r.getMessage() and r.exc_info for r in caplog.records)


def test_request_ids_are_unique_and_random():
    ids = {Exchange("GET", b"/", b"", [], "").id for _ in range(1000)}
    assert len(ids) == 1000


def test_refusals_leave_no_reference_cycles():
    """A refusal keeps its Problem on the exchange; with its traceback, frames point back
    at the exchange: a cycle per refused request for the cyclic GC (bench/RESULTS.md,
    rate limiting: 14 ms pauses under a flood of 429s)."""
    import gc

    pipeline = _pipeline()
    gc.collect()
    gc.disable()
    try:
        for _ in range(200):
            exchange = Exchange("GET", b"/nowhere", b"", [(b"host", b"x")], "1.2.3.4")
            pipeline.on_head(exchange)
            assert exchange.problem is not None
            pipeline.problem_response(exchange, exchange.problem)
            pipeline.record(exchange, exchange.problem.status)
        assert gc.collect() == 0
    finally:
        gc.enable()


def _serialized(headers):
    return b"".join(b"%b: %b\r\n" % item for item in headers)


def test_response_head_is_on_response_serialized():
    """The gateway writes `response_head`'s bytes (the security headers pre-serialized);
    they must be exactly the fields and order `on_response` gives the ASGI middleware."""
    upstream = [(b"content-type", b"application/json"), (b"server", b"nginx"),
                (b"x-request-id", b"forged"), (b"cache-control", b"max-age=60"),
                (b"x-content-type-options", b"weaker"), (b"access-control-allow-origin", b"*"),
                (b"etag", b'"1"')]
    settings = [
        {},
        {"cors": {"allow_origins": ["https://app.example"]},
         "headers": {"hsts": "always", "content_security_policy": "default-src 'none'"}},
        {"operations": {"cachePublic": {"public": True}},
         "rate_limiting": {"limits": [{"name": "a", "rate": "5/s"}]}},
        {"headers": {"cache_control": None, "referrer_policy": None}},
    ]
    for extra in settings:
        pipeline = _pipeline(**extra)
        for path, origin in ((b"/cache", b"https://app.example"), (b"/echo", None)):
            for status in (200, 401, 404):
                request_headers = [(b"origin", origin)] if origin else []
                exchange = Exchange("GET", path, b"", request_headers, "127.0.0.1")
                pipeline.on_head(exchange)
                listed = pipeline.on_response(exchange, status, list(upstream))
                head = pipeline.response_head(exchange, status, list(upstream))
                assert head == _serialized(listed), (extra, path, status)
                assert b"x-request-id: " + exchange.id.encode() in head
                assert b"forged" not in head and b"server:" not in head
