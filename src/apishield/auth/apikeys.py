"""API keys: their format, how they are hashed, and the pepper that keys the hash (A4, C5).

A key is `ask_<id>_<secret>`:

- `ask_` makes a leaked key recognisable (secret scanners, `redact`, grep);
- `<id>` is 12 characters of lowercase base32 (60 random bits). It is public: the store
  finds the record by it without scanning or comparing against every hash, and logs and
  `keys list` name a key by it;
- `<secret>` is `secrets.token_urlsafe(32)`: 32 random bytes, 43 base64url characters (C5).

Only `HMAC-SHA256(pepper, key)` is stored. The whole key is the HMAC message, so the hash
is bound to its record id: a hash copied onto another record (say, one with more scopes)
does not verify. A fast hash is right here, unlike for passwords: the input carries 256
random bits, so there is nothing to brute-force, and the hot path cannot afford a KDF.
The pepper means a copy of the state file alone (a backup, a stolen disk) does not even
allow checking guesses offline.

The pepper comes from `auth.api_keys.pepper` (`{env: NAME}` or `{file: path}`, relative
to the config file), or by default from `<state>.pepper`, a file generated next to the state
database on first use (0600, never overwritten). **With several gateway instances sharing
one store (Redis), give the pepper explicitly and identically to every instance**: each
would otherwise generate its own file, and a key created through one would fail on the
others. The generated file is printable (base64url), so its content can be moved into an
environment variable or a mounted secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
from pathlib import Path

from apishield.auth.principal import AuthFailure
from apishield.config import Config, ConfigError
from apishield.state.keys import DuplicateKeyId, KeyRecord, KeyStore, KeyStoreError

KEY_PREFIX = "ask_"
ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lowercase
ID_LENGTH = 12  # 60 bits: unique among any realistic number of keys (retried on collision)
SECRET_BYTES = 32
SECRET_LENGTH = 43  # len(base64url(32 bytes)) without padding
KEY_LENGTH = len(KEY_PREFIX) + ID_LENGTH + 1 + SECRET_LENGTH  # 60

# 43 base64url characters hold 258 bits, so the last one carries 4 data bits and 2 zero
# bits: only 16 characters can end a canonical encoding. Accepting only those means one
# key has one spelling.
_KEY = re.compile(
    rf"ask_([a-z2-7]{{{ID_LENGTH}}})_[A-Za-z0-9_-]{{{SECRET_LENGTH - 1}}}[AEIMQUYcgkosw048]"
)
# For scanning free text (log redaction, secret scanners): a key anywhere in a string.
KEY_PATTERN = re.compile(rf"\bask_[a-z2-7]{{{ID_LENGTH}}}_[A-Za-z0-9_-]{{{SECRET_LENGTH}}}")

MIN_PEPPER_BYTES = 16
PEPPER_SUFFIX = ".pepper"

_LABEL = re.compile(r"[^\x00-\x20\x7f]+")  # scopes, roles: no spaces or control characters
_NAME_MAX = 200


def new_key_id() -> str:
    """A fresh public record id."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


def generate_key(key_id: str | None = None) -> tuple[str, str]:
    """`(key_id, key)`: a new key for record `key_id` (a fresh id when None)."""
    key_id = key_id or new_key_id()
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"


def parse_key(presented: str) -> str:
    """The record id of a well-formed key; `AuthFailure("api-key-malformed")` otherwise.

    Strict and cheap (a length test, then one anchored regex over 60 characters), so junk
    of any size or shape is refused before the cache or the store is touched."""
    match = _KEY.fullmatch(presented) if len(presented) == KEY_LENGTH else None
    if match is None:
        raise AuthFailure("api-key-malformed")
    return match.group(1)


def hash_key(pepper: bytes, key: str) -> bytes:
    """What the store keeps for `key`: HMAC-SHA256 under the pepper (32 bytes)."""
    return hmac.new(pepper, key.encode("ascii"), hashlib.sha256).digest()


def key_matches(pepper: bytes, key: str, stored: bytes) -> bool:
    """Whether `key` hashes to `stored`, compared in constant time (no timing oracle on
    how many leading bytes of the hash a guess got right)."""
    return hmac.compare_digest(hash_key(pepper, key), stored)


def check_name(name: str) -> str:
    """An owner name fit for logs and `keys list`: 1-200 printable characters."""
    if not name.strip():
        raise ValueError("the name must not be empty")
    if len(name) > _NAME_MAX:
        raise ValueError(f"the name is longer than {_NAME_MAX} characters")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in name):
        raise ValueError("the name must not contain control characters")
    return name


def check_labels(values: tuple[str, ...] | list[str], what: str) -> tuple[str, ...]:
    """Scopes or roles: non-empty, without whitespace (a scope string is space-separated,
    RFC 6749 3.3); duplicates dropped, order kept."""
    for value in values:
        if not _LABEL.fullmatch(value):
            raise ValueError(f"{what} {value!r} must be non-empty, without spaces or "
                             "control characters")
    return tuple(dict.fromkeys(values))


def issue_key(store: KeyStore, pepper: bytes, *, name: str, scopes: tuple[str, ...] = (),
              roles: tuple[str, ...] = (), now: float,
              expires_at: float | None) -> tuple[str, KeyRecord]:
    """Create and store a new key; return `(key, record)`. The key exists nowhere else:
    the caller shows it once and forgets it."""
    name = check_name(name)
    scopes = check_labels(scopes, "scope")
    roles = check_labels(roles, "role")
    for _ in range(5):
        key_id, key = generate_key()
        record = KeyRecord(id=key_id, name=name, hash=hash_key(pepper, key), scopes=scopes,
                           roles=roles, created_at=now, expires_at=expires_at)
        try:
            store.create(record)
        except DuplicateKeyId:
            continue  # 60 random bits collided; draw again
        return key, record
    raise KeyStoreError("could not draw an unused API key id in 5 attempts")


# -- the pepper ---------------------------------------------------------------------------

def pepper_path(config: Config) -> Path:
    """Where the generated pepper lives: `<state>.pepper`, beside the state database."""
    state = config.resolve(config.state)
    return state.with_name(state.name + PEPPER_SUFFIX)


def load_pepper(config: Config, store: KeyStore | Path) -> bytes:
    """The HMAC key for API-key hashes, or a ConfigError saying why the gateway (or the
    CLI) must not go on.

    With `auth.api_keys.pepper` set it is read from there. Otherwise `<state>.pepper` is
    read, or generated when it does not exist yet. A missing file while the store already
    holds keys is refused rather than regenerated: a new pepper would silently invalidate
    every key (the file was lost, or `state` now points elsewhere). `store` is the open key
    store, or the path of the SQLite state file (opened briefly, only when the pepper file
    is missing, to see whether keys exist)."""
    settings = config.auth.api_keys.pepper
    if settings is not None and settings.env is not None:
        where = "auth.api_keys.pepper.env"
        value = os.environ.get(settings.env)
        if value is None:
            raise ConfigError([f"{where}: the environment variable {settings.env} is not set"])
        return _check_length(value.encode(), where, f"the variable {settings.env}")
    if settings is not None and settings.file is not None:
        return _read_pepper_file(config.resolve(settings.file), "auth.api_keys.pepper.file")
    path = pepper_path(config)
    if path.exists():
        return _read_pepper_file(path, "state")
    records = _records(store)
    if records:
        raise ConfigError([
            f"state: the pepper file {path} is missing but {len(records)} API key(s) exist; "
            "without it none of them verifies. Restore it from a backup (or set "
            "auth.api_keys.pepper to where it is kept); apishield will not generate a new one "
            "over existing keys"
        ])
    return _create_pepper_file(path)


def _records(store: KeyStore | Path) -> list[KeyRecord]:
    if not isinstance(store, Path):
        return store.list()
    if not store.exists():
        return []
    from apishield.state.sqlite import SqliteKeyStore  # the protocol module stays backend-free

    with SqliteKeyStore(store) as opened:
        return opened.list()


def _check_length(value: bytes, where: str, source: str) -> bytes:
    if len(value) < MIN_PEPPER_BYTES:
        raise ConfigError([f"{where}: {source} holds {len(value)} bytes; a pepper needs at "
                           f"least {MIN_PEPPER_BYTES} random bytes (e.g. python -c "
                           "'import secrets; print(secrets.token_urlsafe(32))')"])
    return value


def _read_pepper_file(path: Path, where: str) -> bytes:
    """Read a pepper file, refusing one every local user can read (the stat is taken on
    the open descriptor, so the checked file is the read file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ConfigError([f"{where}: the pepper file {path} does not exist"]) from None
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read the pepper file {path} "
                           f"({exc.strerror or exc})"]) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError([f"{where}: the pepper file {path} is not a regular file"])
        if os.name == "posix" and info.st_mode & stat.S_IROTH:
            mode = stat.S_IMODE(info.st_mode)
            raise ConfigError([f"{where}: the pepper file {path} is readable by every user "
                               f"(mode {mode:04o}); run `chmod 600 {path}` (in Kubernetes, "
                               "mount the secret with defaultMode: 0400)"])
        raw = handle.read(64 * 1024)
    value = raw.removesuffix(b"\n").removesuffix(b"\r")
    return _check_length(value, where, f"the pepper file {path}")


def _create_pepper_file(path: Path) -> bytes:
    """Generate `path` atomically with mode 0600 and return the pepper it holds.

    Written to a private temporary file, fsynced, then hard-linked into place: the link
    fails if `path` appeared meanwhile (another process won the race; its pepper is read
    instead), so an existing pepper is never overwritten and nobody reads a half-written
    one. 32 random bytes, base64url, so it can be copied into an env var or a secret."""
    if not path.parent.is_dir():
        raise ConfigError([f"state: the folder {path.parent} does not exist; create it, or "
                           "point `state` at a file in an existing folder"])
    value = secrets.token_urlsafe(SECRET_BYTES).encode("ascii")
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, value)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # a concurrent process created it first: use theirs
        except OSError:  # no hard links on this file system: exclusive create instead
            _create_exclusive(path, value)
        _fsync_folder(path.parent)
    except OSError as exc:
        raise ConfigError([f"state: cannot create the pepper file {path} "
                           f"({exc.strerror or exc})"]) from None
    finally:
        try:
            os.unlink(temporary)
        except OSError:
            pass
    return _read_pepper_file(path, "state")


def _create_exclusive(path: Path, value: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.write(fd, value)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the new directory entry durable: losing the pepper loses every key."""
    if os.name != "posix":  # pragma: no cover
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
