"""What the gateway adds to and does with responses: security headers, CORS, filtering.

Grouped because each of these shapes what a client (often a browser) gets back rather
than what it may send, and each is read by a step of the response phase. The CORS
validators refuse the combinations the Fetch standard makes unsafe (`*` with
credentials) at load time instead of leaving them to the step.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from apishield.config.errors import at
from apishield.config.units import Bytes, Model


class SecurityHeaders(Model):
    hsts: Literal["auto", "always", "off"] = "auto"  # auto: only over TLS (RFC 6797 7.2)
    hsts_max_age: int = Field(default=31536000, ge=0)
    hsts_include_subdomains: bool = False
    content_security_policy: str | None = "default-src 'none'; frame-ancestors 'none'"
    referrer_policy: str | None = "no-referrer"
    cache_control: str | None = "no-store"
    x_content_type_options: bool = True
    remove: tuple[str, ...] = ("server", "x-powered-by")


_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\*$")


class Cors(Model):
    """A strict CORS allow-list (checklist C3); the gateway answers preflights itself."""

    allow_origins: tuple[str, ...]
    allow_methods: tuple[str, ...] = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
    allow_headers: tuple[str, ...] = ("content-type", "authorization")
    expose_headers: tuple[str, ...] = ("x-request-id",)
    allow_credentials: bool = False
    max_age: int = Field(default=600, ge=0, le=86400)

    @field_validator("allow_origins")
    @classmethod
    def _check_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            if not _ORIGIN.match(origin):
                raise ValueError(f"{origin!r} is not an origin; write e.g. "
                                 "https://app.example.com or https://app.example.com:8443")
        return value

    @model_validator(mode="after")
    def _no_wildcard_with_credentials(self) -> Cors:
        if self.allow_credentials and "*" in self.allow_origins:
            # Fetch spec: `*` is never honoured with credentials; a reflected origin would
            # let every site read authenticated responses.
            raise ValueError("allow_origins '*' cannot be combined with allow_credentials; "
                             "list the origins")
        return self


ResponseMode = Literal["filter", "validate", "off"]


class Responses(Model):
    """What the gateway does to upstream responses (checklist E3)."""

    mask_errors: bool = True  # replace 5xx bodies with a problem; log them redacted
    # filter: drop undeclared and writeOnly properties from JSON responses; validate: a
    # response that breaks its schema (or an undeclared status) becomes a 502; off: untouched
    mode: ResponseMode = "filter"
    # where docs/problems.md is published: refusals carry `docs: <this>#<type slug>`.
    # None (the default): no link, as apishield has no published site of its own to
    # point at, and a link to a host the operator does not control would send clients
    # to a page neither party controls
    problem_docs: str | None = None

    @field_validator("problem_docs")
    @classmethod
    def _check_problem_docs(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^\s#?\"\\]+$", value):
            raise ValueError(f"{value!r} is not a base URL; write the address of the page "
                             "that publishes docs/problems.md, e.g. "
                             "https://docs.example.com/problems (no `#`, no query)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _renamed_filter(cls, data: Any) -> Any:
        """`filter: true|false` became `mode`; say so instead of "unknown key"."""
        if isinstance(data, dict) and "filter" in data:
            raise at("filter", "was replaced by `mode: filter | validate | off` "
                     "(`filter: false` is `mode: off`)")
        return data
    max_filter_bytes: Bytes = 8 * 1024 * 1024  # a larger response to filter is a 502
    # large responses held whole to be filtered, all connections together: past it 503
    max_buffered_bytes: Bytes = 64 * 1024 * 1024
