"""`apishield --version [--verbose]`, run as the real command (`python -m apishield`).

The verbose report is compared with what this interpreter sees independently: the
installed distributions' metadata, the ssl module, cryptography's backend, pyproject.toml
and requirements.lock.
"""

from __future__ import annotations

import os
import platform
import re
import ssl
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from apishield import __version__
from apishield.cli.version import SECURITY_LIBRARIES, requested
from apishield.compiled import build_kind
from tests.test_lock import ENTRIES, RUNTIME, name

ROOT = Path(__file__).parent.parent
# The libraries a bug report about a security gateway needs (issue 17, G4).
NAMED = {"pyjwt", "cryptography", "jsonschema-rs", "libinjection-python", "httptools", "uvloop",
         "pydantic", "redis", "argon2-cffi", "orjson", "pyyaml", "python-multipart",
         "prometheus-client", "maxminddb"}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "apishield", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                          check=False)


@pytest.fixture(scope="module")
def report() -> list[str]:
    result = run("--version", "--verbose")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout.splitlines()


def pins(lines: list[str]) -> dict[str, str]:
    found = {}
    for line in lines:
        if not line.startswith("#"):
            package, _, installed = line.partition("==")
            assert package and installed, f"not name==version: {line!r}"
            found[package] = installed
    return found


def test_plain_version_is_one_line():
    for flag in ("--version", "-V"):
        result = run(flag)
        assert result.returncode == 0
        assert result.stdout == f"apishield {__version__}\n"
        assert __version__ == version("apishield")  # the package and its metadata agree


def test_verbose_report_names_every_security_library_at_its_installed_version(report):
    assert report[0] == f"apishield=={version('apishield')}"
    found = pins(report[1:])
    assert NAMED <= set(found)
    assert set(found) == {name(requirement.name) for requirement in RUNTIME}
    for package, installed in found.items():
        assert installed == version(package), package
    # Here (installed from pyproject's pins) they are also the lock's: what the image runs.
    for package, installed in found.items():
        assert ENTRIES[name(package)].version == installed, package


def test_verbose_report_gives_openssl_and_python(report):
    comments = [line for line in report if line.startswith("#")]
    assert f"# ssl module: {ssl.OPENSSL_VERSION}" in comments
    from cryptography.hazmat.backends.openssl import backend

    assert f"# cryptography: {backend.openssl_version_text()}" in comments
    (python,) = [line for line in comments if line.startswith("# python ")]
    assert python.startswith(f"# python {platform.python_version()} (")
    assert f"# build: {build_kind()}" in comments
    # One line per item and no blank line: pasteable as is.
    assert all(line and line == line.strip() for line in report)


def test_short_flags_in_either_order_give_the_same_report(report):
    for args in (("-V", "-v"), ("-v", "-V"), ("--verbose", "--version"), ("-Vv",)):
        result = run(*args)
        assert result.returncode == 0, (args, result.stderr)
        assert result.stdout.splitlines() == report


def test_verbose_alone_is_no_version_request():
    result = run("--verbose")
    assert result.returncode == 2  # argparse: a command is required
    assert re.search(r"required: command|arguments are required", result.stderr)
    assert requested(["serve", "--version", "-v"]) is None  # flags of a command: argparse's
    assert requested([]) is None


def test_the_fallback_list_is_pyprojects_runtime_dependencies():
    """Used when apishield's metadata is missing (a source tree on sys.path)."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"]
    assert set(SECURITY_LIBRARIES) == {
        name(re.match(r"[\w.-]+", text).group(0)) for text in dependencies}


def test_the_docs_example_is_this_versions_report():
    """docs/deploy.md shows the report; its pins must follow the lock when a pin moves."""
    doc = (ROOT / "docs" / "deploy.md").read_text()
    section = doc[doc.index("### Versions for a bug report"):]
    (example,) = re.findall(r"^```text\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)[:1]
    lines = example.splitlines()
    assert lines[0] == f"apishield=={__version__}"
    assert pins(lines[1:]) == {package: ENTRIES[name(package)].version
                               for package in SECURITY_LIBRARIES}
    assert [line.split(":")[0] for line in lines if line.startswith("# ") and ":" in line] == [
        "# build", "# ssl module", "# cryptography"]
