"""How much a client may do: rate limits, quotas, concurrency caps, IP lists and bans.

One module because these share names and keys: limits and quotas label the RateLimit
headers and the state-store keys by name (so names are unique across both), and ban
rules count the events other limits produce. Read by the rate-limit, concurrency and
IP-filter steps and by `apishield.abuse`; `IpLists` is also the per-operation override
in `OperationPolicy`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from apishield.config.errors import at
from apishield.config.units import Cidrs, Model, Rate, Seconds, parse_duration

LimitKey = Literal["ip", "identity", "operation"]


class RateLimit(Model):
    """One rate limit (checklist D1, D2): a sustained rate and a burst, per key.

    GCRA (the algorithm of redis-cell and of Stripe's limiter): one timestamp per key, so
    it is exact, O(1) and has no window-boundary doubling (docs/rate-limiting.md)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    key: tuple[LimitKey, ...] = ("ip",)  # combined: [identity, operation]
    rate: Rate
    burst: int | None = Field(default=None, ge=1)  # requests at once; default: rate's count
    operations: tuple[str, ...] = ()  # operationIds; () = every operation
    roles: tuple[str, ...] = ()  # only for callers holding one of these roles (plans)
    pre_auth: bool = False  # before authentication (login, token endpoints); key must be [ip]

    @model_validator(mode="after")
    def _check(self) -> RateLimit:
        if not self.key or len(set(self.key)) != len(self.key):
            raise at("key", "list one or more of ip, identity, operation, each once")
        if self.pre_auth and (set(self.key) - {"ip", "operation"} or self.roles):
            raise at("pre_auth", "a limit that runs before authentication knows no identity "
                     "or role: key it by ip (and operation) only")
        return self


class Quota(Model):
    """A long-period allowance (D2): per calendar day or month (UTC), counted on admitted
    requests only."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    key: tuple[LimitKey, ...] = ("identity",)
    limit: int = Field(ge=1)
    period: Literal["day", "month"] = "day"
    operations: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()


class Concurrency(Model):
    """In-flight caps (D4, B4): 0 = off."""

    max_in_flight: int = Field(default=0, ge=0)  # whole gateway
    per_identity: int = Field(default=0, ge=0)  # per caller (identity, else client IP)
    queue_timeout: Annotated[float, BeforeValidator(parse_duration), Field(ge=0)] = 0.0


class IpLists(Model):
    """Static CIDR lists (D5). `allow` non-empty: only those may call."""

    allow: Cidrs = ()
    deny: Cidrs = ()


BanEvent = Literal["authn-failure", "authz-denied", "validation", "not-found",
                   "rate-limited", "injection"]


class BanRule(Model):
    """Ban a source after `threshold` events in `window` (A9, D5): escalates for repeat
    offenders, visible and liftable with `apishield bans`."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    on: tuple[BanEvent, ...]
    by: Literal["ip", "subject"] = "ip"  # subject: one account, across IPs
    threshold: int = Field(ge=1)
    window: Seconds
    duration: Seconds
    escalation: float = Field(default=2.0, ge=1.0)  # each repeat multiplies the duration
    max_duration: Seconds = 86400.0

    @field_validator("on", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value


class Bans(Model):
    rules: tuple[BanRule, ...] = ()


class RateLimiting(Model):
    """Everything that limits how much a client may do (checklist D1-D6, A9)."""

    limits: tuple[RateLimit, ...] = ()
    quotas: tuple[Quota, ...] = ()
    headers: bool = True  # RateLimit-Policy / RateLimit on allowed responses too
    concurrency: Concurrency = Concurrency()
    ip: IpLists = IpLists()
    bans: Bans = Bans()
    on_store_error: Literal["deny", "allow"] = "deny"
    # distributed mode: share of a limit one gateway may lease from Redis at a time
    lease_fraction: float = Field(default=0.02, gt=0, le=0.5)

    @model_validator(mode="after")
    def _unique_names(self) -> RateLimiting:
        names = [item.name for item in self.limits] + [item.name for item in self.quotas]
        for name in names:
            if names.count(name) > 1:
                raise at("limits", f"the name {name!r} is used twice; names label the "
                         "RateLimit headers and the state keys")
        rules = [rule.name for rule in self.bans.rules]
        for name in rules:
            if rules.count(name) > 1:
                raise at("bans.rules", f"the rule name {name!r} is used twice")
        return self
