"""Schema shapes: the structure of a schema (properties, items, openness, string
constraints) compiled once into a tree walked alongside JSON documents.

Used to cut responses to what they declare (`steps/response_filter.py`) and to find the
strings a request leaves unconstrained (`steps/injection.py`). `$ref`s become shared
nodes, so a recursive schema is a cycle in the tree, not an infinite expansion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from apishield.contract.loader import RefError, RefResolver

_COMPOSITION = ("allOf", "anyOf", "oneOf")
_STRING_CONSTRAINTS = ("enum", "const", "pattern", "format")
# Property names of secrets: `password`, `new_password`, `passwordConfirm`, `apiKey`,
# `client_secret`, `otp`: one of these words (or word pairs) in the name, split at
# `_ - .` and camelCase humps (`spinner`, `tokenizer`, `secretary` are not secrets).
_SECRET_WORDS = frozenset({"password", "passwords", "passwd", "passphrase", "pwd", "secret",
                           "secrets", "token", "tokens", "apikey", "apikeys", "pin", "otp",
                           "credential", "credentials", "privatekey"})
_SECRET_PAIRS = frozenset({("api", "key"), ("api", "keys"), ("private", "key")})
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


def is_secret_name(name: str) -> bool:
    words = [word.lower() for word in _WORDS.findall(name)]
    return any(word in _SECRET_WORDS for word in words) or any(
        pair in _SECRET_PAIRS for pair in pairwise(words))


@dataclass(eq=False)
class Shape:
    properties: dict[str, Shape | None] = field(default_factory=dict)
    open: bool = True  # undeclared properties are kept
    items: Shape | None = None
    write_only: set[str] = field(default_factory=set)
    # declared properties whose strings are never scanned for payloads: writeOnly ones and
    # those named like a secret (a password may hold `'` or `--`; it is hashed, not run)
    unscanned: set[str] = field(default_factory=set)
    # a string here may hold anything: no enum, const, pattern or format narrows it
    free_string: bool = True


class Builder:
    def __init__(self, resolver: RefResolver) -> None:
        self.resolver = resolver
        self.memo: dict[tuple[Path, str], Shape] = {}

    def build(self, node: Any, file: Path) -> Shape | None:
        if not isinstance(node, dict):
            return None
        ref = node.get("$ref")
        if isinstance(ref, str):
            try:
                target, target_file = self.resolver.resolve_ref(ref, file)
            except RefError:
                return None
            key = (target_file, ref.partition("#")[2])
            if key in self.memo:
                return self.memo[key]
            shape = Shape()
            self.memo[key] = shape  # before filling it: a recursive $ref finds it
            self._fill(shape, target, target_file)
            return shape
        shape = Shape()
        self._fill(shape, node, file)
        return shape

    def _fill(self, shape: Shape, node: Any, file: Path) -> None:
        if not isinstance(node, dict):
            return
        declared = node.get("properties")
        extra = node.get("additionalProperties")
        shape.free_string = not any(key in node for key in _STRING_CONSTRAINTS)
        closed = False  # some schema on the way declared properties and allowed no others
        if isinstance(declared, dict) and declared:
            closed = not (extra is True or isinstance(extra, dict))
            for name, sub in declared.items():
                shape.properties[name] = self.build(sub, file)
                if isinstance(sub, dict) and self._write_only(sub, file):
                    shape.write_only.add(name)
                    shape.unscanned.add(name)
                elif is_secret_name(str(name)):
                    shape.unscanned.add(name)
        items = node.get("items")
        if isinstance(items, dict):
            shape.items = self.build(items, file)
        for key in _COMPOSITION:
            members = node.get(key)
            if not isinstance(members, list):
                continue
            for member in members:
                part = self.build(member, file)
                if part is None:
                    continue
                for name, child in part.properties.items():
                    shape.properties.setdefault(name, child)
                shape.write_only |= part.write_only
                shape.unscanned |= part.unscanned
                closed = closed or (bool(part.properties) and not part.open)
                if shape.items is None:
                    shape.items = part.items
        shape.open = not closed

    def _write_only(self, node: dict[str, Any], file: Path) -> bool:
        try:
            resolved, _, _ = self.resolver.deref(node, file)
        except RefError:
            return False
        return isinstance(resolved, dict) and resolved.get("writeOnly") is True


