"""The admin listener (`admin:`) and metrics (`metrics:`): how an operator watches and
drives a running apishield.

Off unless configured: an admin API is an attack surface. Bound to a loopback address it
answers anyone who can reach the host's loopback; on any other address it requires a
bearer token read from an environment variable or a file (checklist C4: the config file
names where the secret is, never the secret itself), checked at load time so a gateway
never starts with an open admin API on the network.
"""

from __future__ import annotations

import ipaddress

from pydantic import Field, field_validator, model_validator

from apishield.config.units import Model


def is_loopback(host: str) -> bool:
    """Whether only this host can reach `host` (a name could resolve anywhere; "" and
    0.0.0.0 mean every address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Admin(Model):
    host: str = "127.0.0.1"
    port: int = Field(default=9901, ge=0, le=65535)
    token_env: str | None = None  # the variable holding the bearer token
    token_file: str | None = None  # a file holding it (relative to the config file)
    # The ASGI middleware has no listener of its own: it answers the admin API under this
    # path of the app it wraps (with the token when one is set, else to loopback clients).
    path: str = "/_apishield"

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        value = value.rstrip("/")
        if not value.startswith("/"):
            raise ValueError(f"{value!r} must start with '/' (e.g. /_apishield)")
        return value

    @model_validator(mode="after")
    def _token_off_loopback(self) -> Admin:
        if self.token_env is not None and self.token_file is not None:
            raise ValueError("give one of token_env or token_file, not both")
        if not self.protected and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host or '(all addresses)'!s} is reachable from other hosts, so "
                "the admin API needs a bearer token: set token_env (an environment "
                "variable's name) or token_file, or listen on 127.0.0.1")
        return self

    @property
    def protected(self) -> bool:
        return self.token_env is not None or self.token_file is not None


class Metrics(Model):
    """Counting for `/metrics` (on by default: a few dict increments per request, measured
    in bench/RESULTS.md; off saves them when nothing scrapes)."""

    enabled: bool = True
