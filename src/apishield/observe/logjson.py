"""One JSON object per line for everything apishield logs: the schema of docs/logging.md.

Every line starts with the same fields, in this order: `ts` (RFC 3339 UTC, milliseconds,
as in the access log), `level` (lowercase), `kind`, `logger`, `msg`; then `request_id`
when the line is about a request, then the fields of its kind. A caller gives the kind
and its fields with `fields()`:

    logger.info("listening", extra=fields("lifecycle", event="start", url=...))

The fields travel in one namespaced record attribute (`extra={"name": ...}` would collide
with `LogRecord.name`, and a flat extra would have to be told apart from the record's own
attributes on every line). A record without them (a third-party library, an old call)
still gets a kind: `security` and `audit` from their loggers, `error` when it carries an
exception, else `log`.

Nothing that came from outside reaches a line unmasked (F6): `msg`, the exception's text
and the traceback go through `redact` (built-in secret shapes and the configured
`redact.fields`); a traceback keeps its lines inside its JSON string (JSON escaping keeps
the record on one physical line, so an exception message cannot forge a log line).
Kind fields are values apishield computed (ids, reason codes, addresses) and are written
as they are. orjson does the encoding: a line costs a few microseconds.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from typing import IO, Final

import orjson

from apishield.config import worker_role
from apishield.observe.redact import redact

FIELDS: Final = "apishield_fields"  # the LogRecord attribute `fields()` fills
_REDACTED: Final = "apishield_redacted"  # set by RedactingFilter: the traceback, or None
KINDS: Final = ("access", "security", "audit", "lifecycle", "error", "log")
TRACEBACK_LIMIT: Final = 16_384  # characters of a traceback kept (the innermost end)
_BY_LOGGER: Final = {"apishield.security": "security", "apishield.audit": "audit"}
_RESERVED: Final = frozenset(("ts", "level", "kind", "logger", "msg", "request_id",
                              "exc_type", "traceback"))


def fields(kind: str, request_id: str | None = None, **values: object) -> dict[str, object]:
    """The `extra=` of a structured line: its kind, its request id, its own fields."""
    return {FIELDS: (kind, request_id, values)}


def timestamp(now: float) -> str:
    """RFC 3339 UTC with milliseconds (`2026-12-06T08:48:39.123Z`), as the access log's."""
    second = int(now)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            + f".{int((now - second) * 1000):03d}Z")


def _traceback(value: BaseException) -> str:
    """The exception's traceback, redacted, at most `TRACEBACK_LIMIT` characters."""
    text = "".join(traceback.format_exception(value)).rstrip("\n")
    if len(text) > TRACEBACK_LIMIT:  # the innermost frames and the message matter most
        text = "..." + text[-TRACEBACK_LIMIT:]
    return redact(text, TRACEBACK_LIMIT + 3, one_line=False)


def _exception(record: logging.LogRecord) -> tuple[str | None, str | None]:
    """The exception's class name and its redacted traceback, or (None, None)."""
    value = record.exc_info[1] if record.exc_info else None
    if value is None:
        return None, None
    done = record.__dict__.get(_REDACTED)
    return type(value).__qualname__, done if isinstance(done, str) else _traceback(value)


class RedactingFilter(logging.Filter):
    """Masks secrets in a record before any handler formats it: the message (rendered
    with its arguments, which are then dropped) and, for a record with an exception, the
    traceback, stored in `exc_text`, which `logging.Formatter` prints instead of
    formatting the exception again. For the middleware, whose records may reach the
    host's handlers and formats (a traceback holding `password=...` was logged in clear)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _REDACTED in record.__dict__:
            return True
        record.msg = redact(record.getMessage(), 4096)
        record.args = None
        value = record.exc_info[1] if record.exc_info else None
        record.exc_text = _traceback(value) if value is not None else record.exc_text
        record.__dict__[_REDACTED] = record.exc_text if value is not None else None
        return True


_FILTER = RedactingFilter()
LOGGERS: Final = ("apishield", "apishield.security", "apishield.audit", "apishield.state",
                  "apishield.abuse.bans")


def redact_records() -> None:
    """Install `RedactingFilter` on apishield's loggers (once; a filter on a logger sees
    only the records logged on that very logger, so each is named)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


class JsonFormatter(logging.Formatter):
    """`logging.Formatter` writing the apishield line schema (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        return self.encode(record).decode()

    def encode(self, record: logging.LogRecord) -> bytes:
        """The line as bytes, without the newline."""
        given = record.__dict__.get(FIELDS)
        exc_type, trace = _exception(record)
        if given is not None:
            kind, request_id, values = given
        else:
            kind = _BY_LOGGER.get(record.name) or ("error" if exc_type else "log")
            request_id, values = None, {}
        line: dict[str, object] = {
            "ts": timestamp(record.created),
            "level": record.levelname.lower(),
            "kind": kind,
            "logger": record.name,
            "msg": redact(record.getMessage(), 4096),
        }
        if request_id is not None:
            line["request_id"] = request_id
        role = worker_role.current()
        if role is not None:  # which worker of `serve --workers N` wrote it
            line["worker"] = role.index
        line.update({k: v for k, v in values.items() if k not in _RESERVED})
        if exc_type is not None:
            line["exc_type"] = exc_type
            line["traceback"] = trace
        elif record.stack_info:
            line["traceback"] = redact(record.stack_info, TRACEBACK_LIMIT, one_line=False)
        return orjson.dumps(line, default=str)


def handler(stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler (stderr by default) writing JSON lines."""
    made = logging.StreamHandler(stream if stream is not None else sys.stderr)
    made.setFormatter(JsonFormatter())
    return made


def configure_process(level: int = logging.INFO) -> None:
    """For apishield's own processes (the CLI): every record of the process, apishield's
    and its libraries', becomes a JSON line on stderr. Like `logging.basicConfig`, it does
    nothing when the root logger already has a handler (the CLI called from a program
    that configured logging keeps that program's)."""
    root = logging.getLogger()
    if root.handlers:
        return
    root.addHandler(handler())
    root.setLevel(level)


def attach_if_unconfigured(level: int = logging.INFO) -> bool:
    """For the middleware, inside a host application: give the `apishield` loggers a JSON
    handler on stderr only if no handler would receive their records (neither `apishield`
    nor any ancestor has one, as under uvicorn, which configures its own loggers but not
    the root). A host that configured logging keeps it: records propagate to its handlers,
    in its format (it may set `JsonFormatter` on them). Returns whether one was added."""
    logger = logging.getLogger("apishield")
    if logger.hasHandlers():
        return False
    logger.addHandler(handler())
    if logger.level == logging.NOTSET:
        logger.setLevel(level)  # else the root's WARNING drops lifecycle and successes
    return True

