"""Request validation against the contract (checklist B1, B2, B3, B4).

Two steps, both synchronous and compiled at load:

- `ParametersStep` (head phase, after `limits`): path, query, header and cookie
  parameters are deserialized per OpenAPI rules (`style`/`explode`: form, simple,
  spaceDelimited, pipeDelimited, deepObject), typed strictly (`"12999"` is an integer only
  where the schema says integer; `"yes"` is never a boolean; a numeric literal longer than
  `MAX_NUMERAL_LENGTH` or a number no double holds is `out-of-range`) and validated;
  required ones must be present; in strict mode an undeclared query parameter is refused.
  400.
- `BodyStep` (body phase, once the body is complete): a JSON body (`application/json` or
  `+json`) is decoded as strict UTF-8 and parsed once with duplicate keys refused (two
  parsers that disagree on `{"role":"user","role":"admin"}` are a privilege escalation),
  nesting depth and key count capped, `NaN`/`Infinity` refused: any of that is a 400; a
  well-formed body that breaks the schema is a 422 listing where. Form bodies
  (`application/x-www-form-urlencoded`, `multipart/form-data`) are decoded strictly,
  their text values typed by the schema the way parameters are, and the resulting object
  is validated the same way; multipart framing is read by `contract/multipart.py`.
  A body over `OFF_LOOP_BYTES` is validated in a thread: the step suspends (`Suspend`)
  and its rerun reports the thread's outcome.

Errors carry a JSON pointer and a reason, never the submitted value; at most
`validation.max_errors` of them.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, unquote

import jsonschema_rs

from apishield.config import Validation
from apishield.contract import multipart as multipart_body
from apishield.contract.loader import Contract, Operation, Parameter, escape_pointer
from apishield.contract.multipart import MULTIPART, MultipartError
from apishield.contract.schema import (
    Caps,
    PatternError,
    SchemaCompiler,
    SchemaError,
    error_entries,
    pattern_location,
)
from apishield.contract.shapes import Builder, Shape
from apishield.exchange import Exchange, Suspend, media_type
from apishield.problems import (
    BadRequest,
    InjectionSuspected,
    InvalidBody,
    InvalidParameters,
    PayloadTooLarge,
    Problem,
)
from apishield.steps.injection import Detector

_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)\Z")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z")
_DELIMITERS = {"form": ",", "simple": ",", "spaceDelimited": " ", "pipeDelimited": "|"}


def form_pairs(data: bytes) -> list[tuple[str, str]]:
    """`name=value&...` pairs as `parse_qsl(keep_blank_values=True, errors="strict")` gives
    them (a name without `=` has the value ""; empty parts are skipped). Without `%` or
    `+` nothing is decoded, and splitting is all `parse_qsl` would do: its interpreted
    unquoting was a fifth of the middleware's own time on a GET with a query (issue 18;
    tests/test_form_pairs.py checks both paths against `parse_qsl`). Raises
    UnicodeDecodeError for a non-ASCII byte, as the caller's decode did."""
    text = data.decode("ascii")
    if "%" in text or "+" in text:
        return parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="strict")
    pairs = []
    for part in text.split("&"):
        if part:
            name, _, value = part.partition("=")
            pairs.append((name, value))
    return pairs


@dataclass
class _ParamPlan:
    param: Parameter
    validator: jsonschema_rs.Validator | None
    kind: str | None  # the scalar type to coerce to: integer, number, boolean, string
    item_kind: str | None  # for arrays
    is_array: bool
    is_object: bool
    property_kinds: dict[str, str] = field(default_factory=dict)  # deepObject properties
    free: bool = False  # a free-text string (or array of them): scanned for payloads (B6)


@dataclass
class _OperationPlan:
    path: list[_ParamPlan]
    query: list[_ParamPlan]
    header: list[_ParamPlan]
    cookie: list[_ParamPlan]
    strict: bool
    known_query: frozenset[str]
    scan: bool = False  # payload detection on (B6)


def _scalar_kind(schema: Any) -> str | None:
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    return kind if isinstance(kind, str) else None


class _Refused:
    """What `_coerce` returns for a text it refuses; `reason` goes into the error."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


_INVALID = _Refused("type")  # not a literal of the type
_OUT_OF_RANGE = _Refused("out-of-range")  # a literal of the type, beyond what is converted

# The longest integer or number literal converted, sign, fraction and exponent included.
# Bounded before conversion because past it the conversion itself fails or lies: CPython
# refuses int() of more than `sys.get_int_max_str_digits()` digits (4,300 by default; the
# ValueError was a 500) since the conversion is quadratic, and jsonschema_rs reads a Python
# int through its decimal string: one it cannot convert passes every keyword unchecked
# (measured: 10**4300 passes `maximum: 3`). 1,000 is far beyond any integer an API means
# (int64 has 19 digits, a 2048-bit number 617; a double keeps 17 significant digits) and
# well under the interpreter's default. An operator who lowers the interpreter's limit below
# it (PYTHONINTMAXSTRDIGITS, 640 at least) is still safe: that ValueError is caught too.
MAX_NUMERAL_LENGTH = 1000


def _coerce(raw: str, kind: str | None) -> Any:
    """String -> typed value, strictly; a `_Refused` when it is not of the type (`_INVALID`)
    or too large to be converted and checked faithfully (`_OUT_OF_RANGE`).

    This is the one place parameters and form fields (urlencoded and multipart) become
    numbers: integers are bounded before `int()`, numbers must be finite doubles (`1e999`
    would be `inf`)."""
    if kind == "integer":
        if not _INTEGER.match(raw):
            return _INVALID
        return _to_int(raw)
    if kind == "number":
        if not _NUMBER.match(raw):
            return _INVALID
        if _INTEGER.match(raw):
            return _to_int(raw)
        if len(raw) > MAX_NUMERAL_LENGTH:
            return _OUT_OF_RANGE
        value = float(raw)  # the grammar above is one float() accepts
        return value if math.isfinite(value) else _OUT_OF_RANGE
    if kind == "boolean":
        return {"true": True, "false": False}.get(raw, _INVALID)
    return raw


def _to_int(raw: str) -> int | _Refused:
    """An integer literal (already matched by `_INTEGER`) -> int, within the bound."""
    if len(raw) > MAX_NUMERAL_LENGTH:
        return _OUT_OF_RANGE
    try:
        return int(raw)
    except ValueError:  # the interpreter's own digit limit, when set below the bound
        return _OUT_OF_RANGE


def _refusal(value: Any) -> str | None:
    """The reason a coerced value was refused, or None for a value."""
    return value.reason if isinstance(value, _Refused) else None


class ParametersStep:
    name = "validate_parameters"

    def __init__(self, contract: Contract, compilers: dict[bool, SchemaCompiler],
                 config: Validation, problems: list[str]) -> None:
        self.contract = contract
        self.max_errors = config.max_errors
        self.detector = Detector(config.injection)
        self.plans: dict[str, _OperationPlan] = {}
        for op in contract.operations:
            strict = config.strict if op.policy.strict is None else op.policy.strict
            plan = self._plan(op, compilers[strict], strict, problems)
            plan.scan = self.detector.enabled and op.policy.injection is not False
            if not plan.scan:
                for item in (*plan.path, *plan.query, *plan.header, *plan.cookie):
                    item.free = False
            self.plans[op.pointer] = plan

    def _plan(self, op: Operation, compiler: SchemaCompiler, strict: bool,
              problems: list[str]) -> _OperationPlan:
        groups: dict[str, list[_ParamPlan]] = {"path": [], "query": [], "header": [],
                                              "cookie": []}
        for param in op.parameters:
            validator = None
            if param.schema is not None:
                try:
                    validator, _ = compiler.compile(param.schema, param.file)
                except PatternError as exc:
                    _pattern_problem(exc, param.schema, param.file, param.pointer + "/schema",
                                     compiler.resolver, problems)
                    continue
                except SchemaError as exc:
                    problems.append(f"{param.file.name}#{param.pointer}/schema: {exc}")
                    continue
            resolved = _resolve_local(param.schema, compiler, param)
            kind = _scalar_kind(resolved)
            items = resolved.get("items") if isinstance(resolved, dict) else None
            properties = resolved.get("properties") if isinstance(resolved, dict) else None
            groups[param.location].append(_ParamPlan(
                param=param,
                validator=validator,
                kind=kind,
                item_kind=_scalar_kind(_resolve_local(items, compiler, param)),
                is_array=kind == "array",
                is_object=kind == "object",
                property_kinds={
                    name: _scalar_kind(_resolve_local(sub, compiler, param)) or "string"
                    for name, sub in (properties or {}).items()
                },
                free=_free_text(resolved if kind != "array"
                                else _resolve_local(items, compiler, param)),
            ))
        return _OperationPlan(
            path=groups["path"], query=groups["query"], header=groups["header"],
            cookie=groups["cookie"], strict=strict,
            known_query=frozenset(p.param.name for p in groups["query"])
            | _api_key_query_names(self.contract, op),
        )

    def on_head(self, exchange: Exchange) -> None:
        operation = exchange.operation
        assert operation is not None  # the route step runs first
        plan = self.plans[operation.pointer]
        if not (plan.path or plan.query or plan.header or plan.cookie or plan.strict):
            return
        errors: list[dict[str, str]] = []
        request = exchange
        for item in plan.path:
            raw = exchange.path_params.get(item.param.name)
            if raw is not None:
                self._check(item, _split(raw, item), "/path/", errors)
        if plan.query or (plan.strict and request.query):
            self._check_query(plan, request.query, errors)
        for item in plan.header:
            value = request.header(item.param.name.encode("latin-1"))
            if value is None:
                if item.param.required:
                    errors.append(_missing("/header/", item))
                continue
            self._check(item, _split(value.decode("latin-1").strip(), item), "/header/",
                        errors)
        if plan.cookie:
            cookies = _cookies(request.header(b"cookie"))
            for item in plan.cookie:
                if item.param.name not in cookies:
                    if item.param.required:
                        errors.append(_missing("/cookie/", item))
                    continue
                self._check(item, _split(cookies[item.param.name], item), "/cookie/", errors)
        if not errors:
            return
        injections = [e for e in errors if e["reason"] in _PAYLOADS]
        if injections and len(injections) == len(errors):
            problem: InvalidParameters | InjectionSuspected = InjectionSuspected(
                "injection-in-parameters")
            problem.errors = injections[: self.max_errors]
            raise problem
        errors = [e for e in errors if e["reason"] not in _PAYLOADS]
        if errors:
            problem = InvalidParameters("parameters-invalid")
            problem.errors = errors[: self.max_errors]
            raise problem

    def _check_query(self, plan: _OperationPlan, query: bytes,
                     errors: list[dict[str, str]]) -> None:
        try:
            pairs = form_pairs(query)
        except (UnicodeDecodeError, ValueError):
            raise BadRequest("query-not-decodable") from None
        values: dict[str, list[str]] = {}
        for name, value in pairs:
            values.setdefault(name, []).append(value)
        deep_names = {p.param.name for p in plan.query if p.param.style == "deepObject"}
        for item in plan.query:
            param = item.param
            if param.style == "deepObject":
                prefix = param.name + "["
                found = {k[len(prefix):-1]: v[-1] for k, v in values.items()
                         if k.startswith(prefix) and k.endswith("]")}
                if not found:
                    if param.required:
                        errors.append(_missing("/query/", item))
                    continue
                fields = {k: _coerce(v, item.property_kinds.get(k, "string"))
                          for k, v in found.items()}
                refused = next(filter(None, map(_refusal, fields.values())), None)
                if refused is not None:
                    errors.append({"pointer": "/query/" + param.name, "reason": refused})
                    continue
                self._validate(item, fields, "/query/", errors)
                continue
            raw_values = values.get(param.name)
            if raw_values is None:
                if param.required:
                    errors.append(_missing("/query/", item))
                continue
            if item.is_array:
                parts = raw_values if param.explode else _split_all(raw_values, param.style)
                self._check(item, parts, "/query/", errors)
            elif len(raw_values) > 1:
                errors.append({"pointer": "/query/" + param.name, "reason": "repeated"})
            else:
                self._check(item, raw_values[0], "/query/", errors)
        if plan.strict:
            for name in values:
                base = name.split("[", 1)[0] if "[" in name else name
                if name not in plan.known_query and base not in deep_names:
                    # the name is the client's: reported without it
                    errors.append({"pointer": "/query", "reason": "unknown-parameter"})
                    break

    def _check(self, item: _ParamPlan, raw: str | list[str], prefix: str,
               errors: list[dict[str, str]]) -> None:
        if item.is_array:
            parts = raw if isinstance(raw, list) else [raw]
            value: Any = [_coerce(part, item.item_kind) for part in parts]
            refused = next(filter(None, map(_refusal, value)), None)
        else:
            value = _coerce(raw if isinstance(raw, str) else raw[0], item.kind)
            refused = _refusal(value)
        if refused is not None:
            errors.append({"pointer": prefix + item.param.name, "reason": refused})
            return
        self._validate(item, value, prefix, errors)

    def _validate(self, item: _ParamPlan, value: Any, prefix: str,
                  errors: list[dict[str, str]]) -> None:
        if item.free:
            for text in (value if isinstance(value, list) else [value]):
                if isinstance(text, str):
                    kind = self.detector.check(text)
                    if kind is not None:
                        errors.append({"pointer": prefix + item.param.name, "reason": kind})
                        break
        if item.validator is None:
            return
        for error in item.validator.iter_errors(value):
            errors.extend(error_entries(prefix + item.param.name, error))
            if len(errors) >= self.max_errors:
                del errors[self.max_errors:]
                return


_PAYLOADS = frozenset({"sql-injection", "xss", "shell-injection"})


FORM = "application/x-www-form-urlencoded"


@dataclass(frozen=True, slots=True)
class _FormField:
    """A declared property of a form body, as far as typing its values needs."""

    kind: str | None  # scalar type of its value (of each item, for an array)
    is_array: bool  # repeated fields collect into it; any other field may appear once
    binary: bool = False  # a file (`format: binary` or `contentMediaType`): multipart only


_UNDECLARED = _FormField("string", False)


@dataclass(slots=True)
class _MultipartPlan:
    fields: dict[str, _FormField]
    # property -> the media ranges its parts may have (the contract's `encoding`)
    encodings: dict[str, tuple[str, ...]]


def _is_binary(schema: Any) -> bool:
    return isinstance(schema, dict) and (schema.get("format") == "binary"
                                         or "contentMediaType" in schema)


def _form_fields(schema: Any, file: Any, compiler: SchemaCompiler) -> dict[str, _FormField]:
    """For each declared property of a form body: its scalar type, whether it is an array
    (then its values are the items' type) and whether it holds files."""
    try:
        resolved, resolved_file, _ = compiler.resolver.deref(schema, file)
    except ValueError:
        return {}
    fields: dict[str, _FormField] = {}
    properties = resolved.get("properties") if isinstance(resolved, dict) else None
    for name, sub in (properties or {}).items():
        try:
            prop, prop_file, _ = compiler.resolver.deref(sub, resolved_file)
        except ValueError:
            continue
        kind = _scalar_kind(prop)
        if kind == "array":
            try:
                items, _, _ = compiler.resolver.deref(prop.get("items"), prop_file)
            except ValueError:
                items = None
            fields[name] = _FormField(_scalar_kind(items), True, _is_binary(items))
        else:
            fields[name] = _FormField(kind, False, _is_binary(prop))
    return fields


def _multipart_plan(schema: Any, file: Any, pointer: str, compiler: SchemaCompiler
                    ) -> _MultipartPlan:
    """The fields of a multipart body and the `encoding` object beside its schema (the
    media type object is found from the schema's pointer)."""
    encodings: dict[str, tuple[str, ...]] = {}
    try:
        media_object, _ = compiler.resolver.resolve_ref(
            "#" + pointer.removesuffix("/schema"), file)
    except ValueError:
        media_object = None
    encoding = media_object.get("encoding") if isinstance(media_object, dict) else None
    for name, entry in (encoding or {}).items():
        content_type = entry.get("contentType") if isinstance(entry, dict) else None
        if isinstance(content_type, str):
            encodings[str(name)] = tuple(media_type(part) for part in content_type.split(",")
                                         if part.strip())
    return _MultipartPlan(_form_fields(schema, file, compiler), encodings)


def _media_matches(media: str, ranges: tuple[str, ...]) -> bool:
    """`image/png` against `image/png, image/*, */*` (an `encoding.contentType`)."""
    return any(r in ("*/*", media) or (r.endswith("/*") and media.startswith(r[:-1]))
               for r in ranges)


def _field_pointer(name: str, fields: dict[str, _FormField]) -> str:
    """`/body/<name>` for a declared field; just `/body` for another (the client's own
    name is never echoed)."""
    return "/body/" + escape_pointer(name) if name in fields else "/body"


def _free_text(schema: Any) -> bool:
    """A string nothing narrows (no enum, const, pattern or format)."""
    if schema is None:
        return True
    if not isinstance(schema, dict):
        return False
    kind = _scalar_kind(schema)
    return kind in (None, "string") and not any(
        key in schema for key in ("enum", "const", "pattern", "format"))


def _resolve_local(node: Any, compiler: SchemaCompiler, param: Parameter) -> Any:
    """Follow the raw schema's `$ref`s far enough to learn its type (for coercion)."""
    try:
        resolved, _, _ = compiler.resolver.deref(node, param.file)
    except ValueError:
        return None
    return resolved


def _split(raw: str, item: _ParamPlan) -> str | list[str]:
    if item.is_array:
        return raw.split(_DELIMITERS.get(item.param.style, ","))
    return raw


def _split_all(values: list[str], style: str) -> list[str]:
    delimiter = _DELIMITERS.get(style, ",")
    return [part for value in values for part in value.split(delimiter)]


def _missing(prefix: str, item: _ParamPlan) -> dict[str, str]:
    return {"pointer": prefix + item.param.name, "reason": "missing"}


def _cookies(header: bytes | None) -> dict[str, str]:
    found: dict[str, str] = {}
    if header is None:
        return found
    for part in header.decode("latin-1").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name:
            found.setdefault(name, unquote(value.strip().strip('"')))
    return found


# -- bodies ----------------------------------------------------------------------------------


def is_json(media: str) -> bool:
    return media == "application/json" or (media.startswith("application/")
                                           and media.endswith("+json"))


class _TooDeep(ValueError):
    pass


class _Pairs:
    """The parser's object hook: counts keys across the whole body (reset per body) and
    refuses duplicates."""

    __slots__ = ("keys", "max_keys")

    def __init__(self, max_keys: int) -> None:
        self.keys = 0
        self.max_keys = max_keys

    def __call__(self, items: list[tuple[str, Any]]) -> dict[str, Any]:
        self.keys += len(items)
        if self.keys > self.max_keys:
            raise _TooDeep("body-too-many-keys")
        result = dict(items)
        if len(result) != len(items):
            raise _TooDeep("body-duplicate-key")
        return result


def _non_finite(name: str) -> Any:
    raise _TooDeep("body-non-finite-number")


# Bodies longer than this are validated in a thread, off the event loop (issue 18): a
# 100 KB JSON body takes milliseconds to parse, cap and scan (bench/RESULTS.md), during
# which every other connection would wait. In a thread the loop still shares the GIL with
# it, in the interpreter's 5 ms slices, but it answers others meanwhile. The thread hop
# costs ~100-200 us (measured on the loaded 2-core bench machine): a few percent of a
# 64 KB body's validation, more than a small body's whole validation.
OFF_LOOP_BYTES = 64 * 1024


class _OffLoop:
    """One body's validation in a thread: the `Suspend` owner, so the step's rerun finds
    the outcome here. `run` never raises (Suspend's contract): it keeps what was raised."""

    __slots__ = ("body", "check", "raised")

    def __init__(self, body: bytes, check: Callable[[], None]) -> None:
        self.body = body  # which body it is about: the rerun checks it is the same
        self.check = check
        self.raised: BaseException | None = None

    async def run(self) -> None:
        try:
            await asyncio.to_thread(self.check)
        except Exception as exc:  # a refusal (Problem) or a bug: raised on the rerun
            self.raised = exc.with_traceback(None) if isinstance(exc, Problem) else exc

    def outcome(self) -> None:
        """Raise what the validation raised, if anything."""
        if self.raised is not None:
            raise self.raised


_CONTAINERS = (dict, list)  # a tuple: `isinstance(x, dict | list)` builds a union per call
_Check = Callable[[str], str | None]  # Detector.check
_Trail = tuple[Any, ...]  # (parent trail, key or index), () at the root: a lazy JSON pointer


def _pointer(trail: _Trail, last: str | int) -> str:
    """`/body/...` for the value at `last` below `trail`."""
    parts = [last]
    while trail:
        trail, part = trail
        parts.append(part)
    return "/body" + "".join("/" + escape_pointer(str(part)) for part in reversed(parts))


class BodyStep:
    name = "validate_body"

    def __init__(self, contract: Contract, compilers: dict[bool, SchemaCompiler],
                 config: Validation, problems: list[str]) -> None:
        self.max_errors = config.max_errors
        self.max_depth = config.max_json_depth
        self.max_keys = config.max_json_keys
        self.max_parts = config.max_parts
        self.max_file_bytes = config.max_file_bytes
        self._local = threading.local()  # a JSON decoder per thread (`_decoder`)
        self.validators: dict[str, dict[str, jsonschema_rs.Validator]] = {}
        self.detector = Detector(config.injection)
        self.shapes: dict[str, dict[str, Shape | None]] = {}  # free strings to scan (B6)
        # form bodies: property -> how to type its values
        self.form_fields: dict[str, dict[str, _FormField]] = {}
        self.multipart: dict[str, _MultipartPlan] = {}
        assert contract.resolver is not None
        builder = Builder(contract.resolver)
        for op in contract.operations:
            compiler = compilers[config.strict if op.policy.strict is None
                                 else op.policy.strict]
            scan = self.detector.enabled and op.policy.injection is not False
            per_media: dict[str, jsonschema_rs.Validator] = {}
            for media, schema, file, pointer in op.bodies:
                if not (is_json(media) or media == FORM or media == MULTIPART):
                    continue
                try:
                    per_media[media], _ = compiler.compile(schema, file)
                except PatternError as exc:
                    _pattern_problem(exc, schema, file, pointer, compiler.resolver, problems)
                except SchemaError as exc:
                    problems.append(f"{file.name}#{pointer}: {exc}")
                if media == FORM:
                    self.form_fields[op.pointer] = _form_fields(schema, file, compiler)
                elif media == MULTIPART:
                    self.multipart[op.pointer] = _multipart_plan(schema, file, pointer,
                                                                 compiler)
                if scan:
                    self.shapes.setdefault(op.pointer, {})[media] = builder.build(schema, file)
            if per_media:
                self.validators[op.pointer] = per_media

    def needs_body(self, exchange: Exchange) -> bool:
        """Whether this request's body will be validated (then it is read whole)."""
        operation = exchange.operation
        if operation is None or operation.pointer not in self.validators:
            return False
        content_type = exchange.header(b"content-type") or b""
        media = media_type(content_type)
        return is_json(media) or media == FORM or media == MULTIPART

    def on_body(self, exchange: Exchange) -> None:
        operation = exchange.operation
        if operation is None:
            return
        validators = self.validators.get(operation.pointer)
        request = exchange
        if not request.body and operation.body_required:
            # an empty chunked body passes the head check (its length is unknown there)
            raise BadRequest("body-required", contract_rule=True)
        if validators is None or not request.body:
            return
        content_type = request.header(b"content-type") or b""
        media = media_type(content_type)
        validator = validators.get(media)
        if validator is None:
            json_media = [m for m in validators if is_json(m)]
            if not is_json(media) or not json_media:
                return
            media = json_media[0]  # e.g. application/*+json
            validator = validators[media]
        if len(request.body) > OFF_LOOP_BYTES:
            # a large body is validated in a thread (issue 18): the step suspends, the
            # pipeline awaits the thread and runs the step again, which finds the outcome
            waited = exchange.waited_for
            if isinstance(waited, _OffLoop) and waited.body is request.body:
                waited.outcome()
                return
            job = _OffLoop(request.body, partial(self._check, operation, request.body,
                                                 content_type, media, validator))
            raise Suspend(job.run, owner=job)
        self._check(operation, request.body, content_type, media, validator)

    def _check(self, operation: Operation, body: bytes, content_type: bytes, media: str,
               validator: jsonschema_rs.Validator) -> None:
        """Parse, cap, validate and scan one body; a refusal is raised."""
        shapes = self.shapes.get(operation.pointer)
        # the free strings are scanned when the operation scans (B6); its shape may be
        # None (a schema that is no object): then every string is free
        check = self.detector.check if shapes is not None and media in shapes else None
        shape = shapes.get(media) if shapes is not None else None
        found: list[dict[str, str]] = []
        if media == FORM:
            document = self.parse_form(body, self.form_fields[operation.pointer])
        elif media == MULTIPART:
            document = self.parse_multipart(body, content_type,
                                            self.multipart[operation.pointer])
        else:
            # one walk for the depth cap and the scan (issue 18: they were two); its
            # findings wait for the schema, whose 422 comes first
            document, text = self._load(body, content_type)
            found = self._walk(document, shape, check, strict=True)
            self._no_lone_surrogate(document, text)
            check = None
        errors: list[dict[str, str]] = []
        for error in validator.iter_errors(document):
            errors.extend(error_entries("/body", error))
            if len(errors) >= self.max_errors:
                del errors[self.max_errors:]
                break
        if errors:
            problem = InvalidBody("body-schema")
            problem.errors = errors
            raise problem
        if check is not None:  # a form: its strings are typed by the schema first
            found = self._walk(document, shape, check, strict=False)
        if found:
            suspected = InjectionSuspected("injection-in-body")
            suspected.errors = found
            raise suspected

    def _walk(self, document: Any, shape: Shape | None, check: _Check | None,
              strict: bool) -> list[dict[str, str]]:
        """One pass over a parsed document: containers nested deeper than `max_depth`
        (`strict`: 400 body-too-deep; else left unscanned) and, with `check`, the free-text
        strings that carry a payload (at most `max_errors`, in document order). The JSON
        pointer is only built for a finding (building one per value cost a fifth)."""
        found: list[dict[str, str]] = []
        if isinstance(document, str):
            if check is not None and (shape is None or shape.free_string):
                kind = check(document)
                if kind is not None:
                    found.append({"pointer": "/body", "reason": kind})
        elif isinstance(document, _CONTAINERS):
            try:
                self._visit(document, shape, 1, (), found, check, strict)
            except _TooDeep as exc:
                raise BadRequest(str(exc)) from None
        return found

    def _visit(self, node: dict[str, Any] | list[Any], shape: Shape | None, depth: int,
               trail: _Trail, found: list[dict[str, str]], check: _Check | None,
               strict: bool) -> None:
        """`_walk` below one container (recursion per container, not per value: the
        strings are read in the loop)."""
        if depth > self.max_depth:
            if strict:
                raise _TooDeep("body-too-deep")
            return
        most = self.max_errors
        if isinstance(node, dict):
            properties = shape.properties if shape is not None else None
            unscanned = shape.unscanned if shape is not None else ()
            for key, item in node.items():
                if isinstance(item, str):
                    if check is not None and len(found) < most and key not in unscanned:
                        sub = properties.get(key) if properties is not None else None
                        if sub is None or sub.free_string:
                            kind = check(item)
                            if kind is not None:
                                found.append({"pointer": _pointer(trail, key), "reason": kind})
                elif isinstance(item, _CONTAINERS):
                    self._visit(item, properties.get(key) if properties is not None else None,
                                depth + 1, (trail, key), found,
                                None if key in unscanned else check, strict)
        else:
            items = shape.items if shape is not None else None
            free = items is None or items.free_string
            for index, item in enumerate(node):
                if isinstance(item, str):
                    if check is not None and free and len(found) < most:
                        kind = check(item)
                        if kind is not None:
                            found.append({"pointer": _pointer(trail, index), "reason": kind})
                elif isinstance(item, _CONTAINERS):
                    self._visit(item, items, depth + 1, (trail, index), found, check, strict)

    def parse_form(self, body: bytes, fields: dict[str, _FormField]) -> Any:
        """`application/x-www-form-urlencoded` -> an object typed by the schema."""
        try:
            pairs = form_pairs(body)
        except (UnicodeDecodeError, ValueError):
            raise BadRequest("body-form-not-decodable", contract_rule=True) from None
        if len(pairs) > self.max_keys:
            raise BadRequest("body-too-many-keys", contract_rule=True)
        return self.typed_form(pairs, fields, "body-form-invalid")

    def typed_form(self, pairs: list[tuple[str, Any]], fields: dict[str, _FormField],
                   reason: str) -> dict[str, Any]:
        """Form fields -> an object typed by the schema, for both form media types: a
        field declared as an array collects its repeated values, any other may appear
        once; string values are typed as strictly as parameters (`"yes"` is not a
        boolean); a value that is not a string was typed by its part (JSON) and is kept."""
        document: dict[str, Any] = {}
        errors: list[dict[str, str]] = []
        for name, raw in pairs:
            field = fields.get(name, _UNDECLARED)
            value = _coerce(raw, field.kind) if isinstance(raw, str) else raw
            refused = _refusal(value)
            if refused is not None:
                errors.append({"pointer": _field_pointer(name, fields), "reason": refused})
            elif field.is_array:
                document.setdefault(name, []).append(value)
            elif name in document:
                errors.append({"pointer": _field_pointer(name, fields), "reason": "repeated"})
            else:
                document[name] = value
        if errors:
            problem = InvalidBody(reason)
            problem.errors = errors[: self.max_errors]
            raise problem
        return document

    def parse_multipart(self, body: bytes, content_type: bytes, plan: _MultipartPlan
                        ) -> dict[str, Any]:
        """`multipart/form-data` -> an object typed by the schema, like a urlencoded form.

        A part is a file when its property is declared binary (`format: binary`,
        `contentMediaType`), or when it carries a filename for a string property: its
        bytes are not decoded, only bounded (`max_file_bytes`), and it stands in the
        validated object as an empty string (present, a string; JSON Schema lengths count
        characters, not bytes). Any other part is text: strict UTF-8, typed by the
        schema, parsed as JSON when its property is an object. A part's media type must
        be one the contract's `encoding` lists for its property, when it lists any."""
        fields = plan.fields
        try:
            parts = multipart_body.parse(
                body, multipart_body.boundary_of(content_type),
                max_parts=self.max_parts, max_part_bytes=self.max_file_bytes)
        except MultipartError as exc:
            raise _multipart_problem(exc, fields) from None
        pairs: list[tuple[str, Any]] = []
        mismatched: list[dict[str, str]] = []
        for part in parts:
            field = fields.get(part.name, _UNDECLARED)
            allowed = plan.encodings.get(part.name)
            if allowed is not None and not _media_matches(part.media or "text/plain", allowed):
                mismatched.append({"pointer": _field_pointer(part.name, fields),
                                   "reason": "content-type"})
                continue
            if field.binary or (part.filename is not None and field.kind in (None, "string")):
                pairs.append((part.name, ""))
                continue
            pairs.append((part.name, self._text_part(part, field, fields)))
        if mismatched:
            problem = InvalidBody("body-multipart-content-type")
            problem.errors = mismatched[: self.max_errors]
            raise problem
        return self.typed_form(pairs, fields, "body-multipart-invalid")

    def _text_part(self, part: multipart_body.Part, field: _FormField,
                   fields: dict[str, _FormField]) -> Any:
        """A text part's value: a string (typed later, like a urlencoded value), or what
        its JSON holds when its property is an object."""
        pointer = _field_pointer(part.name, fields)
        if part.charset not in (None, b"utf-8", b"utf8", b"us-ascii"):
            raise _bad_part("body-multipart-charset", pointer, "charset")
        if field.kind == "object":
            try:
                return self.parse(part.data, b"application/json")
            except BadRequest as exc:
                raise _bad_part(exc.reason, pointer, "json") from None
        try:
            return part.data.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad_part("body-multipart-not-utf8", pointer, "utf-8") from None

    def parse(self, body: bytes, content_type: bytes) -> Any:
        """Parse once, refusing duplicate keys (in the object hook), excess key counts,
        non-finite numbers, excess depth and unpaired surrogates (a JSON part of a
        multipart body; a JSON body gets the same checks in `on_body`, the depth one in the
        walk that also scans it)."""
        document, text = self._load(body, content_type)
        self._walk(document, None, None, strict=True)
        self._no_lone_surrogate(document, text)
        return document

    def _load(self, body: bytes, content_type: bytes) -> tuple[Any, str]:
        """The document and its text: parsed once, refusing duplicate keys (in the object
        hook), excess key counts and non-finite numbers.

        Measured (bench/RESULTS.md): stdlib json with this hook costs ~175 us more than
        without on 100 KB; orjson plus a colon count outside string literals (orjson keeps
        the last duplicate silently) cost more, so the hook stays."""
        charset = _CHARSET.search(content_type)
        if charset and charset.group(1).lower() not in (b"utf-8", b"utf8"):
            raise BadRequest("body-charset-not-utf8")  # RFC 8259 8.1: JSON is UTF-8
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("body-invalid-utf8") from None
        scan, pairs = self._decoder()
        pairs.keys = 0
        try:
            # `decoder.decode(text)` without its two interpreted frames (json/decoder.py):
            # the C scanner from the first non-space character, then nothing but JSON
            # whitespace may follow (RFC 8259 2); StopIteration is "Expecting value"
            start = len(text) - len(text.lstrip(_JSON_SPACE))
            document, end = scan(text, start)
            if end != len(text) and text[end:].strip(_JSON_SPACE):
                raise BadRequest("body-malformed-json", contract_rule=True)
        except StopIteration:
            raise BadRequest("body-malformed-json", contract_rule=True) from None
        except _TooDeep as exc:
            raise BadRequest(str(exc), contract_rule=True) from None
        except json.JSONDecodeError:
            raise BadRequest("body-malformed-json", contract_rule=True) from None
        except ValueError:
            # well-formed, but an integer past the interpreter's digit limit (4,300 by
            # default; int() refuses it): the JSON twin of MAX_NUMERAL_LENGTH
            raise _bad_part("body-number-too-large", "/body", "out-of-range") from None
        except RecursionError:  # nesting beyond Python's stack
            raise BadRequest("body-malformed-json", contract_rule=True) from None
        return document, text

    def _decoder(self) -> tuple[Callable[[str, int], tuple[Any, int]], _Pairs]:
        """This thread's JSON scanner (the C one of a `json.JSONDecoder` with the hook) and
        its hook (issue 18: `json.loads` with a hook builds a decoder and its C scanner per
        call, ~5 us of a 1 KB body's ~40 us; one per thread, since large bodies are parsed
        in threads)."""
        local = self._local
        try:
            return local.scan, local.pairs
        except AttributeError:
            pairs = _Pairs(self.max_keys)
            decoder = json.JSONDecoder(object_pairs_hook=pairs, parse_constant=_non_finite)
            local.scan = decoder.scan_once  # type: ignore[attr-defined]
            local.pairs = pairs
            return local.scan, pairs

    @staticmethod
    def _no_lone_surrogate(document: Any, text: str) -> None:
        if _SURROGATE_ESCAPE.search(text) and _lone_surrogate(document):
            # `"\ud800"` parses here but is no Unicode text (RFC 8259 8.2, RFC 7493 2.1):
            # stored upstream, it comes back in responses that orjson (and many other
            # parsers) refuse; every later read of that record would be a 502
            raise BadRequest("body-lone-surrogate", contract_rule=True)


def _bad_part(reason: str, pointer: str, why: str) -> BadRequest:
    problem = BadRequest(reason, contract_rule=True)
    problem.errors = [{"pointer": pointer, "reason": why}]
    return problem


def _multipart_problem(exc: MultipartError, fields: dict[str, _FormField]) -> Problem:
    """A multipart body that cannot be read: 413 for a part over `max_file_bytes` (a size
    limit, enforced in every mode like the body limit), else 400 (a contract rule, like
    malformed JSON)."""
    if exc.reason in ("content-type-invalid", "boundary-missing", "boundary-invalid"):
        pointer = "/header/content-type"
    elif exc.reason == "too-many-parts":
        pointer = "/body"
    else:
        pointer = _field_pointer(exc.name, fields) if exc.name is not None else "/body"
    if exc.too_large:
        too_large = PayloadTooLarge("body-multipart-part-too-large")
        too_large.errors = [{"pointer": pointer, "reason": "max-file-bytes"}]
        return too_large
    reason = "max-parts" if exc.reason == "too-many-parts" else exc.reason
    return _bad_part("body-multipart-" + exc.reason, pointer, reason)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_CHARSET = re.compile(rb"charset=\"?([A-Za-z0-9_-]+)")
_JSON_SPACE = " \t\n\r"  # RFC 8259's whitespace (json.decoder.WHITESPACE)


def _lone_surrogate(document: Any) -> bool:
    """Whether a string (or key) of a parsed document holds an unpaired surrogate (a pair
    of escapes decodes to one character and is fine). Only called when the text has a
    surrogate escape at all: strict UTF-8 decoding lets no raw surrogate through."""
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _api_key_query_names(contract: Contract, op: Operation) -> frozenset[str]:
    """Query parameters an `apiKey` scheme of the operation reads: declared by the
    contract's security, so strict mode must not call them unknown."""
    names = set()
    for requirement in op.security or ():
        for scheme_name in requirement if isinstance(requirement, dict) else ():
            scheme = contract.security_schemes.get(scheme_name, {})
            if scheme.get("type") == "apiKey" and scheme.get("in") == "query":
                names.add(str(scheme.get("name")))
    return frozenset(names)


def _pattern_problem(exc: PatternError, schema: Any, file: Any, pointer: str,
                     resolver: Any, problems: list[str]) -> None:
    """A pattern that cannot compile, reported once at the pattern itself, however many
    operations use it (a shared component used 40 times was 40 lines)."""
    where = pattern_location(schema, file, pointer, resolver, exc.pattern) or (file, pointer)
    line = f"{where[0].name}#{where[1]}: {exc}"
    if line not in problems:
        problems.append(line)


def build(contract: Contract, config: Validation) -> tuple[ParametersStep, BodyStep]:
    """Compile every parameter and body schema; ConfigError lists what cannot compile."""
    from apishield.config import ConfigError

    assert contract.resolver is not None
    caps = Caps(config.max_string_length, config.max_array_items)
    compilers = {
        strict: SchemaCompiler(contract.resolver, openapi30=contract.openapi30, caps=caps,
                               strict=strict)
        for strict in (True, False)
    }
    problems: list[str] = []
    steps = (ParametersStep(contract, compilers, config, problems),
             BodyStep(contract, compilers, config, problems))
    if problems:
        raise ConfigError(problems)
    return steps
