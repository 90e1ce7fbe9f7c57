"""What `apishield check` says about a contract that loads but will not be enforced the way
its author probably thinks (and, with the `audit` issue, the home of contract findings).

Strict mode (`validation.strict`) closes every request-body object the contract leaves
open, but an explicit `additionalProperties: true` (or `unevaluatedProperties: true`) is
the author's word and wins, silently: a mass-assignment hole the user believed closed
(issue 16). Each such schema is reported once, with its JSON pointer, however many
operations use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from apishield.config import Config
from apishield.contract.loader import Contract, escape_pointer

_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions",
                   "dependentSchemas")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else",
                  "propertyNames", "unevaluatedItems")


def open_in_strict_mode(contract: Contract, config: Config) -> list[str]:
    """`file#pointer: message` for each explicitly open request-body object of an
    operation validated in strict mode."""
    found: dict[str, str] = {}
    seen: set[tuple[Path, str]] = set()
    root = contract.source
    for operation in contract.operations:
        strict = operation.policy.strict
        if not (config.validation.strict if strict is None else strict):
            continue
        for _media, schema, file, pointer in operation.bodies:
            for where, key in _open_nodes(schema, file, pointer, contract, seen):
                name = os.path.relpath(where[0], root.parent)
                found.setdefault(
                    f"{name}#{where[1]}",
                    f"{key}: true keeps undeclared properties although strict mode is on "
                    "(mass assignment stays possible here); remove it to close the object, "
                    "or write strict: false on the operations that rely on it "
                    "(x-apishield or operations.<operationId>) to say so")
    return [f"{where}: {message}" for where, message in found.items()]


def _open_nodes(node: Any, file: Path, pointer: str, contract: Contract,
                seen: set[tuple[Path, str]]) -> Iterator[tuple[tuple[Path, str], str]]:
    if not isinstance(node, dict):
        return
    if (file, pointer) in seen:
        return
    seen.add((file, pointer))
    ref = node.get("$ref")
    if isinstance(ref, str) and contract.resolver is not None:
        try:
            target, target_file = contract.resolver.resolve_ref(ref, file)
        except ValueError:  # dangling refs were reported when the contract loaded
            target = None
        if target is not None:
            yield from _open_nodes(target, target_file, "/" + ref.partition("#/")[2],
                                   contract, seen)
    for key in ("additionalProperties", "unevaluatedProperties"):
        if node.get(key) is True:
            yield (file, pointer), key
    for key in _SUBSCHEMA_MAPS:
        value = node.get(key)
        if isinstance(value, dict):
            for name, sub in value.items():
                yield from _open_nodes(sub, file, f"{pointer}/{key}/{escape_pointer(name)}",
                                       contract, seen)
    for key in _SUBSCHEMA_LISTS:
        value = node.get(key)
        if isinstance(value, list):
            for index, sub in enumerate(value):
                yield from _open_nodes(sub, file, f"{pointer}/{key}/{index}", contract, seen)
    for key in _SUBSCHEMA_ONE:
        yield from _open_nodes(node.get(key), file, f"{pointer}/{key}", contract, seen)
    additional = node.get("additionalProperties")
    if isinstance(additional, dict):
        yield from _open_nodes(additional, file, f"{pointer}/additionalProperties", contract,
                               seen)
