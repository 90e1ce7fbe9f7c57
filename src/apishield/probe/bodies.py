"""The broken JSON bodies of one operation: each a valid body with one thing wrong.

The walk starts at the body schema and goes into properties that are objects and into the
items of arrays of objects (an optional object is first filled with a valid value, an
array with one valid item, so the broken part is really sent), at most `MAX_DEPTH`
levels and `MAX_VARIANTS` bodies per operation: a contract with deep or wide models still
gets a plan of bounded size. At every level: each property's scalar breaks (type, bounds,
enum, format, pattern, minLength, minItems/maxItems: values.py), injection payloads in
free-text strings, readOnly properties sent, each required property left out, and an
undeclared property (mass assignment) where the schema allows no others.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apishield.contract.loader import escape_pointer
from apishield.probe.values import Schemas, schema_type

MAX_DEPTH = 3  # levels below the body's top-level properties
MAX_VARIANTS = 200  # broken bodies per operation
MASS_ASSIGNMENT = ("is_admin", True)
# short enough for most maxLength values; each is flagged by apishield's detectors (B6)
INJECTIONS = (("SQL", "' OR '1'='1' --"), ("XSS", "<script>alert(1)</script>"),
              ("shell", "; cat /etc/passwd"))

Step = str | int  # a property name, or an array index


@dataclass(frozen=True)
class Variant:
    rule: str
    what: str
    body: Any
    at: tuple[Path, str]  # the file and pointer of the schema part under test


def variants(schemas: Schemas, schema: Any, file: Path, pointer: str) -> Iterator[Variant]:
    """The broken bodies for the body schema `schema` (at `pointer` in `file`)."""
    valid = schemas.valid(schema, file)
    if not isinstance(valid, dict):
        return
    count = 0
    for variant in _Walk(schemas).object(schema, file, schemas.locate(schema, file, pointer),
                                         valid, (), 0):
        yield variant
        count += 1
        if count >= MAX_VARIANTS:
            return


def _label(path: tuple[Step, ...], name: str) -> str:
    """`owner.address.zip`, `tags[].name`: where in the body, for people."""
    out = ""
    for step in path:
        out += "[]" if isinstance(step, int) else (f".{step}" if out else step)
    return f"{out}.{name}" if out else name


def _with(document: Any, path: tuple[Step, ...], value: Any) -> Any:
    """A copy of `document` with the value at `path` replaced."""
    copied = copy.deepcopy(document)
    node = copied
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return copied


def _without(document: Any, path: tuple[Step, ...]) -> Any:
    copied = copy.deepcopy(document)
    node = copied
    for step in path[:-1]:
        node = node[step]
    del node[path[-1]]
    return copied


class _Walk:
    def __init__(self, schemas: Schemas) -> None:
        self.schemas = schemas

    def object(self, schema: Any, file: Path, at: tuple[Path, str], root: Any,
               path: tuple[Step, ...], depth: int) -> Iterator[Variant]:
        """Variants of the object at `path` in `root` (a valid body holding a valid object
        there), whose schema is `schema`."""
        schemas = self.schemas
        props, required, prop_file = schemas.properties(schema, file)
        node, _ = schemas.resolve(schema, file)
        where = f"body property {_label(path, '')}".rstrip(".")

        for name, prop in props.items():
            prop_at = (at[0], f"{at[1]}/properties/{escape_pointer(name)}")
            here = (*path, name)
            label = f"body property {_label(path, name)}"
            prop_node, _ = schemas.resolve(prop, prop_file)
            if prop_node.get("readOnly"):
                yield Variant("probe-read-only-property", f"{label} is readOnly",
                              _with(root, here, schemas.valid(prop, prop_file)), prop_at)
                continue
            for broken in schemas.breaks(prop, prop_file):
                yield Variant(broken.rule, f"{label}: {broken.what}",
                              _with(root, here, broken.value), prop_at)
            for kind, payload in INJECTIONS:
                if schemas.free_text(prop, prop_file, payload):
                    yield Variant("probe-injection", f"{label}: a {kind} injection payload",
                                  _with(root, here, payload), prop_at)
            if depth < MAX_DEPTH:
                yield from self._nested(prop, prop_node, prop_file, prop_at, root, here,
                                        depth)
        container: Any = root
        for step in path:
            container = container[step]
        for name in required:
            if name in container and name in props:
                yield Variant("probe-schema-required",
                              f"required body property {_label(path, name)} left out",
                              _without(root, (*path, name)),
                              (at[0], f"{at[1]}/properties/{escape_pointer(name)}"))
        if node.get("additionalProperties") in (None, False):  # a schema there allows more
            extra, value = MASS_ASSIGNMENT
            if extra not in props:
                what = (f"an undeclared property {extra} in {where}" if path
                        else f"an undeclared body property {extra}")
                yield Variant("probe-mass-assignment", what, _with(root, (*path, extra),
                                                                   value), at)

    def _nested(self, prop: Any, prop_node: dict[str, Any], file: Path,
                at: tuple[Path, str], root: Any, here: tuple[Step, ...],
                depth: int) -> Iterator[Variant]:
        """Into an object property, or the items of an array of objects."""
        schemas = self.schemas
        kind = schema_type(prop_node)
        if kind == "object" or (kind is None and "properties" in prop_node):
            value = schemas.valid(prop, file)
            if isinstance(value, dict):
                yield from self.object(prop, file, schemas.locate(prop, file, at[1]),
                                       _with(root, here, value), here, depth + 1)
        elif kind == "array" and isinstance(prop_node.get("items"), dict):
            items = prop_node["items"]
            item_node, _ = schemas.resolve(items, file)
            if schema_type(item_node) != "object" and "properties" not in item_node:
                return
            if isinstance(prop_node.get("maxItems"), int) and prop_node["maxItems"] < 1:
                return
            item = schemas.valid(items, file)
            if isinstance(item, dict):
                item_at = schemas.locate(items, file, f"{at[1]}/items")
                yield from self.object(items, file, item_at,
                                       _with(root, here, [item]), (*here, 0), depth + 1)
