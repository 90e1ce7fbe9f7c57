"""How bytes reach the gateway and leave it: listener, TLS, upstream hop, size and time limits.

One module because these keys are read together by the transport layer (`apishield.http`
and the gateway front end) before any pipeline step sees a request, and because they
check one another: an upstream `tls` block needs an https:// URL, a client CA needs
`client_cert`, and the body limit here is the ceiling a per-operation override lowers.
Each validator refuses a setting that would silently do nothing, so a user who believes
a hop is encrypted or a limit is on is told otherwise at `apishield check`.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from apishield.config.errors import at
from apishield.config.units import Bytes, Model, Seconds


class Listen(Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)


class UpstreamTls(Model):
    """How the gateway talks TLS to an `https://` upstream (checklist C1 on the inside too).

    Verification is on unless `verify: false` is written; `apishield check` warns then."""

    verify: bool = True
    ca: str | None = None  # PEM bundle; replaces the system store (a private CA is pinned)
    cert: str | None = None  # client certificate (PEM, may also hold the key)
    key: str | None = None

    @model_validator(mode="after")
    def _check(self) -> UpstreamTls:
        if self.key is not None and self.cert is None:
            raise at("key", "is set but cert is not: a client key needs its certificate")
        if self.ca is not None and not self.verify:
            raise at("ca", "is set with verify: false, so it would never be used")
        return self


class Upstream(Model):
    url: str
    connect_timeout: Seconds = 5.0
    read_timeout: Seconds = 30.0
    max_connections: int = Field(default=256, ge=1)
    # busy pool connections one client IP may hold at once (default: a quarter of the
    # pool): a client that stops reading cannot take the pool from everyone else
    max_connections_per_client: int | None = Field(default=None, ge=1)
    host_header: Literal["upstream", "client"] = "upstream"
    tls: UpstreamTls = UpstreamTls()

    @model_validator(mode="after")
    def _check_tls(self) -> Upstream:
        if "tls" in self.model_fields_set and urlsplit(self.url).scheme != "https":
            # Settings that would silently do nothing are an error (a typo must not turn
            # a control off): the user believes the upstream hop is encrypted.
            raise at("tls", "is set but upstream.url is not https://, so it would do nothing")
        return self

    @property
    def client_share(self) -> int:
        if self.max_connections_per_client is not None:
            return self.max_connections_per_client
        return max(1, self.max_connections // 4)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"{value!r} must start with http:// or https://")
        if not parts.hostname:
            raise ValueError(f"{value!r} has no host; write e.g. http://127.0.0.1:9000")
        if parts.query or parts.fragment:
            raise ValueError(f"{value!r} must not carry a query or fragment")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"{value!r} has an invalid port") from exc
        return value


class PlainHttp(Model):
    """A plain-HTTP listener beside the TLS one: it redirects or refuses, never forwards."""

    port: int = Field(ge=1, le=65535)
    mode: Literal["redirect", "refuse"] = "redirect"
    # The port written in the redirect's Location, when a NAT or load balancer publishes
    # the TLS listener on another port than the one it binds (default: the bound port).
    redirect_port: int | None = Field(default=None, ge=1, le=65535)


class Tls(Model):
    """TLS termination (checklist C1, C2). Paths are relative to the config file.

    The key's passphrase is read from an environment variable or a file, never written
    inline (C4): a config file is copied, diffed and pasted into tickets."""

    cert: str  # PEM: the leaf first, then intermediates
    key: str
    passphrase_env: str | None = None
    passphrase_file: str | None = None
    profile: Literal["intermediate", "modern"] = "intermediate"
    client_ca: str | None = None
    client_cert: Literal["none", "optional", "required"] = "none"
    plain_http: PlainHttp | None = None

    @model_validator(mode="after")
    def _check(self) -> Tls:
        if self.passphrase_env is not None and self.passphrase_file is not None:
            raise at("passphrase_file", "set passphrase_env or passphrase_file, not both")
        if self.client_cert != "none" and self.client_ca is None:
            raise at("client_ca", f"required by client_cert: {self.client_cert} (the CA "
                     "bundle client certificates are verified against)")
        if self.client_ca is not None and self.client_cert == "none":
            raise at("client_cert", "is none, so client_ca would never be used; set "
                     "client_cert: optional or required")
        return self


class Limits(Model):
    max_body_bytes: Bytes = 1024 * 1024
    max_header_bytes: Bytes = 16 * 1024
    max_header_count: int = Field(default=100, ge=1)
    max_url_length: int = Field(default=4096, ge=16)


class OperationLimits(Model):
    """Per-operation overrides (global limits apply where unset)."""

    max_body_bytes: Bytes | None = None


class Timeouts(Model):
    header: Seconds = 10.0  # complete request head within (slowloris defence, D3)
    body: Seconds = 30.0  # complete request body within
    # slow-client floor (D3): after `body_rate_grace`, a body arriving slower than this
    # many bytes a second is cut with 408 (a trickle holds a connection for `body` else)
    min_body_rate: Bytes = 256
    body_rate_grace: Seconds = 5.0
    keepalive: Seconds = 5.0  # idle keep-alive connection closed after
    write: Seconds = 30.0  # a client that reads none of a response for this long is cut
    shutdown: Seconds = 10.0  # in-flight requests get this long on SIGTERM
