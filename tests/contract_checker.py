"""An independent oracle: does one HTTP request, as an upstream received it, obey the
contract (the OpenAPI document plus the rules docs/validation.md says apishield enforces)?

Written from the OpenAPI specification and docs/validation.md, NOT from apishield's code,
and validating with the pure-Python `jsonschema` package rather than jsonschema-rs, so a
bug in apishield's conversion, coercion or validators cannot hide itself here. It covers
what the bundled demo contract (and the property tests' schemas) use; a contract that
needs more (parameter styles other than form/simple, multipart bodies, security schemes)
makes `ContractChecker` raise at construction instead of checking it half-way.

The documented apishield rules encoded here:
- strict mode: an object schema that declares `properties` (or composes with
  `allOf`/`anyOf`/`oneOf`) and says nothing about extra properties refuses them
  (`unevaluatedProperties: false`); composition members are left open; an undeclared
  query parameter is refused;
- `readOnly` properties are refused in requests;
- strings without `maxLength` (and no enum/const) get the string cap, arrays without
  `maxItems` the array cap;
- `format: int32/int64` bound numbers (checked here by a format checker, not by bounds);
- OpenAPI 3.0: `nullable` adds null (to `type`, to `enum`, or as `anyOf` when there is no
  `type`), boolean `exclusiveMinimum/Maximum` turn the bound exclusive;
- parameters are typed strictly: an integer is `-?[0-9]+`, a number a JSON number, a
  boolean `true`/`false`;
- JSON bodies: UTF-8, no duplicate keys, no NaN/Infinity, strings that are Unicode (no
  escaped lone surrogate).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes

from jsonschema import Draft202012Validator, FormatChecker

# -- formats: written here, so neither side's format library decides for the other ----------

_DATE_TIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})\Z",
    re.ASCII)
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                   r"[0-9a-fA-F]{12}\Z", re.ASCII)
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = re.compile(  # RFC 5321 Mailbox: dot-atom or quoted local part, domain or literal
    rf'(?:{_ATOM}(?:\.{_ATOM})*|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*")'
    rf"@(?:{_LABEL}(?:\.{_LABEL})*|\[\d{{1,3}}(?:\.\d{{1,3}}){{3}}\])\Z", re.ASCII)
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def is_date_time(value: str) -> bool:
    """RFC 3339 `date-time` (section 5.6), a real calendar date; a leap second only at
    23:59:60 UTC."""
    match = _DATE_TIME.match(value)
    if match is None:
        return False
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    offset_text = match.group(8)
    if offset_text in ("Z", "z"):
        offset = timedelta(0)
    else:
        hours, minutes = int(offset_text[1:3]), int(offset_text[4:6])
        if hours > 23 or minutes > 59:
            return False
        offset = timedelta(hours=hours, minutes=minutes) * (-1 if offset_text[0] == "-" else 1)
    try:
        moment = datetime(year, month, day, hour, minute, min(second, 59),
                          tzinfo=timezone(offset))
    except ValueError:
        return False
    if second == 60:
        utc = moment.astimezone(UTC)
        return utc.hour == 23 and utc.minute == 59
    return second < 60


def format_checker() -> FormatChecker:
    """The formats apishield documents, each checked by this module's own rule."""
    checker = FormatChecker(formats=())
    checker.checks("date-time")(lambda v: not isinstance(v, str) or is_date_time(v))
    checker.checks("uuid")(lambda v: not isinstance(v, str) or bool(_UUID.match(v)))
    checker.checks("email")(lambda v: not isinstance(v, str) or bool(_EMAIL.match(v)))
    for name, (low, high) in INT_RANGES.items():
        checker.checks(name)(
            lambda v, low=low, high=high: isinstance(v, bool)
            or not isinstance(v, int | float) or low <= v <= high)
    return checker


FORMATS = format_checker()


def reference_validator(schema: Any) -> Draft202012Validator:
    """A pure-Python 2020-12 validator with the formats above asserted."""
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=FORMATS)


def ecma_to_python(pattern: str) -> str:
    """An ECMA-262 `pattern` for Python's re (which jsonschema uses): `$` is the end of the
    text in ECMA-262 but also matches before a final newline in Python, so it becomes `\\Z`
    (outside character classes and escapes)."""
    out: list[str] = []
    in_class = escaped = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "$":
            out.append("\\Z")
            continue
        out.append(char)
    return "".join(out)


# -- OpenAPI schema -> the JSON Schema apishield documents enforcing ---------------------------


@dataclass(frozen=True)
class Rules:
    """apishield's documented request rules, with its default caps (docs/configuration.md)."""

    strict: bool = True
    max_string_length: int = 8192
    max_array_items: int = 1000


_MAPS = ("properties", "patternProperties", "$defs", "dependentSchemas")
_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_ONE = ("items", "additionalProperties", "unevaluatedProperties", "not", "contains",
        "propertyNames", "if", "then", "else", "unevaluatedItems")
_COMPOSITIONS = ("allOf", "anyOf", "oneOf")
_NOT_KEYWORDS_30 = ("nullable", "example", "discriminator", "xml", "externalDocs",
                    "deprecated")
_NOT_KEYWORDS_31 = ("example", "discriminator", "xml", "externalDocs")


class RequestSchemas:
    """Turns schemas of one OpenAPI document into self-contained 2020-12 schemas, following
    the rules above. Components become `$defs`; a component used as a composition member
    gets an open twin (`<name>.open`)."""

    def __init__(self, document: Mapping[str, Any], rules: Rules) -> None:
        self.document = document
        self.rules = rules
        self.openapi30 = str(document.get("openapi", "")).startswith("3.0")

    def convert(self, node: Any) -> dict[str, Any]:
        defs: dict[str, Any] = {}
        converted = self._node(node, defs, member=False)
        schema = {"allOf": [converted]} if isinstance(converted, bool) else dict(converted)
        if defs:
            schema["$defs"] = {**schema.get("$defs", {}), **defs}
        return schema

    def _resolve(self, ref: str) -> Any:
        if not ref.startswith("#/"):
            raise NotImplementedError(f"the checker follows local references only: {ref}")
        node: Any = self.document
        for token in ref[2:].split("/"):
            node = node[token.replace("~1", "/").replace("~0", "~")]
        return node

    def _node(self, node: Any, defs: dict[str, Any], *, member: bool) -> Any:
        if isinstance(node, bool):
            return node
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1] + (".open" if member else "")
            if name not in defs:
                defs[name] = {}  # placeholder while converting a recursive schema
                defs[name] = self._node(self._resolve(node["$ref"]), defs, member=member)
            reference = {"$ref": f"#/$defs/{name}"}
            rest = {k: v for k, v in node.items() if k != "$ref"}
            if rest and not self.openapi30:  # 3.0 ignores siblings of $ref; 3.1 keeps them
                return {"allOf": [reference, self._node(rest, defs, member=True)]}
            return reference
        skip = _NOT_KEYWORDS_30 if self.openapi30 else _NOT_KEYWORDS_31
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in skip or key.startswith("x-"):
                continue
            if key in _MAPS:
                out[key] = {k: self._node(v, defs, member=False) for k, v in value.items()}
            elif key in _LISTS:
                out[key] = [self._node(v, defs, member=key in _COMPOSITIONS) for v in value]
            elif key in _ONE:
                out[key] = self._node(value, defs, member=False)
            elif key == "pattern" and isinstance(value, str):
                out[key] = ecma_to_python(value)
            else:
                out[key] = copy.deepcopy(value)
        if self.openapi30:
            self._exclusive_30(node, out)
        self._read_only(node, out)
        kinds = out.get("type")
        kinds = set(kinds) if isinstance(kinds, list) else {kinds}
        if "string" in kinds and not {"maxLength", "enum", "const"} & out.keys():
            out["maxLength"] = self.rules.max_string_length
        if "array" in kinds and "maxItems" not in out:
            out["maxItems"] = self.rules.max_array_items
        shaped = "properties" in out or any(k in out for k in _COMPOSITIONS)
        open_said = "additionalProperties" in out or "unevaluatedProperties" in out
        if self.rules.strict and not member and shaped and (kinds & {None, "object"}) \
                and not open_said:
            out["unevaluatedProperties"] = False
        if self.openapi30 and node.get("nullable") is True:
            return self._nullable_30(out)
        return out

    @staticmethod
    def _exclusive_30(node: Mapping[str, Any], out: dict[str, Any]) -> None:
        """3.0's boolean exclusiveMinimum/Maximum make `minimum`/`maximum` exclusive."""
        for bound, exclusive in (("minimum", "exclusiveMinimum"),
                                 ("maximum", "exclusiveMaximum")):
            if isinstance(node.get(exclusive), bool):
                flag = out.pop(exclusive)
                if flag and bound in out:
                    out[exclusive] = out.pop(bound)

    @staticmethod
    def _nullable_30(out: dict[str, Any]) -> dict[str, Any]:
        """3.0's `nullable: true` also admits null (with `type`, in `enum` too)."""
        kind = out.get("type")
        if isinstance(kind, str):
            out["type"] = [kind, "null"]
            if "enum" in out and None not in out["enum"]:
                out["enum"] = [*out["enum"], None]
            return out
        if kind is None:
            return {"anyOf": [out, {"type": "null"}]}
        return out

    def _read_only(self, node: Mapping[str, Any], out: dict[str, Any]) -> None:
        """Properties the contract marks `readOnly` become `false` (and not required)."""
        properties = node.get("properties")
        if not isinstance(properties, dict):
            return
        for name, sub in properties.items():
            if self._is_read_only(sub, set()):
                out["properties"][name] = False
                if name in out.get("required", []):
                    out["required"] = [r for r in out["required"] if r != name]

    def _is_read_only(self, node: Any, seen: set[str]) -> bool:
        """Whether a property's schema says `readOnly: true`: itself, through its `$ref`
        (in 3.1 its siblings are part of it too, 3.0 ignores them), or through any `allOf`
        member, since every member's annotations apply to the property."""
        if not isinstance(node, dict):
            return False
        ref = node.get("$ref")
        if isinstance(ref, str):
            if ref in seen:
                return False
            seen.add(ref)
            if self._is_read_only(self._resolve(ref), seen):
                return True
            if self.openapi30:
                return False
        return node.get("readOnly") is True or any(
            self._is_read_only(member, seen) for member in node.get("allOf", []))


# -- requests ------------------------------------------------------------------------------------

_INTEGER = re.compile(r"-?[0-9]+\Z", re.ASCII)
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z", re.ASCII)
_HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


class _Invalid(ValueError):
    """A value that is not of its declared type."""


def _typed(raw: str, kind: str | None) -> Any:
    if kind == "integer":
        if not _INTEGER.match(raw):
            raise _Invalid
        return int(raw)
    if kind == "number":
        if not _NUMBER.match(raw):
            raise _Invalid
        return float(raw) if any(c in raw for c in ".eE") else int(raw)
    if kind == "boolean":
        if raw not in ("true", "false"):
            raise _Invalid
        return raw == "true"
    return raw


@dataclass
class _Param:
    name: str
    where: str
    required: bool
    kind: str | None
    item_kind: str | None
    validator: Draft202012Validator | None


@dataclass
class _Operation:
    method: str
    template: str
    pattern: re.Pattern[str]
    params: list[_Param]
    body_required: bool
    bodies: dict[str, Draft202012Validator | None]  # media type -> validator


def _strict_json(text: str) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in items}) != len(items):
            raise ValueError("duplicate key")
        return dict(items)

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    document = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    _unicode_only(document)
    return document


def _unicode_only(value: Any) -> None:
    """JSON strings are Unicode (RFC 8259 8.2, I-JSON RFC 7493 2.1): an escaped lone
    surrogate (`"\\ud800"`) parses in Python but is no string a schema can describe."""
    stack = [value]
    while stack:
        node = stack.pop()
        texts: Iterable[Any] = ()
        if isinstance(node, str):
            texts = (node,)
        elif isinstance(node, dict):
            texts = node.keys()
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a string with a lone surrogate") from None


class ContractChecker:
    """Checks requests (as received upstream) against one OpenAPI document."""

    def __init__(self, document: Mapping[str, Any], rules: Rules = Rules()) -> None:
        self.rules = rules
        self.schemas = RequestSchemas(document, rules)
        self.operations: list[_Operation] = []
        for template, item in document.get("paths", {}).items():
            shared = item.get("parameters", [])
            for method in _HTTP_METHODS:
                if method in item:
                    self.operations.append(self._operation(method, template, shared,
                                                           item[method]))

    def _deref(self, node: Any) -> Any:
        while isinstance(node, dict) and "$ref" in node:
            node = self.schemas._resolve(node["$ref"])
        return node

    def _operation(self, method: str, template: str, shared: list[Any],
                   raw: dict[str, Any]) -> _Operation:
        declared: dict[tuple[str, str], dict[str, Any]] = {}
        for entry in [*shared, *raw.get("parameters", [])]:
            param = self._deref(entry)
            key = (param["name"].lower() if param["in"] == "header" else param["name"],
                   param["in"])
            declared[key] = param
        params = []
        for (name, where), param in declared.items():
            style = param.get("style", "form" if where in ("query", "cookie") else "simple")
            explode = param.get("explode", style == "form")
            schema = self._deref(param.get("schema", {}))
            kind = schema.get("type") if isinstance(schema, dict) else None
            item_kind = None
            if kind == "array":
                item_kind = self._deref(schema.get("items", {})).get("type")
            if style not in ("form", "simple") or kind == "object" or \
                    (kind == "array" and where == "query" and not explode):
                raise NotImplementedError(f"the checker does not read {where} parameter "
                                          f"{name!r} ({style}, {kind})")
            validator = reference_validator(self.schemas.convert(param["schema"])) \
                if "schema" in param else None
            params.append(_Param(name, where, bool(param.get("required", where == "path")),
                                 kind if isinstance(kind, str) else None,
                                 item_kind, validator))
        bodies: dict[str, Draft202012Validator | None] = {}
        body_required = False
        if "requestBody" in raw:
            body = self._deref(raw["requestBody"])
            body_required = bool(body.get("required", False))
            for media, content in body.get("content", {}).items():
                if not (media == "application/json" or media.endswith("+json")):
                    raise NotImplementedError(f"the checker reads JSON bodies only: {media}")
                bodies[media.lower()] = reference_validator(
                    self.schemas.convert(content["schema"])) if "schema" in content else None
        pattern = re.compile("/".join(
            f"(?P<{part[1:-1]}>[^/]+)" if part.startswith("{") and part.endswith("}")
            else re.escape(part) for part in template.split("/")) + r"\Z")
        return _Operation(method.upper(), template, pattern, params, body_required, bodies)

    # -- checking ----------------------------------------------------------------------------

    def check(self, method: str, path: str, query: str,
              headers: Iterable[tuple[str, str]], body: bytes | None) -> list[str]:
        """Every way this request breaks the contract (empty: it obeys it)."""
        if body is None:
            return ["the body could not be read (broken framing)"]
        try:
            segments = [unquote_to_bytes(s).decode("utf-8") for s in path.split("/")]
        except UnicodeDecodeError:
            return ["the path is not UTF-8 once decoded"]
        if not path.startswith("/") or any(
                "/" in s or "\\" in s or s in (".", "..") for s in segments) or \
                "" in segments[1:]:
            return [f"ambiguous path {path!r}"]
        decoded = "/".join(segments)
        matches = [(op, m) for op in self.operations
                   if (m := op.pattern.fullmatch(decoded)) is not None]
        if not matches:
            return [f"path {decoded!r} is not declared"]
        # HEAD is GET without a body (RFC 9110 9.3.2): apishield routes it to GET's operation
        wanted = "GET" if method == "HEAD" and not any(op.method == "HEAD" for op, _ in matches) \
            else method
        found = [(op, m) for op, m in matches if op.method == wanted]
        if not found:
            return [f"{method} is not declared for {matches[0][0].template}"]
        # the most literal template wins (/pets/mine over /pets/{id})
        operation, match = min(found, key=lambda f: f[0].template.count("{"))
        header_map: dict[str, list[str]] = {}
        for name, value in headers:
            header_map.setdefault(name.lower(), []).append(value)
        problems = self._check_params(operation, match.groupdict(), query, header_map)
        problems += self._check_body(operation, header_map, body)
        return [f"{operation.method} {operation.template}: {p}" for p in problems]

    def _check_params(self, operation: _Operation, path_values: dict[str, str], query: str,
                      headers: dict[str, list[str]]) -> list[str]:
        problems: list[str] = []
        try:
            pairs = parse_qsl(query, keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError):
            return ["the query is not UTF-8"]
        query_values: dict[str, list[str]] = {}
        for name, value in pairs:
            query_values.setdefault(name, []).append(value)
        cookies: dict[str, list[str]] = {}
        for line in headers.get("cookie", []):
            for part in line.split(";"):
                name, sep, value = part.strip().partition("=")
                if sep:
                    cookies.setdefault(name, []).append(value)
        for param in operation.params:
            if param.where == "path":
                raw_values = [path_values[param.name]] if param.name in path_values else []
            elif param.where == "query":
                raw_values = query_values.get(param.name, [])
            elif param.where == "header":
                raw_values = headers.get(param.name, [])
            else:
                raw_values = cookies.get(param.name, [])
            if not raw_values:
                if param.required:
                    problems.append(f"required {param.where} parameter {param.name!r} missing")
                continue
            try:
                if param.kind == "array":
                    parts = raw_values if param.where == "query" else raw_values[0].split(",")
                    value: Any = [_typed(p, param.item_kind) for p in parts]
                elif len(raw_values) > 1:
                    problems.append(f"{param.where} parameter {param.name!r} repeated")
                    continue
                else:
                    value = _typed(raw_values[0], param.kind)
            except _Invalid:
                problems.append(f"{param.where} parameter {param.name!r} is not a "
                                f"{param.kind}: {raw_values!r}")
                continue
            if param.validator is not None:
                problems += [f"{param.where} parameter {param.name!r}: {e.message}"
                             for e in param.validator.iter_errors(value)]
        if self.rules.strict:
            known = {p.name for p in operation.params if p.where == "query"}
            problems += [f"undeclared query parameter {name!r}"
                         for name in query_values if name not in known]
        return problems

    def _check_body(self, operation: _Operation, headers: dict[str, list[str]],
                    body: bytes) -> list[str]:
        if not body:
            return ["the required request body is missing"] if operation.body_required else []
        if not operation.bodies:
            return ["a body was sent to an operation that declares none"]
        content_types = headers.get("content-type", [])
        if len(content_types) != 1:
            return [f"a body with {len(content_types)} Content-Type headers"]
        media, _, parameters = content_types[0].partition(";")
        media = media.strip().lower()
        if media not in operation.bodies:
            return [f"undeclared media type {media!r}"]
        charset = re.search(r"charset=\"?([A-Za-z0-9_-]+)", parameters)
        if charset and charset.group(1).lower() not in ("utf-8", "utf8"):
            return [f"charset {charset.group(1)!r} is not UTF-8"]
        try:
            document = _strict_json(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            return [f"the body is not strict JSON ({exc})"]
        validator = operation.bodies[media]
        if validator is None:
            return []
        return [f"body{''.join(f'/{p}' for p in e.absolute_path)}: {e.message}"
                for e in validator.iter_errors(document)]


__all__ = ["ContractChecker", "RequestSchemas", "Rules", "format_checker", "is_date_time",
           "reference_validator"]
