"""The suite's logs are scanned for every secret the suite used (issue 11): 0 hits, or the
session fails.

Registered secrets (`register_secret`, and automatically):

- every JWT minted in the pytest process (PyJWT's `PyJWS.encode`, which `jwt.encode` and
  the issuer's `mint` use; the issuer's `forge` and `sign_raw`);
- every API key generated in it (`apikeys.generate_key`, which `issue_key` uses);
- every credential the tests send with httpx: `Authorization` (the part after the scheme;
  for Basic also the decoded password), `Cookie` values, headers and query parameters
  named like a key, token, secret or password, URL passwords. Keys created by the CLI in
  a subprocess are registered when a test uses them;
- literals in the test sources (`ast`): strings assigned to, passed as, or keyed by a
  name like password/secret/token/cookie/pepper/api_key/authorization, strings shaped
  like an API key or a JWT, and what follows `password=`, `Bearer ` or a cookie name in a
  string; and module-level constants of collected test modules with such names.

A secret counts from 8 characters and 5 distinct ones (`hunter2` and `"x" * 43` do not);
it is looked for as written, percent-encoded (both ways) and JSON-escaped.

Also registered at the end of the session: the content of files the tests wrote for a
gateway to read (`pepper`, `*.pepper`, `*.secret`, `passphrase`, the first lines of
private-key PEMs) anywhere under the base temp.

Scanned at the end of the session: every log file under the session's base temp (gateway
stderr, access logs, uvicorn and other `*.log` / `*stderr*` / `*stdout*` files: not
configs, key files or databases, which hold secrets on purpose), and every log record
emitted in the pytest process (a handler on the root logger writes them, formatted with
tracebacks, to `<basetemp>/secret-scan/pytest-logging.log`; not the records of the
tests' HTTP clients, httpx and httpcore, which log the URLs the tests request). Records
reach that handler at the level the loggers let through (WARNING by default, lower where
a test lowers it): the scan changes no logger's level, so it cannot change what tests
observe. For a one-off hunt, `SECRET_SCAN_LOG_LEVEL=DEBUG pytest` lowers the root
logger's level for the session (tests that count records may then fail; not for CI).
Subprocess output that tests read through pipes (not files) is not scanned.

A hit names the file (or record log), the kind of secret, where it was registered, and a
prefix of the secret, never all of it; the session's exit status becomes 1.

With pytest-xdist each worker writes its registry to `<its basetemp>/secret-scan/` (its
basetemp lies under the controller's) and the controller scans everything under its own
basetemp with the union of the registries.
"""

from __future__ import annotations

import ast
import base64
import functools
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote

import pytest

TESTS = Path(__file__).parent
MIN_LENGTH = 8
MIN_DISTINCT = 5
SCAN_DIR = "secret-scan"
REGISTRY_FILE = "registry.json"
RECORDS_FILE = "pytest-logging.log"
PREFIX = 6  # at most this many characters of a secret in a report (a quarter of short ones)

# names whose values are secrets (variables, keyword arguments, dict keys, headers, query)
SECRET_NAME = re.compile(
    r"(?i)(passw(or)?d|passwd|\bpwd|secret|token|cookie|pepper|api[_-]?key|authorization|"
    r"credential|^jwt|_jwt$)")
# names that look secret-ish but hold something else
NOT_SECRET_NAME = re.compile(r"(?i)(_id$|^kid$|key_id|token_url|_path$|_file$|_hash$|"
                             r"tokens?_(endpoint|type)|_kind$|_name$|keys?_cli|count)")
API_KEY = re.compile(r"ask_[a-z2-7]{12}_[A-Za-z0-9_-]{43}")
JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
IN_TEXT = re.compile(
    r"(?i)(?:passw(?:or)?d|passwd|pwd|secret|api[_-]?key|access_token|token)"
    r"[\"']?\s*[=:]\s*[\"']?([^\s\"'&;,(){}\[\]]{8,})"
    r"|\b(?:Bearer|Basic)\s+([A-Za-z0-9._~+/=-]{8,})"
    r"|\bCookie:\s*[^=\s;]+=([^\s;]{8,})")
# what redaction writes and other obvious non-secrets
PLACEHOLDER = re.compile(r"(?i)<redacted>|\*\*\*|\.\.\.|redacted|\{[^}]*\}|^<|^\$\{|%\(|"
                         r"(?-i:^[A-Z_]+$)")

WORD = re.compile(rb"[A-Za-z0-9]{8,}")
RUN = re.compile(rb"[A-Za-z0-9]+")
LOG_SUFFIXES = (".log", ".stderr", ".stdout", ".err", ".out")
NOT_LOG_SUFFIXES = (".yaml", ".yml", ".json", ".py", ".db", ".sqlite", ".sqlite3", ".pem",
                    ".key", ".crt", ".pepper", ".toml", ".txt.pepper", ".db-wal", ".db-shm")


@dataclass(frozen=True)
class Hit:
    where: str  # the log file
    kind: str
    origin: str  # where the secret was registered
    prefix: str  # the first PREFIX characters of the secret, never more
    length: int

    def describe(self) -> str:
        return (f"{self.where}: a {self.kind} ({self.prefix}... {self.length} chars, "
                f"registered by {self.origin})")


def _worth(value: str) -> bool:
    return (len(value) >= MIN_LENGTH and len(set(value)) >= MIN_DISTINCT
            and not PLACEHOLDER.search(value))


def spellings(value: str) -> set[str]:
    """`value` as logs could hold it: as is, percent-encoded, form-encoded, JSON-escaped."""
    forms = {value, quote(value, safe=""), quote(value, safe="/:"), quote_plus(value),
             json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    return {form for form in forms if form}


class Registry:
    """Secrets by spelling -> (kind, origin). Thread-safe: servers in threads mint too."""

    def __init__(self) -> None:
        self._secrets: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def add(self, value: str | bytes | None, kind: str, origin: str) -> None:
        if value is None:
            return
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                return
        value = value.strip()
        if not _worth(value):
            return
        with self._lock:
            for spelling in spellings(value):
                self._secrets.setdefault(spelling, (kind, origin))

    def items(self) -> list[tuple[str, tuple[str, str]]]:
        with self._lock:
            return list(self._secrets.items())

    def __len__(self) -> int:
        return len(self._secrets)

    def __contains__(self, value: str) -> bool:
        return value in self._secrets

    def dump(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({value: list(meta) for value, meta in self.items()}))

    def load(self, path: Path) -> None:
        for value, (kind, origin) in json.loads(path.read_text()).items():
            with self._lock:
                self._secrets.setdefault(value, (kind, origin))


REGISTRY = Registry()


def register_secret(value: str | bytes | None, kind: str = "secret",
                    origin: str = "register_secret") -> None:
    """Declare a secret the suite uses: the session fails if a log holds it."""
    REGISTRY.add(value, kind, origin)


def credential_parts(header: str, value: str) -> Iterator[tuple[str, str]]:
    """(kind, secret) in a header value a client sends (`Authorization`, `Cookie`,
    `X-Api-Key`, ...)."""
    name = header.lower()
    if name in ("authorization", "proxy-authorization"):
        scheme, _, credentials = value.strip().partition(" ")
        credentials = credentials.strip() or scheme
        yield "credential", credentials
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
            except ValueError:
                return
            password = decoded.partition(":")[2]
            yield "password", password
            yield "password", unquote(password)
        elif scheme.lower() == "bearer" and credentials.count(".") == 2:
            yield "jwt signature", credentials.rsplit(".", 1)[1]
    elif name == "cookie":
        for part in value.split(";"):
            yield "cookie", part.partition("=")[2]
    elif _secret_name(name):
        yield "credential", value


def register_credential(header: str, value: str, origin: str) -> None:
    for kind, secret in credential_parts(header, value):
        register_secret(secret, kind, origin)


# ------------------------------------------------------------------ automatic registration

def _register_jwt(token: Any, origin: str) -> None:
    if isinstance(token, bytes):
        token = token.decode("ascii", "replace")
    if isinstance(token, str):
        register_secret(token, "jwt", origin)
        if token.count(".") == 2:
            register_secret(token.rsplit(".", 1)[1], "jwt signature", origin)


def _register_request(request: Any) -> None:
    origin = "an httpx request"
    for raw_name, raw_value in request.headers.raw:
        register_credential(raw_name.decode("latin-1"), raw_value.decode("latin-1"), origin)
    url = request.url
    if url.password:
        register_secret(unquote(url.password), "password", origin)
    for name, value in url.params.multi_items():
        if _secret_name(name):
            register_secret(value, "credential", origin)


_patched: list[tuple[Any, str, Any]] = []


def _patch(owner: Any, name: str, wrapper: Any) -> None:
    original = getattr(owner, name)
    _patched.append((owner, name, original))
    setattr(owner, name, wrapper(original))


def install_hooks() -> None:
    """Wrap what mints or sends secrets in the pytest process (undone by `remove_hooks`)."""
    if _patched:
        return
    import httpx
    import jwt.api_jws

    import apishield.auth.apikeys as apikeys
    import tests.issuer_server as issuer

    def jws_encode(original: Any) -> Any:
        @functools.wraps(original)
        def encode(*args: Any, **kwargs: Any) -> Any:
            token = original(*args, **kwargs)
            _register_jwt(token, "PyJWT encode")
            return token
        return encode

    def token_maker(original: Any) -> Any:
        @functools.wraps(original)
        def make(*args: Any, **kwargs: Any) -> Any:
            token = original(*args, **kwargs)
            _register_jwt(token, f"issuer_server.{original.__name__}")
            return token
        return make

    def key_maker(original: Any) -> Any:
        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            key_id, key = original(*args, **kwargs)
            register_secret(key, "api key", "apikeys.generate_key")
            register_secret(key[len("ask_") + len(key_id) + 1:], "api key secret",
                            "apikeys.generate_key")
            return key_id, key
        return generate

    def sync_send(original: Any) -> Any:
        @functools.wraps(original)
        def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            _register_request(request)
            return original(self, request, *args, **kwargs)
        return send

    def async_send(original: Any) -> Any:
        @functools.wraps(original)
        async def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            _register_request(request)
            return await original(self, request, *args, **kwargs)
        return send

    _patch(jwt.api_jws.PyJWS, "encode", jws_encode)
    # the module-level shortcut is a method bound before the patch: bind it again
    _patch(jwt.api_jws, "encode",
           lambda _original: jwt.api_jws._jws_global_obj.encode)  # type: ignore[attr-defined]
    _patch(issuer, "forge", token_maker)
    _patch(issuer, "sign_raw", token_maker)
    _patch(apikeys, "generate_key", key_maker)
    _patch(httpx.Client, "send", sync_send)
    _patch(httpx.AsyncClient, "send", async_send)


def remove_hooks() -> None:
    while _patched:
        owner, name, original = _patched.pop()
        setattr(owner, name, original)


# ------------------------------------------------------------------ literals in the sources

def _constant(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
        value = node.value
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return None


def _secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name)) and not NOT_SECRET_NAME.search(name)


def literal_secrets(source: str) -> Iterator[tuple[str, str]]:
    """(kind, value) of the secrets written in one Python source."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value = _constant(node.value)
            names = [t.id if isinstance(t, ast.Name) else t.attr
                     for t in targets if isinstance(t, ast.Name | ast.Attribute)]
            if value is not None and any(_secret_name(name) for name in names):
                yield "literal", value
        elif isinstance(node, ast.keyword) and node.arg and _secret_name(node.arg):
            value = _constant(node.value)
            if value is not None:
                yield "literal", value
        elif isinstance(node, ast.Dict):
            for key, item in zip(node.keys, node.values, strict=True):
                name, value = _constant(key), _constant(item)
                if name is None or value is None:
                    continue
                for _kind, part in credential_parts(name, value):
                    yield "literal", part
        text = _constant(node) if isinstance(node, ast.Constant) else None
        if text:
            for match in API_KEY.finditer(text):
                yield "api key literal", match.group(0)
            for match in JWT_SHAPE.finditer(text):
                yield "jwt literal", match.group(0)
            for match in IN_TEXT.finditer(text):
                yield "literal", next(group for group in match.groups() if group)


def register_source_literals(root: Path = TESTS) -> None:
    for path in sorted(root.rglob("*.py")):
        if path.name == Path(__file__).name:
            continue
        origin = f"a literal in {path.relative_to(root.parent)}"
        for kind, value in literal_secrets(path.read_text(errors="replace")):
            register_secret(value, kind, origin)


def register_module_constants(module: Any) -> None:
    """Module-level secrets a test module computes (`API_KEY = generate_key()[1]`)."""
    for name, value in vars(module).items():
        if not name.isupper() or not _secret_name(name):
            continue
        values = value if isinstance(value, tuple | list | frozenset | set) else (value,)
        for item in values:
            if isinstance(item, str | bytes):
                register_secret(item, "constant", f"{module.__name__}.{name}")


SECRET_FILES = ("pepper", "passphrase", "secret")  # names, or suffixes after a dot


def register_secret_files(root: Path) -> None:
    """Secrets the tests wrote for the gateway to read (a generated pepper, a client
    secret file, a key passphrase, private keys): looked for in the logs too."""
    for path in root.rglob("*"):
        name = path.name.lower()
        try:
            if not path.is_file() or path.stat().st_size > 65536:
                continue
            if name in SECRET_FILES or name.rsplit(".", 1)[-1] in SECRET_FILES:
                register_secret(path.read_text(errors="replace"), "secret file",
                                f"a file named {path.name}")
            elif name.endswith((".key", ".pem")):
                lines = path.read_text(errors="replace").splitlines()
                if any("PRIVATE KEY" in line for line in lines[:1]):
                    for line in lines[1:4]:  # a private key's first lines are unique
                        register_secret(line, "private key", f"a file named {path.name}")
        except OSError:
            continue


# ------------------------------------------------------------------ scanning

class Index:
    """Finds registered secrets in a text without testing each one against it: a secret
    with an alphanumeric run of 8+ characters bounded inside it by other characters
    (the id of an API key, the payload of a JWT) is only looked for where that run is a
    whole word of the text; the others (most literal passwords) are looked for directly."""

    def __init__(self, registry: Registry) -> None:
        self.anchored: dict[bytes, list[tuple[bytes, str, str, str]]] = {}
        self.plain: list[tuple[bytes, str, str, str]] = []
        for value, (kind, origin) in registry.items():
            raw = value.encode("utf-8")
            entry = (raw, kind, origin, value)
            runs = [m for m in RUN.finditer(raw)
                    if m.start() > 0 and m.end() < len(raw) and m.end() - m.start() >= 8]
            if runs:
                anchor = max(runs, key=lambda m: m.end() - m.start()).group(0)
                self.anchored.setdefault(anchor, []).append(entry)
            else:
                self.plain.append(entry)

    def find(self, data: bytes) -> Iterator[tuple[str, str, str]]:
        """(kind, origin, value) of every secret in `data`, each once."""
        found: set[str] = set()
        words = set(WORD.findall(data)) & self.anchored.keys()
        candidates = [entry for word in words for entry in self.anchored[word]]
        for raw, kind, origin, value in (*candidates, *self.plain):
            if value not in found and raw in data:
                found.add(value)
                yield kind, origin, value


def is_log_file(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(NOT_LOG_SUFFIXES) or (path.parent.name == SCAN_DIR and name != RECORDS_FILE):
        return False
    return name.endswith(LOG_SUFFIXES) or any(word in name for word in
                                              ("stderr", "stdout", "log"))


def log_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        try:
            if path.is_file() and not path.is_symlink() and is_log_file(path):
                yield path
        except OSError:
            continue


def scan(paths: Iterable[Path], registry: Registry) -> tuple[list[Hit], int]:
    """The hits in these files, and how many files were read."""
    index = Index(registry)
    hits: list[Hit] = []
    count = 0
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        count += 1
        for kind, origin, value in index.find(data):
            shown = max(2, min(PREFIX, len(value) // 4))
            hits.append(Hit(str(path), kind, origin, value[:shown], len(value)))
    return hits, count


# ------------------------------------------------------------------ the pytest plugin

# The tests' own HTTP clients log the URLs the tests request (query credentials included)
# at INFO: what a test sent, not what the gateway logged.
CLIENT_LOGGERS = ("httpx", "httpcore")


class _Records(logging.Handler):
    """Every record that reaches the root logger, formatted, into a file (but the test
    clients' own)."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.NOTSET)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.stream = path.open("a", encoding="utf-8", errors="backslashreplace")
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".", 1)[0] in CLIENT_LOGGERS:
            return
        try:
            text = self.format(record)
        except Exception:  # a record that does not format: its raw parts
            text = f"{record.name} {record.msg!r} {record.args!r}"
        self.stream.write(text + "\n")  # `handle` holds the handler's lock
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()
        super().close()


def _basetemp(config: pytest.Config) -> Path:
    return Path(config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


_state: dict[str, Any] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    install_hooks()
    register_source_literals()
    handler = _Records(_basetemp(config) / SCAN_DIR / RECORDS_FILE)
    root = logging.getLogger()
    root.addHandler(handler)
    level = os.environ.get("SECRET_SCAN_LOG_LEVEL")
    if level:
        _state["level"] = root.level
        root.setLevel(level.upper())
    _state["handler"] = handler


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for module in {id(item.module): item.module for item in items  # type: ignore[attr-defined]
                   if getattr(item, "module", None) is not None}.values():
        register_module_constants(module)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    handler = _state.pop("handler", None)
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()
    if "level" in _state:
        logging.getLogger().setLevel(_state.pop("level"))
    remove_hooks()
    base = _basetemp(config)
    worker = _is_worker(config)
    if not worker:
        register_secret_files(base)  # the workers' files too: their basetemps are in it
    REGISTRY.dump(base / SCAN_DIR / REGISTRY_FILE)
    if worker:
        return  # the controller scans (this worker's basetemp is under its own)
    registry = Registry()
    for path in base.rglob(f"{SCAN_DIR}/{REGISTRY_FILE}"):
        registry.load(path)
    hits, files = scan(log_files(base), registry)
    _state["report"] = (hits, files, len(registry))
    if hits and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    report = _state.get("report")
    if report is None:
        return
    hits, files, secrets = report
    if not hits:
        terminalreporter.write_line(
            f"secret scan: 0 hits ({secrets} spellings of the suite's secrets, "
            f"{files} log files and the pytest process's log records)")
        return
    terminalreporter.section("secret scan", sep="=", red=True, bold=True)
    for hit in hits:
        terminalreporter.write_line(hit.describe(), red=True)
    terminalreporter.write_line(f"secret scan: {len(hits)} hit(s) in {files} log files: "
                                "a secret the suite used reached a log", red=True, bold=True)
