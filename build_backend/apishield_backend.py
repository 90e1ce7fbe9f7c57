"""setuptools' PEP 517 backend, plus what a compiled build needs.

`APISHIELD_COMPILE=1 pip wheel .` (or `python -m build --wheel`) compiles the hot modules
with mypyc (setup.py). mypyc type-checks them first, so the build needs mypy and the
runtime dependencies (their types decide the generated code): they are added to the build
requirements only then, and an ordinary install downloads nothing more than setuptools.

An editable install is always pure Python: compiled modules beside the sources would
shadow them (the import system prefers an extension module to a .py file), and edits would
silently not run.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F403  (the rest of the PEP 517 interface)

_ROOT = Path(__file__).resolve().parent.parent


def _compiling() -> bool:
    return os.environ.get("APISHIELD_COMPILE") == "1"


def _compile_requirements() -> list[str]:
    project = tomllib.loads((_ROOT / "pyproject.toml").read_text())
    test_extra = project["project"]["optional-dependencies"]["test"]
    mypy = [req for req in test_extra if req.startswith(("mypy==", "types-"))]
    return [*mypy, *project["project"]["dependencies"]]


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    compiling = _compiling()
    # setuptools runs setup.py to answer, before mypy is installed: not compiling then.
    os.environ["APISHIELD_COMPILE"] = "0"
    try:
        requires = build_meta.get_requires_for_build_wheel(config_settings)
    finally:
        os.environ["APISHIELD_COMPILE"] = "1" if compiling else "0"
    return requires + (_compile_requirements() if compiling else [])


def build_editable(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                   metadata_directory: str | None = None) -> str:
    os.environ["APISHIELD_COMPILE"] = "0"
    return build_meta.build_editable(wheel_directory, config_settings, metadata_directory)
