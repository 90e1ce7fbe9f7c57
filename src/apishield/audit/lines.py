"""JSON pointer -> line for YAML sources, from a node tree (JSON sources: no line).

The loader builds plain dicts (no marks), so the line of a finding is found by composing
the file's node tree with libyaml once per file, and only for files a finding points into:
a multi-megabyte contract costs one compose, not one per finding. A pointer that walks
off the tree (a default the config does not write) gets the line of the deepest node it
reached, which is where the missing key belongs.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import yaml

try:
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - pure-Python fallback
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]


class _Composer(_Loader):
    """Tags are never needed for lines: skipping implicit resolution saves a fifth."""

    def resolve(self, kind: type[yaml.Node], value: object, implicit: object) -> str:
        return "tag:yaml.org,2002:str"


class LineIndex:
    def __init__(self) -> None:
        self._trees: dict[Path, yaml.Node | None] = {}
        # id(mapping node) -> {key: (the key's line, the value)}
        self._keys: dict[int, dict[str, tuple[int, yaml.Node]]] = {}

    def _tree(self, path: Path) -> yaml.Node | None:
        if path not in self._trees:
            if path.suffix.lower() == ".json":
                # composing JSON through the YAML parser costs ~1 s a MB, and generated
                # JSON is often one line: JSON findings carry the pointer only
                self._trees[path] = None
                return None
            try:
                self._trees[path] = yaml.compose(path.read_text("utf-8"), Loader=_Composer)
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                self._trees[path] = None
        return self._trees[path]

    def line(self, path: Path, pointer: str) -> int | None:
        """1-based line of `pointer` in `path`, or None when the file cannot be read."""
        node = self._tree(path)
        if node is None:
            return None
        line = int(node.start_mark.line)
        for raw in pointer.split("/")[1:] if pointer else ():
            token = unquote(raw).replace("~1", "/").replace("~0", "~")
            child: yaml.Node | None = None
            if isinstance(node, yaml.MappingNode):
                keys = self._keys.get(id(node))
                if keys is None:
                    keys = self._keys[id(node)] = {
                        key.value: (int(key.start_mark.line), value)
                        for key, value in node.value
                        if isinstance(key, yaml.ScalarNode)}
                if token in keys:
                    line, child = keys[token]  # a key's line: where `name:` is written
            elif isinstance(node, yaml.SequenceNode) and token.isdigit() and \
                    int(token) < len(node.value):
                child = node.value[int(token)]
                line = int(child.start_mark.line)
            if child is None:
                break
            node = child
        return line + 1
