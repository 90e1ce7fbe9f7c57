"""The effective config as `GET /config` shows it: every default filled in, no secret.

apishield's config never holds a secret value by design (C4: secrets are named by `env`
or `file`), with one exception: a Redis URL in `state:` may carry a password. Masking
still does not rely on that design alone: any string under a key that names a secret is
replaced (only references, the `*_env`/`*_file` keys and `env`/`file`, are shown: they
tell an operator where to look), and every other string goes through the log redactor,
which masks a URL's userinfo and any token or key shape.
"""

from __future__ import annotations

import re
from typing import Any

from apishield.config import Config
from apishield.observe.redact import redact

MASK = "<redacted>"
_SECRET_KEY = re.compile(
    r"(?i)(secret|password|passwd|token|api[_-]?key|private|credential|pepper|cookie)")
_REFERENCE_KEY = re.compile(r"(?i)(^|_)(env|file|path|header|name|names|claim)$")


def masked_config(config: Config) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    masked = _mask(data, "")
    assert isinstance(masked, dict)
    return masked


def _mask(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        return {k: _mask(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(item, key) for item in value]
    if isinstance(value, str):
        if _SECRET_KEY.search(key) and not _REFERENCE_KEY.search(key):
            return MASK
        return redact(value, limit=4096)  # URLs lose their userinfo here
    return value

