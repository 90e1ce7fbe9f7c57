"""What every rule reads: the contract, the effective config, and schema walks with `$ref`s
followed (each schema node visited once per walk, so a schema shared by a thousand
operations costs one visit and yields one finding, and recursive schemas terminate)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apishield.audit.findings import Location
from apishield.config import Config
from apishield.contract.loader import Contract, Operation, escape_pointer

_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions",
                   "dependentSchemas")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalItems", "additionalProperties", "contains", "not", "if",
                  "then", "else", "propertyNames", "unevaluatedItems",
                  "unevaluatedProperties")


def display(path: Path) -> str:
    """A path as findings show it: relative to the working directory when under it."""
    try:
        return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)
    except ValueError:  # another drive (Windows)
        return str(path)


@dataclass(frozen=True)
class SchemaNode:
    """One schema object reached by a walk: where it is and which operation reached it."""

    node: dict[str, Any]
    file: Path
    pointer: str
    operation: Operation


@dataclass
class AuditContext:
    contract: Contract
    config: Config
    config_file: Path | None  # None: no --config, the defaults are reviewed
    _request: list[SchemaNode] | None = field(default=None, repr=False)
    _response: list[SchemaNode] | None = field(default=None, repr=False)

    def at_operation(self, operation: Operation, suffix: str = "") -> Location:
        return Location(display(self.contract.source), operation.pointer + suffix)

    def at_contract(self, file: Path, pointer: str) -> Location:
        return Location(display(file), pointer)

    def at_config(self, pointer: str) -> Location | None:
        """A location in the config file, or None when the defaults are reviewed."""
        if self.config_file is None:
            return None
        return Location(display(self.config_file), pointer)

    def strict(self, operation: Operation) -> bool:
        strict = operation.policy.strict
        return self.config.validation.strict if strict is None else strict

    def request_schemas(self) -> list[SchemaNode]:
        """Every schema node of request bodies and parameters, each once."""
        if self._request is None:
            seen: set[tuple[Path, str]] = set()
            found: list[SchemaNode] = []
            for operation in self.contract.operations:
                for _media, schema, file, pointer in operation.bodies:
                    found += self._walk(schema, file, pointer, operation, seen)
                for parameter in operation.parameters:
                    if parameter.schema is not None:
                        found += self._walk(parameter.schema, parameter.file,
                                            parameter.pointer + "/schema", operation, seen)
            self._request = found
        return self._request

    def response_schemas(self) -> list[SchemaNode]:
        """Every schema node of declared responses, each once."""
        if self._response is None:
            seen: set[tuple[Path, str]] = set()
            found: list[SchemaNode] = []
            for operation in self.contract.operations:
                for status, media, schema, file in operation.responses:
                    pointer = (f"{operation.pointer}/responses/{escape_pointer(status)}"
                               f"/content/{escape_pointer(media)}/schema")
                    found += self._walk(schema, file, pointer, operation, seen)
            self._response = found
        return self._response

    def _walk(self, root: Any, file: Path, pointer: str, operation: Operation,
              seen: set[tuple[Path, str]]) -> list[SchemaNode]:
        found: list[SchemaNode] = []
        stack: list[tuple[Any, Path, str]] = [(root, file, pointer)]
        resolver = self.contract.resolver
        while stack:
            node, file, pointer = stack.pop()
            if not isinstance(node, dict) or (file, pointer) in seen:
                continue
            seen.add((file, pointer))
            ref = node.get("$ref")
            if isinstance(ref, str) and resolver is not None:
                try:
                    target, target_file = resolver.resolve_ref(ref, file)
                except ValueError:  # dangling refs were reported when the contract loaded
                    pass
                else:
                    stack.append((target, target_file, ref.partition("#")[2]))
                if len(node) == 1:
                    continue
            found.append(SchemaNode(node, file, pointer, operation))
            for key in _SUBSCHEMA_MAPS:
                value = node.get(key)
                if isinstance(value, dict):
                    stack += [(sub, file, f"{pointer}/{key}/{escape_pointer(str(name))}")
                              for name, sub in value.items()]
            for key in _SUBSCHEMA_LISTS:
                value = node.get(key)
                if isinstance(value, list):
                    stack += [(sub, file, f"{pointer}/{key}/{index}")
                              for index, sub in enumerate(value)]
            for key in _SUBSCHEMA_ONE:
                if isinstance(node.get(key), dict):
                    stack.append((node[key], file, f"{pointer}/{key}"))
        return found
