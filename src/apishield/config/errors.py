"""How configuration problems are reported: `ConfigError`, `at()` and the pydantic adapter.

Kept apart from every model because every model raises through it and so do readers far
from config/ (the contract loader, the key and ban stores, TLS context building): one
format, `location: message`, for all of them, so `apishield check` can list every problem
at once and `serve` can refuse to start with the same lines. It imports no other config
module, so any of them can import it without a cycle.
"""

from __future__ import annotations

from pydantic import ValidationError


class ConfigError(Exception):
    """One or more configuration problems, each `location: message`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_AT = "\x00"


def at(key: str, message: str) -> ValueError:
    """A model validator's error located at one of the model's keys (`tls.client_ca: ...`)
    instead of at the model itself; `format_validation_error` moves it there."""
    return ValueError(f"{_AT}{key}{_AT}{message}")


def format_validation_error(error: ValidationError, prefix: str = "") -> list[str]:
    """pydantic errors -> `dotted.location: message` lines."""
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"])
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = f'unknown key "{item["loc"][-1]}"'
            loc = ".".join(str(part) for part in item["loc"][:-1])
        elif item["type"] == "missing":
            message = "required key is missing"
        message = message.removeprefix("Value error, ")
        if message.startswith(_AT):  # located further by the validator (see `at`)
            _, key, message = message.split(_AT, 2)
            loc = f"{loc}.{key}" if loc else key
        where = f"{prefix}{loc}" if loc else prefix.rstrip(".:") or "(top level)"
        lines.append(f"{where}: {message}")
    return lines
