"""Optional compiled build: `APISHIELD_COMPILE=1` turns the hot modules into C extensions.

Everything else about the package is in pyproject.toml. The list of modules is
src/apishield/compiled.py (read as text: nothing is installed yet when this runs); the
in-tree backend (build_backend/apishield_backend.py) adds mypy to the build requirements
when compiling, and keeps editable installs pure Python.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def hot_module_files() -> list[str]:
    namespace: dict[str, object] = {}
    exec((ROOT / "src/apishield/compiled.py").read_text(), namespace)  # noqa: S102
    names = namespace["HOT_MODULES"]
    assert isinstance(names, tuple)
    return [str(Path("src", *name.split("."))) + ".py" for name in names]


ext_modules = []
if os.environ.get("APISHIELD_COMPILE") == "1":
    from mypyc.build import mypycify

    # The same mypy options the type check runs with (mypy.ini: strict), so what mypyc
    # trusts at run time is what `mypy` proved.
    ext_modules = mypycify(["--config-file", str(ROOT / "mypy.ini"), *hot_module_files()],
                           opt_level="3", debug_level="1")

setup(ext_modules=ext_modules)
