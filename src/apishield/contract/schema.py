"""OpenAPI schemas -> compiled JSON Schema 2020-12 validators (jsonschema-rs), once, at load.

PERF-BASELINE.md: a 1 KB body against 21 properties costs 739 us with `jsonschema`, 5 us
with jsonschema-rs. So every schema is converted once into a self-contained 2020-12
document (referenced components become `$defs`, so recursive schemas just work) and
compiled; a request costs one call into Rust.

The conversion is also where the contract's silence becomes "no" (checklist B2, B4):

- OpenAPI 3.0's dialect is translated: `nullable`, boolean `exclusiveMinimum/Maximum`,
  `example`, `x-*`, `discriminator`, `xml` (3.1 documents are JSON Schema 2020-12 already);
- strict mode: an object schema that declares `properties` (or composes with `allOf`...)
  and says nothing about extra properties gets `unevaluatedProperties: false`: unknown
  fields are refused (mass assignment). Members of a composition are left open so the
  composition as a whole decides;
- in requests, `readOnly` properties are refused (their schema becomes `false`);
- strings without `maxLength` and arrays without `maxItems` get the configured caps;
- `format: int32/int64` become numeric bounds (jsonschema-rs does not check them);
- `format: email` is jsonschema-rs's check with the domain's case folded (`_is_email`);
- patterns compile with the linear-time regex engine (no catastrophic backtracking);
  a pattern that needs backtracking (lookaround, backreferences) is refused at load.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema_rs

from apishield.contract.loader import RefError, RefResolver, escape_pointer
from apishield.contract.pattern_dialects import rewrite as read_as_ecma

INT_BOUNDS = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_DROP_30 = frozenset({"nullable", "example", "discriminator", "xml", "externalDocs",
                      "deprecated"})
_DROP_31 = frozenset({"example", "discriminator", "xml", "externalDocs"})
_SCHEMA_MAPS = ("properties", "patternProperties", "dependentSchemas", "$defs", "definitions")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_ONE = ("additionalProperties", "unevaluatedProperties", "items", "contains", "not",
               "if", "then", "else", "propertyNames", "unevaluatedItems", "contentSchema")
_COMPOSITION = frozenset({"allOf", "anyOf", "oneOf"})
_DEF_NAME = re.compile(r"[^A-Za-z0-9_.-]")
_DEFS = "#/$defs/"
_BUILTIN_EMAIL = jsonschema_rs.Draft202012Validator({"format": "email"}, validate_formats=True)
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True)
class Caps:
    max_string_length: int
    max_array_items: int


BACKTRACK_LIMIT = 100_000  # steps of the backtracking engine per match (lookaround only)
REGEX_SIZE_LIMIT = 10 * 1024 * 1024  # bytes of one compiled pattern (the engine's default)
# Start-up walks follow each `$ref` depth first, about eight Python frames a schema, so a
# chain of schemas each referring to the next (bench/contract_load.py's generated contract
# has one 2,000 deep, through `oneOf`) passes the interpreter's recursion limit. Raising the
# limit is no cure: that DAG then costs the response shapes and validators tens of GB
# (measured: 23 GB before it was stopped). Such a chain is refused with a located error.


@contextmanager
def schema_depth_guard() -> Iterator[None]:
    """A `$ref` chain too deep to walk becomes a `SchemaError` saying so (the pipeline turns
    it into a ConfigError), never a bare RecursionError traceback at start-up."""
    try:
        yield
    except RecursionError:
        raise SchemaError(
            "schemas nest too deeply through $ref (a chain of more than about 100 schemas, "
            "each referring to the next); flatten the chain") from None
# lookahead, lookbehind, a numbered or named backreference (ECMA-262 22.2)
_BACKTRACKING_SYNTAX = re.compile(r"\(\?<?[=!]|\\[1-9]|\\k<")
_NOT_A_REGEX = re.compile(r'^"(.*)" is not a "regex"', re.DOTALL)


class _NotRegex(Exception):
    def __init__(self, pattern: str) -> None:
        self.pattern = pattern


def _validator(document: dict[str, Any], options: Any) -> jsonschema_rs.Validator:
    try:
        return jsonschema_rs.Draft202012Validator(
            document, validate_formats=True, formats={"email": _is_email},
            pattern_options=options)
    except jsonschema_rs.ValidationError as exc:
        found = _NOT_A_REGEX.match(exc.message)
        if found is not None:
            try:
                pattern = json.loads(f'"{found.group(1)}"')
            except ValueError:
                pattern = found.group(1)
            raise _NotRegex(pattern) from None
        raise SchemaError(f"invalid schema: {exc.message}") from None
    except (ValueError, jsonschema_rs.ReferencingError) as exc:
        raise SchemaError(f"invalid schema: {exc}") from None


class SchemaError(ValueError):
    """A schema that cannot be compiled; the message says what and how to fix it."""


class PatternError(SchemaError):
    """A `pattern` neither engine compiles: not a regular expression, or larger than the
    compiled-size limit. Reported once per pattern, at the pattern's own pointer."""

    def __init__(self, pattern: str) -> None:
        super().__init__(
            f"pattern {pattern!r} cannot be compiled: it is not a valid ECMA-262 regular "
            f"expression, or it compiles to more than {REGEX_SIZE_LIMIT // (1024 * 1024)} "
            "MiB; fix or simplify it")
        self.pattern = pattern


class SchemaCompiler:
    """Converts and compiles request schemas of one contract; memoized per target."""

    def __init__(self, resolver: RefResolver, *, openapi30: bool, caps: Caps,
                 strict: bool = True) -> None:
        self.resolver = resolver
        self.openapi30 = openapi30
        self.caps = caps
        self.strict = strict
        self._validators: dict[str, jsonschema_rs.Validator] = {}
        # Every referenced schema is converted once per compiler, not once per body that
        # reaches it: Microsoft Graph's 3,849 bodies each reach most of its 2,599 schemas
        # through navigation properties (bench/RESULTS.md). `_defs` holds the converted
        # schemas by `$defs` name, `_refs` the names each one refers to directly, and
        # `_closures` what each reaches (computed once, on demand).
        self._defs: dict[str, Any] = {}
        self._refs: dict[str, set[str]] = {}
        self._closures: dict[str, frozenset[str]] = {}
        self._names: dict[tuple[Path, str, bool], str] = {}
        self._taken: set[str] = set()  # the values of `_names`
        self._added: list[str] = []  # names converted by the compile in progress

    def compile(self, node: Any, file: Path) -> tuple[jsonschema_rs.Validator, dict[str, Any]]:
        """A validator for a request schema (and the converted schema, for coercion)."""
        refs: set[str] = set()
        self._added = []
        try:
            with schema_depth_guard():
                converted = self._convert(node, file, refs, top=True)
        except BaseException:
            # a schema that failed half-way must not stay behind as its placeholder (a
            # `true` would accept anything in the next body that refers to it): forget
            # everything this compile added, so the next one converts (and fails) again
            for name in self._added:
                self._defs.pop(name, None)
                self._refs.pop(name, None)
            raise
        document: dict[str, Any] = (dict(converted) if isinstance(converted, dict)
                                    else {"allOf": [converted]})
        reached = self._reached(refs)
        if reached:
            # a document is self-contained: it carries exactly the schemas it reaches
            document.setdefault("$defs", {}).update(
                (name, self._defs[name]) for name in sorted(reached))
        # a converted `$defs` entry never changes once written: its name stands for it
        key = repr(converted) + repr(sorted(reached))
        validator = self._validators.get(key)
        if validator is None:
            try:
                validator = _validator(document, jsonschema_rs.RegexOptions())
            except _NotRegex as linear:
                # ECMA-262 lookaround or backreferences (valid in a contract): the
                # backtracking engine, bounded. A value that would need more steps than
                # BACKTRACK_LIMIT is refused (fail closed), never matched for seconds.
                # Anything else the linear engine refuses (too large, invalid) stays
                # refused: the backtracking engine would only defer the size problem.
                if not _BACKTRACKING_SYNTAX.search(linear.pattern):
                    raise PatternError(linear.pattern) from None
                try:
                    validator = _validator(document, jsonschema_rs.FancyRegexOptions(
                        backtrack_limit=BACKTRACK_LIMIT, size_limit=REGEX_SIZE_LIMIT))
                except _NotRegex as exc:
                    raise PatternError(exc.pattern) from None
            self._validators[key] = validator
        return validator, converted

    # -- conversion ---------------------------------------------------------------------
    def _convert(self, node: Any, file: Path, refs: set[str], *, top: bool = False,
                 member: bool = False) -> Any:
        """`node` as JSON Schema 2020-12; the `$defs` names it refers to are added to
        `refs` (the referenced schemas themselves are converted into `self._defs`)."""
        if isinstance(node, bool):
            return node
        if not isinstance(node, dict):
            raise SchemaError("a schema must be a mapping or a boolean")
        ref = node.get("$ref")
        if isinstance(ref, str):
            return self._convert_ref(ref, node, file, refs, member=member)
        return self._convert_inline(node, file, refs, member=member)

    def _convert_ref(self, ref: str, node: dict[str, Any], file: Path, refs: set[str],
                     *, member: bool) -> Any:
        try:
            target, target_file = self.resolver.resolve_ref(ref, file)
        except RefError as exc:
            raise SchemaError(str(exc)) from None
        name = self._def_name(target_file, ref.partition("#")[2], member)
        refs.add(name)
        if name not in self._defs:
            # placeholder: a recursive reference resolves to the same def; it carries the
            # target's own readOnly/writeOnly so a property that refers back is refused
            self._defs[name] = {flag: True for flag in ("readOnly", "writeOnly")
                                if isinstance(target, dict) and "$ref" not in target
                                and target.get(flag) is True} or True
            self._added.append(name)
            own: set[str] = set()
            self._refs[name] = own
            self._defs[name] = self._convert(target, target_file, own, member=member)
        reference = {"$ref": f"#/$defs/{escape_pointer(name)}"}
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        if siblings and not self.openapi30:  # 3.1 allows keywords beside $ref
            return {"allOf": [reference, self._convert_inline(siblings, file, refs,
                                                               member=True)]}
        return reference

    def _def_name(self, file: Path, pointer: str, member: bool) -> str:
        """The `$defs` name of a referenced schema: readable, and unique per target (two
        files with one stem, or `a b` beside `a_b`, must not share a name: the second
        would validate against the first)."""
        key = (file, pointer, member)
        name = self._names.get(key)
        if name is None:
            base = _DEF_NAME.sub("_", f"{file.stem}{pointer}") + ("~m" if member else "")
            name, count = base, 1
            while name in self._taken:
                count += 1
                name = f"{base}~{count}"
            self._names[key] = name
            self._taken.add(name)
        return name

    def _reached(self, refs: set[str]) -> frozenset[str]:
        """Every `$defs` name reachable from `refs` (the references of one schema)."""
        reached: set[str] = set()
        for name in refs:
            reached |= self._closure(name)
        return frozenset(reached)

    def _closure(self, start: str) -> frozenset[str]:
        """`start` and every name it reaches; a finished closure is kept, and reused when
        another walk meets its name (cycles are fine: a name is expanded once per walk)."""
        known = self._closures.get(start)
        if known is not None:
            return known
        seen = {start}
        stack = [start]
        while stack:
            for name in self._refs.get(stack.pop(), ()):
                if name in seen:
                    continue
                done = self._closures.get(name)
                if done is not None:
                    seen |= done
                else:
                    seen.add(name)
                    stack.append(name)
        closure = frozenset(seen)
        self._closures[start] = closure
        return closure

    def _convert_inline(self, node: dict[str, Any], file: Path, refs: set[str], *,
                        member: bool) -> Any:
        drop = _DROP_30 if self.openapi30 else _DROP_31
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in drop or key.startswith("x-"):
                continue
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                out[key] = {name: self._convert(sub, file, refs) for name, sub in value.items()}
            elif key in _SCHEMA_LISTS and isinstance(value, list):
                in_composition = key in _COMPOSITION
                out[key] = [self._convert(sub, file, refs, member=in_composition)
                            for sub in value]
            elif key in _SCHEMA_ONE and isinstance(value, dict | bool):
                out[key] = self._convert(value, file, refs)
            elif key == "items" and isinstance(value, list):  # draft-4 style tuple
                out["prefixItems"] = [self._convert(sub, file, refs) for sub in value]
            elif key == "pattern" and isinstance(value, str):
                out[key] = read_as_ecma(value)  # Java's \p{Alnum}, Annex B's [\w-.]
            else:
                out[key] = value
        self._refuse_read_only(out, self._defs)  # before 3.0's `nullable` may wrap `out` in anyOf
        if self.openapi30:
            _translate_30(node, out)
        self._apply_caps(out)
        if self.strict and not member and _declares_shape(out) and not (
            "additionalProperties" in out or "unevaluatedProperties" in out
        ):
            out["unevaluatedProperties"] = False
        return out

    def _refuse_read_only(self, out: dict[str, Any], defs: dict[str, Any]) -> None:
        """OpenAPI: `readOnly` properties SHOULD NOT be sent in requests; apishield refuses."""
        properties = out.get("properties")
        if not isinstance(properties, dict):
            return
        read_only = [name for name, sub in properties.items()
                     if _is_read_only(sub, defs, nullable_30=self.openapi30)]
        for name in read_only:
            properties[name] = False
        if read_only and isinstance(out.get("required"), list):
            out["required"] = [name for name in out["required"] if name not in read_only]

    def _apply_caps(self, out: dict[str, Any]) -> None:
        types = out.get("type")
        # a malformed `type` (a mapping, a number) is left for the validator to report,
        # located, as an invalid schema: found in a real contract (codat.io accounting)
        kinds = ({kind for kind in types if isinstance(kind, str)} if isinstance(types, list)
                 else {types} if isinstance(types, str) else set())
        if "string" in kinds and "maxLength" not in out and "enum" not in out \
                and "const" not in out:
            out["maxLength"] = self.caps.max_string_length
        if "array" in kinds and "maxItems" not in out:
            out["maxItems"] = self.caps.max_array_items
        bounds = INT_BOUNDS.get(out.get("format", ""))
        if bounds is not None and ("integer" in kinds or "number" in kinds):
            low, high = bounds
            if not isinstance(out.get("minimum"), int | float) or out["minimum"] < low:
                out["minimum"] = low
            if not isinstance(out.get("maximum"), int | float) or out["maximum"] > high:
                out["maximum"] = high


def _is_read_only(converted: Any, defs: dict[str, Any], *, nullable_30: bool,
                  seen: set[str] | None = None) -> bool:
    """Whether a converted property schema says `readOnly: true`: itself, through its
    `$ref` (the `$defs` entry, each reference followed once), through an `allOf` member (a
    3.1 `$ref` with sibling keywords became one), or, in 3.0, inside the `anyOf` that
    `nullable` puts around a schema without `type` (`_translate_30`)."""
    if not isinstance(converted, dict):
        return False
    if converted.get("readOnly") is True:
        return True
    seen = set() if seen is None else seen
    ref = converted.get("$ref")
    if isinstance(ref, str) and ref.startswith(_DEFS) and ref not in seen:
        seen.add(ref)
        target = defs.get(ref[len(_DEFS):].replace("~1", "/").replace("~0", "~"))
        if _is_read_only(target, defs, nullable_30=nullable_30, seen=seen):
            return True
    members = converted.get("allOf")
    if isinstance(members, list) and any(
            _is_read_only(m, defs, nullable_30=nullable_30, seen=seen) for m in members):
        return True
    wrapped = converted.get("anyOf")
    return (nullable_30 and isinstance(wrapped, list) and len(wrapped) == 2
            and wrapped[1] == {"type": "null"}
            and _is_read_only(wrapped[0], defs, nullable_30=True, seen=seen))


def _is_email(value: str) -> bool:
    """jsonschema-rs's `email` format, with the domain's ASCII letters in lower case first:
    domain names are case-insensitive (RFC 4343), the IDNA prefix too, but jsonschema-rs
    knows only `xn--` (it refused `a@b.XN--P1AI` and accepted `a@b.xn--p1ai`)."""
    local, at, domain = value.rpartition("@")
    return _BUILTIN_EMAIL.is_valid(local + at + domain.translate(_ASCII_LOWER))


def _declares_shape(schema: dict[str, Any]) -> bool:
    """An object schema that says what it contains (so anything else is unknown)."""
    kind = schema.get("type")
    object_like = kind in (None, "object") or (isinstance(kind, list) and "object" in kind)
    return object_like and ("properties" in schema or any(k in schema for k in _COMPOSITION))


def _translate_30(original: dict[str, Any], out: dict[str, Any]) -> None:
    """OpenAPI 3.0 Schema Object -> JSON Schema 2020-12 (OAS 3.0.3 section 4.7.24)."""
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        flag = original.get(exclusive)
        if isinstance(flag, bool):
            out.pop(exclusive, None)
            if flag and bound in out:
                out[exclusive] = out.pop(bound)
    if original.get("nullable") is True:
        kind = out.get("type")
        if isinstance(kind, str):
            out["type"] = [kind, "null"]
            if isinstance(out.get("enum"), list) and None not in out["enum"]:
                out["enum"] = [*out["enum"], None]
        elif kind is None:
            inner = dict(out)
            out.clear()
            out["anyOf"] = [inner, {"type": "null"}]


def error_reason(error: jsonschema_rs.ValidationError) -> str:
    """A short reason from the failed keyword, never from the submitted value."""
    name = type(error.kind).__name__
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def error_pointer(prefix: str, error: jsonschema_rs.ValidationError) -> str:
    return prefix + "".join("/" + escape_pointer(str(part)) for part in error.instance_path)


MAX_NAMED = 100  # characters of an undeclared property's name a 422 may repeat


def error_entries(prefix: str, error: jsonschema_rs.ValidationError) -> list[dict[str, str]]:
    """The client-facing entries of one validation error: a pointer and a reason, never a
    submitted value. An undeclared property (mass assignment) is named by its pointer,
    `/body/admin` with reason `additional-property`: its name is part of the request's
    shape, and the client needs it to fix the request; a name longer than `MAX_NAMED`
    (or with nothing to name) keeps the object's pointer and `additional-properties`."""
    base = error_pointer(prefix, error)
    unexpected = getattr(error.kind, "unexpected", None)
    if isinstance(error.kind, (jsonschema_rs.ValidationErrorKind.AdditionalProperties,
                               jsonschema_rs.ValidationErrorKind.UnevaluatedProperties)) \
            and unexpected and all(len(str(name)) <= MAX_NAMED for name in unexpected):
        return [{"pointer": f"{base}/{escape_pointer(str(name))}",
                 "reason": "additional-property"} for name in unexpected]
    return [{"pointer": base, "reason": error_reason(error)}]


def pattern_location(node: Any, file: Path, pointer: str, resolver: RefResolver,
                     pattern: str, seen: set[tuple[Path, str]] | None = None
                     ) -> tuple[Path, str] | None:
    """Where `pattern` is written in a raw schema (following `$ref`s): (file, pointer)."""
    seen = set() if seen is None else seen
    if (file, pointer) in seen or not isinstance(node, dict | list):
        return None
    seen.add((file, pointer))
    if isinstance(node, list):
        for index, item in enumerate(node):
            found = pattern_location(item, file, f"{pointer}/{index}", resolver, pattern, seen)
            if found is not None:
                return found
        return None
    written = node.get("pattern")
    # the compiler saw the pattern as `read_as_ecma` rewrote it: match either spelling
    if written == pattern or (isinstance(written, str) and read_as_ecma(written) == pattern):
        return file, f"{pointer}/pattern"
    ref = node.get("$ref")
    if isinstance(ref, str):
        try:
            target, target_file = resolver.resolve_ref(ref, file)
        except RefError:
            target = None
        if target is not None:
            found = pattern_location(target, target_file, "/" + ref.partition("#/")[2],
                                     resolver, pattern, seen)
            if found is not None:
                return found
    for key, value in node.items():
        if isinstance(value, dict | list) and key not in ("enum", "const", "examples",
                                                           "example", "default"):
            found = pattern_location(value, file, f"{pointer}/{escape_pointer(str(key))}",
                                     resolver, pattern, seen)
            if found is not None:
                return found
    return None
