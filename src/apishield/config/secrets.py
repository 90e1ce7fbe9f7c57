"""Reading a secret the config names (`{env: NAME}` or `{file: path}`, checklist C4).

In the configuration layer because every layer that holds a secret reads it the same way
(issuer HMAC secrets and introspection credentials in auth/, the Redis password in
state/), and the config file only ever says where a secret is.
"""

from __future__ import annotations

import os
from pathlib import Path

from apishield.config.auth import Secret


def read_secret(secret: Secret, source_dir: str | Path, *, what: str) -> bytes:
    """A secret's bytes, from an environment variable or a file (relative paths against
    the config file's folder). One trailing newline of a file is dropped (`echo x > f`).
    Errors name the variable or the file, never the value."""
    if secret.env is not None:
        value = os.environ.get(secret.env)
        if not value:
            raise ValueError(f"{what}: environment variable {secret.env} is not set or empty")
        return value.encode("utf-8")
    assert secret.file is not None  # Secret validates exactly one source
    path = (Path(source_dir) / secret.file).resolve()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise ValueError(f"{what}: {path} is empty")
    return data
