"""The two roots of the model tree: `Config` (the whole file) and `OperationPolicy`.

They live apart from the feature modules because they are the only models that gather
every feature: `Config` nests one block per feature module and checks what spans blocks
(the plain-HTTP port against the listener's, the `state:` URL), and `OperationPolicy` is
the per-operation override (`x-apishield`, `operations.<operationId>`) that reaches into
several features at once. Feature modules never import this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from apishield.config.admin import Admin, Metrics
from apishield.config.alerts import Alerts
from apishield.config.auth import Auth, Owner, Require, Secret
from apishield.config.errors import at
from apishield.config.observe import AccessLog, AuditLog, Redact
from apishield.config.rate_limiting import IpLists, RateLimiting
from apishield.config.reload import Reload
from apishield.config.responses import Cors, ResponseMode, Responses, SecurityHeaders
from apishield.config.transport import Limits, Listen, OperationLimits, Timeouts, Tls, Upstream
from apishield.config.units import Cidrs, Model
from apishield.config.usage import Usage
from apishield.config.validation import Validation


class OperationPolicy(Model):
    """What `x-apishield` on an operation (or `operations.<operationId>`) may say."""

    limits: OperationLimits | None = None
    public: bool | None = None
    strict: bool | None = None  # overrides validation.strict for this operation
    mode: Literal["enforce", "log-only"] | None = None  # overrides the global mode
    injection: bool | None = None  # False: no payload detection for this operation
    responses: ResponseMode | None = None  # overrides responses.mode for this operation
    require: Require | None = None
    owner: Owner | None = None
    ip: IpLists | None = None  # for this operation, on top of rate_limiting.ip
    # a login operation: the upstream's 401/403 here is a security event (a wrong
    # password); None = guessed (public and answered 401), docs/logging.md
    login: bool | None = None


class Config(Model):
    contract: str
    base_path: str = ""
    listen: Listen = Listen()
    tls: Tls | None = None  # gateway only; ignored by the middleware
    upstream: Upstream | None = None
    limits: Limits = Limits()
    timeouts: Timeouts = Timeouts()
    headers: SecurityHeaders = SecurityHeaders()
    trusted_proxies: Cidrs = ()
    access_log: AccessLog = AccessLog()
    audit_log: AuditLog = AuditLog()  # the tamper-evident trail (docs/audit-trail.md)
    admin: Admin | None = None  # off unless configured
    metrics: Metrics = Metrics()
    usage: Usage = Usage()  # usage per identity and operation, persisted (F4)
    redact: Redact = Redact()  # more names whose values never reach a log (F6)
    alerts: Alerts = Alerts()  # rules over security events and outcomes, webhooks (F3)
    mode: Literal["enforce", "log-only"] = "enforce"
    cors: Cors | None = None
    validation: Validation = Validation()
    responses: Responses = Responses()
    websockets: bool = False
    operations: dict[str, OperationPolicy] = {}
    auth: Auth = Auth()
    rate_limiting: RateLimiting = RateLimiting()
    reload: Reload = Reload()  # gateway only: watch the files (SIGHUP always reloads)
    # where shared state lives: a path = the embedded SQLite file (API keys, bans; counters
    # in memory), relative to the config file; redis:// or rediss:// = a Redis server
    # shared by every gateway instance (counters, bans, API keys); redis+sentinel://
    # host:26379,.../<service>[/<db>] = its master through Sentinel; redis+cluster://
    # host:port,.../ = a Redis Cluster (rediss+... for TLS; config/redis_urls.py)
    state: str = "apishield-state.db"
    # the Redis password, read from an environment variable or a file (C4: never written
    # in the config file); put into the `state` URL when apishield connects
    state_password: Secret | None = None
    # Set by the loader, not by users: the folder relative paths are resolved against.
    source_dir: str = Field(default=".", exclude=True)

    @field_validator("state")
    @classmethod
    def _check_state(cls, value: str) -> str:
        """A URL (anything with `://`) must be a usable Redis URL; the message never
        holds the password."""
        if "://" in value:
            from apishield.config.redis_urls import StateUrlError, parse_state_url

            try:
                parse_state_url(value)
            except StateUrlError as exc:
                # not chained: pydantic would show the input (with its password)
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _check_state_password(self) -> Config:
        if self.state_password is None:
            return self
        if "://" not in self.state:
            raise at("state_password", "only applies to a Redis `state` URL; the embedded "
                     "SQLite file has no password")
        from apishield.config.redis_urls import StateUrlError, with_password

        try:
            with_password(self.state, "checked")
        except StateUrlError as exc:
            raise at("state", str(exc)) from None
        return self

    @field_validator("base_path")
    @classmethod
    def _check_base_path(cls, value: str) -> str:
        value = value.rstrip("/")
        if value and not value.startswith("/"):
            raise ValueError(f"{value!r} must start with '/'")
        return value

    @model_validator(mode="after")
    def _check_ports(self) -> Config:
        if self.tls is not None and self.tls.plain_http is not None:
            if self.listen.port and self.tls.plain_http.port == self.listen.port:
                raise at("tls.plain_http.port", "must differ from listen.port")
        return self

    @property
    def contract_path(self) -> Path:
        return (Path(self.source_dir) / self.contract).resolve()

    def resolve(self, path: str) -> Path:
        """A path from the config file, relative to the file's folder."""
        return (Path(self.source_dir) / path).resolve()
