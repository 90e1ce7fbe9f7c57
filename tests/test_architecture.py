"""The package tree is the architecture (issue 12): dependencies point one way.

Imports are read with `ast` (those under `if TYPE_CHECKING:` excluded: they cost nothing at
run time and cannot form a cycle; imports inside functions count). No import cycle between
modules, and no module imports a higher layer than its own. docs/architecture.md shows the
same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "apishield"

# Lowest first. A module may import its own layer and those below, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("config", "exchange", "problems"),  # configuration models and the core request types
    ("contract", "state", "observe"),  # the compiled contract; stores; logs and redaction
    ("auth", "abuse"),  # who the caller is and what it may do; bans
    ("steps",),  # one module per pipeline step
    ("pipeline",),  # runs the steps in order
    ("admin", "audit", "probe"),  # the admin API; the contract+policy review; the prober
    # the gateway's transport; the ASGI front end and its per-request path
    ("http", "middleware", "asgi_http"),
    ("gateway", "supervisor"),  # the gateway front end; its workers' supervisor
    # the command line, the demo, the package root, the compiled build's module list
    ("cli", "demo", "__main__", "", "compiled"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def _type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The apishield modules `path` imports at run time."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for orelse in child.orelse:
                    visit(orelse)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    target = child.module or ""
                for alias in child.names:  # `from apishield.x import y`: y may be a module
                    full = f"{target}.{alias.name}"
                    found.add(full if full in known else target)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {module for module in found if module in known and module != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    names = set(known)
    return {name: imports_of(path, name, names) for name, path in known.items()}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(edges):
        if start in state:
            continue
        path = [start]
        stack = [iter(sorted(edges[start]))]
        state[start] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return [*path[path.index(child):], child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(edges[child])))
    return None


def test_every_module_belongs_to_a_layer():
    unplaced = sorted(m for m in modules() if layer_of(m) not in RANK)
    assert unplaced == [], f"add these to LAYERS (and docs/architecture.md): {unplaced}"


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{module} ({layer_of(module) or 'apishield'}) imports {target} ({layer_of(target)})"
        for module, targets in graph().items()
        for target in targets
        if RANK[layer_of(target)] > RANK[layer_of(module)]
    ]
    assert upward == []


def test_every_package_says_what_it_owns():
    for init in PACKAGE.rglob("__init__.py"):
        docstring = ast.get_docstring(ast.parse(init.read_text()))
        assert docstring, f"{init.relative_to(SRC)} has no docstring"


def test_the_checks_see_a_cycle_and_an_upward_import():
    """The checks are not vacuous."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    edges = graph()
    assert "apishield.pipeline" in edges["apishield.http.server"]  # imports are seen
    assert "apishield.auth.jwks" in edges["apishield.auth.jws"]
