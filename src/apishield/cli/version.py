"""`apishield --version --verbose`: what a bug report or a vulnerability triage needs.

A security gateway's behaviour depends on the libraries it runs with (the JWT and crypto
code, the schema validator, the injection detector, the HTTP parser) and on the OpenSSL the
`ssl` module links, so one command prints them, one per line. The versions are read from
the installed distributions' metadata (importlib.metadata), not from module attributes:
that is what pip, the lock file and `pip-audit` speak. Package lines are `name==version`,
everything else is a `#` comment, so the output can be compared line by line with
requirements.lock (docs/deploy.md, "Supply chain").
"""

from __future__ import annotations

import platform
import re
import ssl
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, requires, version

from apishield import __version__
from apishield.compiled import build_kind

# The runtime dependencies of pyproject.toml, each on the request path or guarding it. Used
# when apishield's own metadata cannot be read (a source tree on sys.path, not installed);
# tests/test_version.py checks that the list and pyproject.toml agree.
SECURITY_LIBRARIES = (
    "argon2-cffi",
    "cryptography",
    "httptools",
    "jsonschema-rs",
    "libinjection-python",
    "maxminddb",
    "orjson",
    "prometheus-client",
    "pydantic",
    "pyjwt",
    "python-multipart",
    "pyyaml",
    "redis",
    "uvloop",
)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def short() -> str:
    """The one line of `apishield --version`."""
    return f"apishield {__version__}"


def libraries() -> list[str]:
    """The direct runtime dependencies, from the installed metadata when there is one."""
    try:
        declared = requires("apishield")
    except PackageNotFoundError:
        return list(SECURITY_LIBRARIES)
    # `name==1.0; marker`: the name is the leading token (packaging is no runtime dependency).
    names = {match.group(0).lower() for text in declared or []
             if "extra ==" not in text and (match := _NAME.match(text))}
    return sorted(names or SECURITY_LIBRARIES)


def _installed(name: str) -> str:
    try:
        return f"{name}=={version(name)}"
    except PackageNotFoundError:
        return f"# {name}: not installed"


def _cryptography_openssl() -> str:
    """cryptography's wheels carry their own OpenSSL, which may differ from the ssl module's."""
    try:
        from cryptography.hazmat.backends.openssl import backend
    except ImportError:
        return "not available"
    return str(backend.openssl_version_text())


def verbose() -> str:
    """Every line of `apishield --version --verbose`, newline-terminated."""
    lines = [
        f"apishield=={__version__}",
        f"# python {platform.python_version()} ({platform.python_implementation()}, "
        f"{sys.platform}, {platform.machine()})",
        f"# build: {build_kind()}",
        f"# ssl module: {ssl.OPENSSL_VERSION}",
        f"# cryptography: {_cryptography_openssl()}",
    ]
    lines.extend(_installed(name) for name in libraries())
    return "\n".join(lines) + "\n"


_VERSION_FLAGS = {"-V", "--version"}
_VERBOSE_FLAGS = {"-v", "--verbose"}
_BOTH = {"-Vv", "-vV"}


def requested(argv: Sequence[str]) -> str | None:
    """The report that `apishield -V|--version [-v|--verbose]` asks for, in either order.

    None for any other command line, which argparse then parses: its `--version` action
    exits as soon as it is read, before a later `--verbose` could be seen, so the pair is
    recognised here, and only when the arguments are these flags and nothing else.
    """
    flags = set(argv)
    if not flags or not flags <= _VERSION_FLAGS | _VERBOSE_FLAGS | _BOTH:
        return None
    if not flags & (_VERSION_FLAGS | _BOTH):
        return None
    return verbose() if flags & (_VERBOSE_FLAGS | _BOTH) else short() + "\n"
