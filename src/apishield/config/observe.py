"""What the gateway records: the access log, redaction and the audit trail (and, as they
land, metrics and alerts).

Its own module because observability keys are read by `apishield.observe`, not by any
pipeline step, and the next features of that layer add their models here rather than to
the transport or response modules.
"""

from __future__ import annotations

import re

from pydantic import field_validator

from apishield.config.auth import Secret
from apishield.config.units import Model

# a header name or a JSON / form field name as people write them (RFC 9110 5.1 tokens
# are wider, but a quote or a separator would be mistaken for the value's start)
_FIELD_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class AccessLog(Model):
    enabled: bool = True
    path: str = "-"  # "-" = standard output


class Redact(Model):
    """`redact: {fields: [ssn, x-internal-token]}`: body field and header names whose
    values are masked in every log line, on top of the built-in secrets (passwords,
    tokens, API keys, cookies, authorization headers, URL passwords). Matched without
    regard to case; compiled once, when the config is loaded."""

    fields: tuple[str, ...] = ()

    @field_validator("fields")
    @classmethod
    def _check_fields(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for index, name in enumerate(value):
            if not _FIELD_NAME.match(name):
                raise ValueError(
                    f"item {index}: {name!r} is not a field or header name; write the bare "
                    "name, e.g. ssn or x-internal-token (letters, digits, '-', '_', '.')")
        return value


class AuditLog(Model):
    """`audit_log:`: the tamper-evident trail of sensitive operations (F5,
    docs/audit-trail.md). On by default: the trail is only worth something if it has no
    holes, and it costs one small append per operator action.

    `path` unset: beside the SQLite state file (`<state>.audit.jsonl`), or, with a Redis
    `state`, a Redis stream every gateway and the CLI share. A `path` given is always a
    file (relative to the config file). `key`: an HMAC-SHA-256 key (`{env: NAME}` or
    `{file: path}`); without one the chain is plain SHA-256, which anyone who can write
    the file can recompute."""

    enabled: bool = True
    path: str | None = None
    key: Secret | None = None
