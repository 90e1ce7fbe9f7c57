"""The compiled build (mypyc) and the pure-Python one are the same package, both tested.

CI runs the whole suite twice (.ci/run): on the editable install (pure Python, with
coverage) and on a wheel built with `APISHIELD_COMPILE=1`, with
`APISHIELD_EXPECT_COMPILED=1` set. These tests make sure each run is the build it claims:
a compiled run that silently imported the sources would prove nothing about the compiled
code, and a stale extension module beside the sources would shadow the code being edited.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from apishield.compiled import HOT_MODULES, build_kind, compiled_modules

ROOT = Path(__file__).resolve().parent.parent
EXPECT_COMPILED = os.environ.get("APISHIELD_EXPECT_COMPILED") == "1"


def test_every_hot_module_exists_in_the_sources():
    for name in HOT_MODULES:
        assert (ROOT / "src" / Path(*name.split("."))).with_suffix(".py").is_file(), name
    assert len(set(HOT_MODULES)) == len(HOT_MODULES)


def test_this_run_is_the_build_it_claims():
    found = compiled_modules()
    if EXPECT_COMPILED:
        assert found == list(HOT_MODULES)
        count = len(HOT_MODULES)
        assert build_kind() == f"mypyc, {count} of {count} hot modules compiled"
        # a module left out of the list stays interpreted
        spec = find_spec("apishield.config.root")
        assert spec is not None and str(spec.origin).endswith(".py")
    else:
        assert found == []
        assert build_kind() == "pure Python"


def test_setup_compiles_exactly_the_listed_modules():
    """setup.py reads the list as text (nothing is installed when it runs)."""
    namespace = {"__name__": "not_main", "__file__": str(ROOT / "setup.py")}
    code = (ROOT / "setup.py").read_text().replace("setup(ext_modules=ext_modules)", "")
    exec(compile(code, "setup.py", "exec"), namespace)
    files = namespace["hot_module_files"]()
    assert files == [f"src/{name.replace('.', '/')}.py" for name in HOT_MODULES]
    assert all((ROOT / path).is_file() for path in files)


def _backend(code: str, compile_env: str | None) -> str:
    env = {key: value for key, value in os.environ.items() if key != "APISHIELD_COMPILE"}
    if compile_env is not None:
        env["APISHIELD_COMPILE"] = compile_env
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, 'build_backend'); "
                               f"import apishield_backend as b; {code}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("compile_env", [None, "0", "1"])
def test_build_requirements_grow_only_for_a_compiled_build(compile_env):
    out = _backend("import os; print('\\n'.join(b.get_requires_for_build_wheel())); "
                   "print('--', os.environ['APISHIELD_COMPILE'])", compile_env)
    listed, left = out.split("-- ")
    requirements = listed.split()
    assert left.strip() == ("1" if compile_env == "1" else "0")  # restored after setup.py ran
    if compile_env == "1":
        assert any(req.startswith("mypy==") for req in requirements)
        assert "orjson==3.13.0" in requirements  # the runtime pins: their types shape the code
    else:
        assert not any(req.startswith(("mypy", "orjson")) for req in requirements)


def test_an_editable_install_is_never_compiled():
    """Extension modules beside the sources would shadow them: edits would not run."""
    out = _backend("import os; os.environ['APISHIELD_COMPILE'] = '1'; "
                   "import setuptools.build_meta as m; "
                   "m.build_editable = lambda *a, **k: os.environ['APISHIELD_COMPILE']; "
                   "print(b.build_editable('/nonexistent'))", "1")
    assert out.strip() == "0"
    leftovers = [path for path in (ROOT / "src" / "apishield").rglob("*")
                 if path.suffix in (".so", ".pyd", ".c")]
    assert leftovers == []


def test_a_batch_is_written_once(tmp_path):
    """Found by the compiled run: `view = view[os.write(fd, view):]` wrote every access-log
    batch twice under mypyc 2.4.1 (it evaluates a slice bound of a memoryview twice)."""
    from apishield.observe.accesslog import write_all

    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        write_all(fd, b'{"a":1}\n' * 3)
    finally:
        os.close(fd)
    assert path.read_bytes() == b'{"a":1}\n' * 3


def _awaits_in(body: list[ast.stmt]) -> list[int]:
    """Lines of the awaits in `body` that run in it (not in a function defined there)."""
    found: list[int] = []
    stack: list[ast.AST] = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.Await | ast.AsyncFor | ast.AsyncWith):
            found.append(node.lineno)
        stack.extend(ast.iter_child_nodes(node))
    return found


def test_no_hot_module_awaits_while_an_exception_is_in_flight():
    """mypyc 2.4.1: a compiled coroutine that awaits inside an `except` or `finally` block
    leaks the exception in flight into the coroutine awaiting it (found by
    test_reload.py::test_twenty_reloads_under_load_fail_no_request on the compiled wheel:
    the gateway exited 1 with a retired pipeline's CancelledError; 25 lines reproduce it,
    bench/RESULTS.md). The hot modules keep the exception in a local and await after the
    handler; this keeps it that way in both builds' runs."""
    offending = []
    for name in HOT_MODULES:
        path = (ROOT / "src" / Path(*name.split("."))).with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Try | ast.TryStar):
                handlers = [handler.body for handler in node.handlers] + [node.finalbody]
                offending += [f"{name}:{line}" for body in handlers
                              for line in _awaits_in(body)]
    assert offending == []
