"""Response protection (OWASP API3 excessive data exposure, checklist E3): what the
upstream answers is held to what the contract declares for it.

Per operation, `responses.mode` (or `x-apishield: {responses: ...}`) says how:

- `filter` (default): a JSON response whose status has a declared schema loses every
  property the schema does not declare and every `writeOnly` property, recursively, before
  the client sees it. An upstream that serializes its whole database row (`password_hash`,
  `is_admin`, internal ids) leaks nothing the contract does not mention.
- `validate`: such a response is checked against its schema instead (compiled once, like
  request schemas); one that breaks it (an undeclared or `writeOnly` property, a wrong
  type) is not sent: the client gets a generic 502 and the log gets one line with the
  request id and JSON pointers, never values. A status the operation does not declare is
  refused the same way. For APIs where a non-conforming answer is a bug to catch, not
  something to repair silently.
- `off`: bodies pass untouched.

In every mode a status the operation does not declare (no exact code, no `2XX` range, no
`default`) is logged: one warning per operation and status per minute, so an upstream
answering 418 to everything cannot flood the log.

Schemas are compiled once: into a `Shape` tree for filtering (`contract/shapes.py`), into a
jsonschema-rs validator for validation (the request conversion turned around: `writeOnly`
is refused instead of `readOnly`, no length caps). Both read a schema the same way: an
object schema that declares properties and says nothing about others is closed, an open
one (`additionalProperties`, no `properties`) keeps everything, and a response without a
declared schema passes as it is (the contract is silent on it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import jsonschema_rs
import orjson

from apishield.config import ConfigError, Responses
from apishield.contract.loader import Contract, Operation
from apishield.contract.schema import Caps, SchemaCompiler, SchemaError, error_pointer, error_reason
from apishield.contract.shapes import Builder, Shape
from apishield.exchange import Exchange, Headers, media_type
from apishield.observe.logjson import fields
from apishield.problems import BadGateway
from apishield.steps.validate import is_json

logger = logging.getLogger("apishield")

UNDECLARED_LOG_INTERVAL = 60.0  # seconds between two warnings for one operation and status
MAX_LOGGED_ERRORS = 10  # JSON pointers in one "response does not match" line
# 304 answers a conditional request about a representation the contract already declares
# (RFC 9110 15.4.5) and has no body; contracts rarely list it, refusing it would break
# every cache revalidation.
_ALWAYS_DECLARED = frozenset({304})


def prune(value: Any, shape: Shape | None, depth: int = 0) -> Any:
    """`value` without what `shape` does not declare (a new structure; input untouched)."""
    if shape is None or depth > 256:
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in shape.write_only:
                continue
            if key in shape.properties:
                out[key] = prune(item, shape.properties[key], depth + 1)
            elif shape.open:
                out[key] = item
        return out
    if isinstance(value, list) and shape.items is not None:
        return [prune(item, shape.items, depth + 1) for item in value]
    return value


def cut_json(body: bytes, shape: Shape | None) -> bytes | None:
    """`body` cut to `shape`, or None when nothing was cut (the upstream's bytes are then
    sent as they were); ValueError when it is not JSON. Plain data in and out, so that the
    gateway can run it in a worker process for large bodies: parsing megabytes holds the
    GIL for tens of milliseconds, which a thread would take from the event loop."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError("response-not-json") from None
    pruned = prune(document, shape)
    return None if pruned == document else orjson.dumps(pruned)


class Plan:
    """What the front end must do with one response body, decided on its head: cut it to
    `shape`, check it with `validator`, or refuse it whatever it holds (`refuse`, a
    reason). The front ends only test it for None and hand it back to the pipeline.

    A plain class, not a dataclass: one is made per filtered response, and in the compiled
    build a dataclass keeps its generated, interpreted `__init__` (issue 18)."""

    __slots__ = ("headers", "owner", "refuse", "shape", "status", "validator")

    def __init__(self, status: int, shape: Shape | None = None,
                 validator: jsonschema_rs.Validator | None = None,
                 refuse: str | None = None) -> None:
        self.status = status
        self.shape = shape
        self.validator = validator
        self.refuse = refuse
        self.owner = False  # the owner of the answer is checked first (steps/response_owner)
        self.headers: Headers | None = None  # the response head, when `owner` needs its media type

    @property
    def cuts(self) -> bool:
        """Whether applying it is `cut_json` alone (so it may run elsewhere)."""
        return self.validator is None and self.refuse is None and not self.owner


@dataclass(slots=True)
class _OperationPlan:
    mode: str
    name: str  # for log lines: the operationId, or METHOD /template
    declared: frozenset[int] | None  # statuses the contract declares; None: `default` is
    shapes: dict[str, Shape]  # status key ("200", "2XX", "DEFAULT") -> shape (filter)
    validators: dict[str, jsonschema_rs.Validator]  # status key -> validator (validate)


class _ResponseCompiler(SchemaCompiler):
    """The request schema conversion, turned around for responses.

    `writeOnly` properties (a password on its way in) must not come back out, while
    `readOnly` ones (`id`, `createdAt`) are what responses are for. The string and array
    caps bound what clients may send; a response's size is bounded by
    `responses.max_filter_bytes` instead (a list endpoint may return more than 1000 items).
    The `int32`/`int64` bounds still apply."""

    def _refuse_read_only(self, out: dict[str, Any], defs: dict[str, Any]) -> None:
        properties = out.get("properties")
        if not isinstance(properties, dict):
            return
        write_only = [name for name, sub in properties.items() if _flagged(sub, defs,
                                                                            "writeOnly")]
        for name in write_only:
            properties[name] = False
        if write_only and isinstance(out.get("required"), list):
            out["required"] = [name for name in out["required"] if name not in write_only]

    def _apply_caps(self, out: dict[str, Any]) -> None:
        had_length, had_items = "maxLength" in out, "maxItems" in out
        super()._apply_caps(out)  # int32/int64 bounds
        if not had_length:
            out.pop("maxLength", None)
        if not had_items:
            out.pop("maxItems", None)


def _flagged(converted: Any, defs: dict[str, Any], flag: str) -> bool:
    """Whether a converted property schema (or the `$defs` entry it points at) says
    `flag: true`."""
    if not isinstance(converted, dict):
        return False
    ref = converted.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        target = defs.get(ref[len("#/$defs/"):].replace("~1", "/").replace("~0", "~"))
        return isinstance(target, dict) and target.get(flag) is True
    return converted.get(flag) is True


def _declared_statuses(operation: Operation) -> frozenset[int] | None:
    """Every status code the operation's `responses` declares (`2XX` expands to 200-299);
    None when it declares `default`, which covers them all."""
    raw = operation.spec.get("responses") if isinstance(operation.spec, dict) else None
    codes: set[int] = set(_ALWAYS_DECLARED)
    for key in raw if isinstance(raw, dict) else ():
        text = str(key).upper()
        if text == "DEFAULT":
            return None
        if len(text) == 3 and text[0] in "12345" and text[1:] == "XX":
            base = int(text[0]) * 100
            codes.update(range(base, base + 100))
        elif text.isdigit():
            codes.add(int(text))
    return frozenset(codes)


class ResponseFilter:
    name = "response_filter"

    def __init__(self, contract: Contract, config: Responses | None = None) -> None:
        config = config or Responses()
        assert contract.resolver is not None
        builder = Builder(contract.resolver)
        compiler = _ResponseCompiler(contract.resolver, openapi30=contract.openapi30,
                                     caps=Caps(1, 1), strict=True)
        problems: list[str] = []
        self.plans: dict[str, _OperationPlan] = {}
        # filter mode: operation -> status key -> shape of the JSON body
        self.shapes: dict[str, dict[str, Shape]] = {}
        # operations whose JSON response bodies are read (filtered or validated): the
        # gateway asks the upstream for them unencoded
        self.reads_bodies: set[str] = set()
        self._quiet_until: dict[tuple[str, int | str], float] = {}
        self._quieted: dict[tuple[str, int | str], int] = {}
        for op in contract.operations:
            mode = op.policy.responses or config.mode
            plan = _OperationPlan(
                mode=mode,
                name=op.operation_id or f"{op.method} {op.path}",
                declared=_declared_statuses(op), shapes={}, validators={},
            )
            for status, media, schema, file in op.responses:
                if not is_json(media) or status in plan.shapes or status in plan.validators:
                    continue
                if mode == "filter":
                    shape = builder.build(schema, file)
                    if shape is not None:
                        plan.shapes[status] = shape
                elif mode == "validate":
                    try:
                        plan.validators[status], _ = compiler.compile(schema, file)
                    except SchemaError as exc:
                        key = "default" if status == "DEFAULT" else status
                        problems.append(f"{contract.source.name}#{op.pointer}/responses/"
                                        f"{key}/content: {exc}")
            if plan.shapes:
                self.shapes[op.pointer] = plan.shapes
            if plan.shapes or plan.validators:
                self.reads_bodies.add(op.pointer)
            self.plans[op.pointer] = plan
        if problems:
            raise ConfigError(problems)

    def plan_for(self, exchange: Exchange, status: int, headers: Headers) -> Plan | None:
        """What to do with this response's body, or None (send it as it is). Notes an
        undeclared status (logged, and refused in validate mode)."""
        operation = exchange.operation
        if operation is None:
            return None
        plan = self.plans[operation.pointer]
        if plan.declared is not None and status not in plan.declared:
            self._undeclared(exchange, plan, status)
            if plan.mode == "validate":
                return Plan(status, refuse="response-status-undeclared")
        per_status = plan.shapes or plan.validators
        if not per_status or exchange.method == "HEAD":
            return None  # nothing declared for this operation: no header scan
        content_type = None
        for name, value in headers:
            if name == b"content-type":
                content_type = value
        if content_type is None or not is_json(media_type(content_type)):
            return None
        code = str(status)
        key = code if code in per_status else code[0] + "XX"
        if key not in per_status:
            key = "DEFAULT"
            if key not in per_status:
                return None
        if plan.mode == "filter":
            return Plan(status, shape=plan.shapes[key])
        return Plan(status, validator=plan.validators[key])

    def apply(self, exchange: Exchange, plan: Plan, body: bytes,
              precut: tuple[bytes | None] | None = None) -> bytes:
        """The body to send: cut to the plan's shape, or as it is when it conforms.
        Raises BadGateway when it must not be sent (what cannot be checked is not sent).
        `precut`: `cut_json`'s result, when the front end computed it elsewhere."""
        if plan.refuse is not None:
            raise BadGateway(plan.refuse)
        if plan.shape is None and plan.validator is None:
            return body  # only read for its owner
        try:
            if plan.validator is None:
                cut = precut[0] if precut is not None else cut_json(body, plan.shape)
            else:
                document = orjson.loads(body)
        except ValueError:  # orjson.JSONDecodeError is one
            logger.warning("response to %s declared JSON but is not; refused", exchange.id,
                           extra=fields("log", exchange.id))
            raise BadGateway("response-not-json") from None
        if plan.validator is None:
            self._shape_mismatch(exchange, plan, body)
            if cut is None:
                return body  # nothing undeclared: the upstream's bytes as they were
            exchange.reason = exchange.reason or "response-filtered"
            return cut
        errors = []
        for error in plan.validator.iter_errors(document):
            errors.append(f"{error_pointer('/body', error)} ({error_reason(error)})")
            if len(errors) >= MAX_LOGGED_ERRORS:
                break
        if errors:
            operation = exchange.operation
            assert operation is not None
            logger.warning(
                "response to request %s (operation %s, status %d) does not match the "
                "contract: %s", exchange.id, self.plans[operation.pointer].name,
                plan.status, ", ".join(errors), extra=fields("log", exchange.id))
            raise BadGateway("response-invalid")
        return body

    def _undeclared(self, exchange: Exchange, plan: _OperationPlan, status: int) -> None:
        """Log an undeclared status, at most once a minute per operation and status (the
        lines in between are counted and the count is given with the next one)."""
        exchange.reason = exchange.reason or "response-status-undeclared"
        operation = exchange.operation
        assert operation is not None
        quieted = self._quieted_since((operation.pointer, status))
        if quieted is None:
            return
        logger.warning(
            "response status %d is not declared for operation %s (request %s, mode %s)%s",
            status, plan.name, exchange.id, plan.mode,
            f"; {quieted} more since the last such line" if quieted else "")

    def _quieted_since(self, key: tuple[str, int | str]) -> int | None:
        """None while `key` was logged less than a minute ago (counted); else how many
        times it was quieted since its last line (the caller logs now)."""
        now = time.monotonic()
        if now < self._quiet_until.get(key, 0.0):
            self._quieted[key] = self._quieted.get(key, 0) + 1
            return None
        self._quiet_until[key] = now + UNDECLARED_LOG_INTERVAL
        return self._quieted.pop(key, 0)

    def _shape_mismatch(self, exchange: Exchange, plan: Plan, body: bytes) -> None:
        """Filter mode cuts what an object or an array does not declare, but a body of
        the other kind (an object where the contract declares an array) passes as it is:
        say so, at most once a minute per operation (issue 16). Read from the body's first
        byte: no second parse."""
        shape = plan.shape
        if shape is None:
            return
        declared = ("array" if shape.items is not None and not shape.properties else
                    "object" if shape.properties and shape.items is None else None)
        first = body.lstrip()[:1]
        sent = {b"{": "object", b"[": "array"}.get(first)
        if declared is None or sent is None or sent == declared:
            return
        operation = exchange.operation
        assert operation is not None
        quieted = self._quieted_since((operation.pointer, "shape"))
        if quieted is None:
            return
        logger.warning(
            "response to request %s (operation %s, status %d) is a JSON %s where the "
            "contract declares an %s: passed as it is, not filtered%s", exchange.id,
            self.plans[operation.pointer].name, plan.status, sent, declared,
            f"; {quieted} more since the last such line" if quieted else "",
            extra=fields("log", exchange.id))
