"""The compiled router: normalized path -> declared operations, or 404/405 (default deny).

Built once from the contract. A lookup is one dict probe for static paths; templated
paths walk a segment trie where literal segments win over parameters, as OpenAPI 3
requires ("concrete paths are matched before their templated counterparts"). Two
templates that differ only in parameter names are ambiguous and refused at load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from apishield.config import ConfigError
from apishield.contract.loader import Operation

_PARAM = re.compile(r"\{([^{}/]+)\}")


@dataclass
class PathEntry:
    template: str
    operations: dict[str, Operation]
    allow: bytes = b""  # the `Allow` header value for 405 answers


@dataclass
class _Segment:
    """A templated segment: `{id}` (whole segment) or a pattern like `{id}.json`."""

    names: tuple[str, ...]
    regex: re.Pattern[str] | None  # None = the whole segment is one parameter
    child: _Node


@dataclass
class _Node:
    literal: dict[str, _Node] = field(default_factory=dict)
    params: list[_Segment] = field(default_factory=list)
    entry: PathEntry | None = None


class Router:
    """`match(path)` -> (PathEntry, path params) or None."""

    def __init__(self, operations: tuple[Operation, ...], base_path: str = "") -> None:
        self.base_path = base_path
        self._static: dict[str, PathEntry] = {}
        self._root = _Node()
        entries: dict[str, PathEntry] = {}
        shapes: dict[str, str] = {}
        problems: list[str] = []
        for operation in operations:
            entry = entries.get(operation.path)
            if entry is None:
                shape = _PARAM.sub("{}", operation.path)
                if shape in shapes and shapes[shape] != operation.path:
                    problems.append(
                        f"paths: {operation.path!r} and {shapes[shape]!r} are the same path "
                        "with different parameter names; requests could match either"
                    )
                    continue
                shapes[shape] = operation.path
                entry = entries[operation.path] = PathEntry(operation.path, {})
                self._insert(entry)
            entry.operations[operation.method] = operation
        if problems:
            raise ConfigError(problems)
        for entry in entries.values():
            if "GET" in entry.operations and "HEAD" not in entry.operations:
                # RFC 9110 9.3.2: HEAD is GET without a body; the operation is GET's.
                entry.operations["HEAD"] = entry.operations["GET"]
            entry.allow = ", ".join(sorted(entry.operations)).encode()

    def _insert(self, entry: PathEntry) -> None:
        if "{" not in entry.template:
            self._static[entry.template] = entry
            return
        node = self._root
        for segment in entry.template.split("/")[1:]:
            names = tuple(_PARAM.findall(segment))
            if not names:
                node = node.literal.setdefault(segment, _Node())
                continue
            regex = None
            if segment != "{" + names[0] + "}":
                pattern = "".join(
                    "(.+?)" if i % 2 else re.escape(part)
                    for i, part in enumerate(_PARAM.split(segment))
                )
                regex = re.compile(pattern + r"\Z")
            for existing in node.params:
                if existing.names == names and (
                    (existing.regex is None and regex is None)
                    or (existing.regex is not None and regex is not None
                        and existing.regex.pattern == regex.pattern)
                ):
                    node = existing.child
                    break
            else:
                seg = _Segment(names, regex, _Node())
                node.params.append(seg)
                # whole-segment parameters are tried after patterned ones (more specific)
                node.params.sort(key=lambda s: s.regex is None)
                node = seg.child
        node.entry = entry

    def static_targets(self) -> dict[bytes, tuple[str, PathEntry]]:
        """Raw request paths that need no decoding, each with its normalized path and
        entry: `normalize_path` returns such a path unchanged (ASCII, no `%`, `\\`,
        control character, empty or dot segment) and `match` finds its static entry, so
        the route step can skip both with one dict probe (tests/test_router.py checks it
        is the same answer)."""
        table: dict[bytes, tuple[str, PathEntry]] = {}
        for template, entry in self._static.items():
            path = self.base_path if self.base_path and template == "/" else (
                self.base_path + template)
            if (not path.isascii() or any(c in path for c in "%\\") or "//" in path
                    or "/." in path or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in path)):
                continue
            table[path.encode("ascii")] = (path, entry)
        return table

    def match(self, path: str) -> tuple[PathEntry, dict[str, str]] | None:
        if self.base_path:
            base = self.base_path
            if path == base:
                path = "/"
            elif path.startswith(base) and path[len(base)] == "/":
                path = path[len(base):]  # only at a segment boundary: /apiX is not under /api
            else:
                return None
        entry = self._static.get(path)
        if entry is not None:
            return entry, {}
        params: dict[str, str] = {}
        found = _walk(self._root, path.split("/")[1:], 0, params)
        if found is None:
            return None
        return found, params


def _walk(node: _Node, segments: list[str], index: int, params: dict[str, str]) -> PathEntry | None:
    if index == len(segments):
        return node.entry
    segment = segments[index]
    child = node.literal.get(segment)
    if child is not None:
        found = _walk(child, segments, index + 1, params)
        if found is not None:
            return found
    if not segment:
        return None  # an empty segment never fills a parameter
    for param in node.params:
        if param.regex is None:
            values: tuple[str, ...] = (segment,)
        else:
            match = param.regex.match(segment)
            if match is None:
                continue
            values = match.groups()
        found = _walk(param.child, segments, index + 1, params)
        if found is not None:
            params.update(zip(param.names, values, strict=True))
            return found
    return None
