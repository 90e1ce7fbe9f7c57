"""Valid values from OpenAPI schemas, and the broken variants an attempt sends.

An attempt breaks exactly one thing; everything else in the request must be valid, or the
refusal the probe sees could be about the wrong thing (a missing required field refused
before the injection payload is read). Values are chosen, not random: a probe run is the
same plan every time, so two CI runs compare.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema_rs

from apishield.contract.loader import RefResolver
from apishield.contract.pattern_dialects import rewrite as read_as_ecma

_FORMATS = {"email": "probe@example.com", "uuid": "00000000-0000-4000-8000-000000000001",
            "date": "2024-01-01", "date-time": "2024-01-01T00:00:00Z",
            "uri": "https://example.com/probe", "hostname": "example.com",
            "ipv4": "192.0.2.1", "ipv6": "2001:db8::1"}
_DEPTH = 12  # recursion guard for self-referencing schemas
# a value that breaks each format; used only when the gateway's engine (jsonschema-rs with
# format checks on, as contract/schema.py compiles) really refuses it
_FORMAT_BREAKS = {"email": "probe-not-an-email", "uuid": "probe-not-a-uuid",
                  "date": "2024-13-45", "date-time": "2024-01-01Tnot-a-time",
                  "time": "25:61:00", "ipv4": "999.0.0.1", "ipv6": "probe::not::ipv6",
                  "uri": "not a uri", "hostname": "-probe-.invalid-"}
# candidates for a value outside a `pattern`: short, and none an injection payload
_PATTERN_MISSES = ("!", "probe probe", "~", "0", "a", "A", "-", "PROBE", "", "probe")
_MAX_ITEMS_BROKEN = 1000  # maxItems above this: the longer array is not worth sending


@dataclass(frozen=True)
class Break:
    """One way to break a value: which rule it tests, what it is, and the value sent."""

    rule: str
    what: str
    value: Any


class Schemas:
    """Schema walks with `$ref`s followed through the contract's resolver."""

    def __init__(self, resolver: RefResolver | None) -> None:
        self.resolver = resolver

    def resolve(self, schema: Any, file: Path) -> tuple[dict[str, Any], Path]:
        if self.resolver is not None and isinstance(schema, dict) and "$ref" in schema:
            try:
                node, file, _pointer = self.resolver.deref(schema, file)
            except ValueError:
                return {}, file
            schema = node
        if not isinstance(schema, dict):
            return {}, file
        if isinstance(schema.get("allOf"), list):  # merged: enough to pick valid values
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                sub, _ = self.resolve(part, file)
                props = {**merged.get("properties", {}), **sub.get("properties", {})}
                required = [*merged.get("required", []), *sub.get("required", [])]
                merged = {**sub, **merged, "properties": props, "required": required}
            return merged, file
        for key in ("oneOf", "anyOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                return self.resolve(schema[key][0], file)
        return schema, file

    def locate(self, schema: Any, file: Path, pointer: str) -> tuple[Path, str]:
        """Where `schema` really is: its `$ref` chain followed (for finding locations)."""
        if self.resolver is None:
            return file, pointer
        try:
            _node, target, followed = self.resolver.deref(schema, file)
        except ValueError:
            return file, pointer
        return (target, followed) if followed is not None else (file, pointer)

    def properties(self, schema: Any, file: Path) -> tuple[dict[str, Any], list[str], Path]:
        node, file = self.resolve(schema, file)
        props = node.get("properties")
        required = node.get("required")
        return (props if isinstance(props, dict) else {},
                [r for r in required if isinstance(r, str)] if isinstance(required, list) else [],
                file)

    def valid(self, schema: Any, file: Path, depth: int = 0) -> Any:
        """A value the schema accepts (readOnly properties left out: this is a request)."""
        node, file = self.resolve(schema, file)
        if "const" in node:
            return node["const"]
        if isinstance(node.get("enum"), list) and node["enum"]:
            return node["enum"][0]
        for key in ("example", "default"):
            if key in node and node[key] is not None:
                return node[key]
        if isinstance(node.get("examples"), list) and node["examples"]:
            return node["examples"][0]
        kind = schema_type(node)
        if kind == "integer" or kind == "number":
            return _number(node, kind)
        if kind == "boolean":
            return True
        if kind == "array":
            count = int(node.get("minItems", 0) or 0)
            return [self.valid(node.get("items", {}), file, depth + 1) for _ in range(count)]
        if kind == "object" or "properties" in node:
            if depth > _DEPTH:
                return {}
            props, required, file = self.properties(node, file)
            return {name: self.valid(props.get(name, {}), file, depth + 1)
                    for name in required
                    if not self.resolve(props.get(name, {}), file)[0].get("readOnly")}
        return _string(node)

    def breaks(self, schema: Any, file: Path) -> list[Break]:
        """The one-thing-wrong variants of a scalar value: type, bounds, enum."""
        node, _ = self.resolve(schema, file)
        kind = schema_type(node)
        found: list[Break] = []
        if isinstance(node.get("enum"), list) and node["enum"] and kind == "string":
            found.append(Break("probe-schema-enum", "a value outside the enum",
                               "probe-not-in-enum"))
            return found
        if kind in ("integer", "number"):
            found.append(Break("probe-schema-type", "a string where a number is expected",
                               "probe"))
            low, high = node.get("minimum"), node.get("maximum")
            if isinstance(low, int | float) and not isinstance(low, bool):
                found.append(Break("probe-schema-bounds", f"below minimum {low}", low - 1))
            if isinstance(high, int | float) and not isinstance(high, bool):
                found.append(Break("probe-schema-bounds", f"above maximum {high}", high + 1))
        elif kind == "boolean":
            found.append(Break("probe-schema-type", "a string where a boolean is expected",
                               "probe"))
        elif kind == "string":
            longest = node.get("maxLength")
            if isinstance(longest, int) and longest < 10_000:
                found.append(Break("probe-schema-bounds", f"longer than maxLength {longest}",
                                   "p" * (longest + 1)))
            found.extend(_string_breaks(node))
        elif kind == "array":
            found.extend(self._array_breaks(node, file))
        return found

    def _array_breaks(self, node: dict[str, Any], file: Path) -> list[Break]:
        """Too few or too many (valid) items: only the count is wrong."""
        found: list[Break] = []
        item = self.valid(node.get("items", {}), file)
        fewest, most = node.get("minItems"), node.get("maxItems")
        if isinstance(fewest, int) and not isinstance(fewest, bool) and fewest > 0:
            found.append(Break("probe-schema-bounds", f"fewer items than minItems {fewest}",
                               [item] * (fewest - 1)))
        if isinstance(most, int) and not isinstance(most, bool) and \
                most < _MAX_ITEMS_BROKEN and not node.get("uniqueItems"):
            found.append(Break("probe-schema-bounds", f"more items than maxItems {most}",
                               [item] * (most + 1)))
        return found

    def free_text(self, schema: Any, file: Path, payload: str) -> bool:
        """A string anyone may write anything in (the injection scan's target), with room
        for `payload`."""
        node, _ = self.resolve(schema, file)
        if schema_type(node) != "string" or node.get("readOnly"):
            return False
        if any(key in node for key in ("enum", "const", "format", "pattern")):
            return False
        longest = node.get("maxLength")
        return not isinstance(longest, int) or longest >= len(payload)


def _string_breaks(node: dict[str, Any]) -> list[Break]:
    """minLength, format and pattern breaks of a string, each with the rest valid: the
    shorter value only where no format or pattern would also fail, the format and pattern
    breaks only within the length bounds."""
    found: list[Break] = []
    shortest = node.get("minLength")
    fmt, pattern = node.get("format"), node.get("pattern")
    if isinstance(shortest, int) and not isinstance(shortest, bool) and shortest > 0 and \
            fmt is None and pattern is None and "enum" not in node and "const" not in node:
        found.append(Break("probe-schema-bounds", f"shorter than minLength {shortest}",
                           "p" * (shortest - 1)))
    if isinstance(fmt, str) and fmt in _FORMAT_BREAKS and _fits_length(node, _FORMAT_BREAKS[
            fmt]) and _valid_string({"format": fmt}, _FORMAT_BREAKS[fmt]) is False:
        found.append(Break("probe-schema-format", f"not a valid {fmt}", _FORMAT_BREAKS[fmt]))
    if isinstance(pattern, str):
        miss = pattern_miss(pattern, node)
        if miss is not None:
            found.append(Break("probe-schema-pattern",
                               f"{miss!r}, which does not match pattern {pattern}", miss))
    return found


def pattern_miss(pattern: str, node: dict[str, Any]) -> str | None:
    """A short string that fails `pattern` and fits the length bounds, or None. Checked
    with the gateway's own linear-time engine, so no pattern can make this slow, and a
    candidate is used only when it really fails."""
    for candidate in _PATTERN_MISSES:
        if _fits_length(node, candidate) and \
                _valid_string({"pattern": read_as_ecma(pattern)}, candidate) is False:
            return candidate
    return None


def _fits_length(node: dict[str, Any], value: str) -> bool:
    shortest, longest = node.get("minLength"), node.get("maxLength")
    return not (isinstance(shortest, int) and len(value) < shortest) and \
        not (isinstance(longest, int) and len(value) > longest)


def _valid_string(schema: dict[str, str], value: str) -> bool | None:
    """Whether jsonschema-rs (formats checked) accepts `value`; None: the schema does not
    compile (the gateway refuses such a contract at load)."""
    (keyword, argument), = schema.items()
    validator = _string_validator(keyword, argument)
    return None if validator is None else bool(validator.is_valid(value))


@functools.lru_cache(maxsize=256)
def _string_validator(keyword: str, argument: str) -> Any:
    """One compiled validator per format or pattern, whatever the number of operations
    that use it."""
    try:
        return jsonschema_rs.Draft202012Validator({"type": "string", keyword: argument},
                                                  validate_formats=True)
    except (ValueError, jsonschema_rs.ValidationError):
        return None


def schema_type(node: dict[str, Any]) -> str | None:
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    return kind if isinstance(kind, str) else None


def _number(node: dict[str, Any], kind: str) -> int | float:
    low = node.get("minimum")
    exclusive = node.get("exclusiveMinimum")
    if isinstance(exclusive, int | float) and not isinstance(exclusive, bool):
        low = exclusive + 1
    elif exclusive is True and isinstance(low, int | float):
        low = low + 1
    value: int | float = low if isinstance(low, int | float) else 1
    high = node.get("maximum")
    if isinstance(high, int | float) and value > high:
        value = high
    return int(value) if kind == "integer" else value


def _string(node: dict[str, Any]) -> str:
    value = _FORMATS.get(str(node.get("format")), "probe")
    shortest = node.get("minLength")
    if isinstance(shortest, int) and len(value) < shortest:
        value = value + "p" * (shortest - len(value))
    longest = node.get("maxLength")
    if isinstance(longest, int) and len(value) > longest:
        value = value[:max(longest, 1)]
    return value


def as_text(value: Any) -> str:
    """A scalar as it is written in a path, query or header."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
