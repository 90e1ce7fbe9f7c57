"""Valid values from OpenAPI schemas, and the broken variants an attempt sends.

An attempt breaks exactly one thing; everything else in the request must be valid, or the
refusal the probe sees could be about the wrong thing (a missing required field refused
before the injection payload is read). Values are chosen, not random: a probe run is the
same plan every time, so two CI runs compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apishield.contract.loader import RefResolver

_FORMATS = {"email": "probe@example.com", "uuid": "00000000-0000-4000-8000-000000000001",
            "date": "2024-01-01", "date-time": "2024-01-01T00:00:00Z",
            "uri": "https://example.com/probe", "hostname": "example.com",
            "ipv4": "192.0.2.1", "ipv6": "2001:db8::1"}
_DEPTH = 12  # recursion guard for self-referencing schemas


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
