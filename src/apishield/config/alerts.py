"""Alert rules and where alerts go (`alerts:`, checklist F3; docs/alerts.md).

One `Rule` model for every kind rather than one model per kind: the file reads the same
for every rule (`name`, `kind`, `window`, `threshold`, `cooldown`, `notify`), and a key
that does not apply to a rule's kind is refused here with the kinds it applies to, which
a union of models would report as a wall of "extra key" errors, one per candidate model.
Cross-references (a `notify` name that is no webhook, a `country` rule without `geoip`)
are checked by `Alerts`, located at the rule's key. The GeoIP database is opened when
the pipeline is built (observe/geoip.py): a file that is missing or unreadable is a
ConfigError there, reported by `apishield check` like any other.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from apishield.config.auth import Secret
from apishield.config.errors import at
from apishield.config.units import Model, Rate, Seconds

RuleKind = Literal["failed-auth-burst", "ban", "refusal-spike", "error-ratio",
                   "identity-baseline", "country"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_COUNTRY = re.compile(r"^[A-Z]{2}$")
_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
# headers whose values are credentials: only from `secret_headers` (C4), never in the file
_CREDENTIAL_HEADERS = re.compile(r"(?i)^(authorization|proxy-authorization|cookie|"
                                 r".*(token|secret|api-?key|password|signature).*)$")

# The keys only some kinds read, and which: anything else set on a rule is refused.
_ONLY_FOR: dict[str, tuple[str, ...]] = {
    "by": ("failed-auth-burst",),
    "reason": ("refusal-spike",),
    "min_requests": ("error-ratio", "identity-baseline"),
    "factor": ("identity-baseline",),
    "allow": ("country",),
    "operations": ("country",),
    "identities": ("country",),
}
# What `threshold` means per kind when it is not written (None: the kind has none).
DEFAULT_THRESHOLDS: dict[str, float | None] = {
    "failed-auth-burst": 20, "ban": None, "refusal-spike": 100, "error-ratio": 0.05,
    "identity-baseline": None, "country": None,
}


class Webhook(Model):
    """One destination. `url` in the file, or `url_secret` from an environment variable
    or a file when the URL itself is a credential (Slack's incoming-webhook URLs are).
    `secret_headers`: header values read the same way (e.g. an `Authorization` token)."""

    url: str | None = None
    url_secret: Secret | None = None
    format: Literal["json", "slack"] = "json"
    headers: dict[str, str] = {}
    secret_headers: dict[str, Secret] = {}
    timeout: Seconds = 5.0  # per attempt: connect + answer
    retries: int = Field(default=3, ge=0, le=10)  # attempts after the first
    backoff: Seconds = 0.5  # first retry delay; doubled each time, with full jitter
    max_backoff: Seconds = 30.0

    @model_validator(mode="after")
    def _one_url(self) -> Webhook:
        if (self.url is None) == (self.url_secret is None):
            raise ValueError("give exactly one of `url` or `url_secret` ({env: NAME} or "
                             "{file: path}, for a URL that is itself a secret)")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise at("url", "must be an http:// or https:// URL")
        for name in (*self.headers, *self.secret_headers):
            if not _HEADER.match(name):
                raise at("headers", f"{name!r} is not a header name")
        for name in self.headers:
            if _CREDENTIAL_HEADERS.match(name):
                raise at(f"headers.{name}", "holds a credential: move it to `secret_headers` "
                         "({env: NAME} or {file: path}); a config file must not hold secrets")
        return self


class GeoIp(Model):
    """A MaxMind-format country database the user provides (GeoLite2-Country.mmdb,
    GeoIP2-Country.mmdb or any database whose records have `country.iso_code`), relative
    to the config file."""

    database: str


class Rule(Model):
    name: str
    kind: RuleKind
    window: Seconds = 60.0  # counting window (sliding, see docs/alerts.md)
    threshold: float | None = Field(default=None, gt=0)  # per kind; DEFAULT_THRESHOLDS
    cooldown: Seconds = 600.0  # one alert per (rule, key) per cooldown
    notify: tuple[str, ...] = ()  # webhook names; none: logged, counted, on the dashboard
    rate_limit: Rate = (10, 60.0)  # alerts of this rule delivered at most (others: logged)
    severity: Literal["info", "warning", "critical"] = "warning"
    by: Literal["ip", "account"] = "ip"
    reason: str | None = None  # a reason code or a glob (`jwt-*`); none: every refusal
    min_requests: int | None = Field(default=None, ge=1)
    factor: float | None = Field(default=None, gt=1)
    allow: tuple[str, ...] = ()
    operations: tuple[str, ...] = ()
    identities: tuple[str, ...] = ()

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r}: write letters, digits, '.', '_' or '-' (at most 64)")
        return value

    @field_validator("allow")
    @classmethod
    def _check_countries(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for code in value:
            if not _COUNTRY.match(code):
                raise ValueError(f"{code!r} is not an ISO 3166-1 alpha-2 country code "
                                 "(two capital letters, e.g. FR)")
        return value

    @model_validator(mode="after")
    def _check_kind(self) -> Rule:
        for key, kinds in _ONLY_FOR.items():
            if key in self.model_fields_set and self.kind not in kinds:
                raise at(key, f"does not apply to a {self.kind} rule (only to "
                         f"{', '.join(kinds)})")
        if self.kind == "error-ratio" and self.threshold is not None and self.threshold >= 1:
            raise at("threshold", "is the share of 5xx answers, between 0 and 1 "
                     "(e.g. 0.05 for 5%)")
        if self.kind in ("ban", "identity-baseline", "country") \
                and self.threshold is not None:
            what = {"ban": "every new ban fires", "country": "every request from outside "
                    "`allow` fires", "identity-baseline": "write `factor` instead"}
            raise at("threshold", f"does not apply to a {self.kind} rule ({what[self.kind]})")
        if self.kind == "country" and not self.allow:
            raise at("allow", "a country rule needs the allowed countries, e.g. [FR, DE]")
        return self

    @property
    def limit(self) -> float:
        """The threshold in force: the one written, else the kind's default."""
        value = self.threshold if self.threshold is not None else DEFAULT_THRESHOLDS[self.kind]
        return value if value is not None else 1.0


class Alerts(Model):
    webhooks: dict[str, Webhook] = {}
    geoip: GeoIp | None = None
    rules: tuple[Rule, ...] = ()
    queue_size: int = Field(default=1000, ge=1, le=100_000)  # per webhook; full: dropped
    max_keys: int = Field(default=10_000, ge=10, le=1_000_000)  # per rule; coldest evicted

    @field_validator("webhooks")
    @classmethod
    def _check_webhook_names(cls, value: dict[str, Webhook]) -> dict[str, Webhook]:
        for name in value:
            if not _NAME.match(name):
                raise ValueError(f"{name!r}: a webhook name is letters, digits, '.', '_' "
                                 "or '-'")
        return value

    @model_validator(mode="after")
    def _check_references(self) -> Alerts:
        seen: set[str] = set()
        for index, rule in enumerate(self.rules):
            if rule.name in seen:
                raise at(f"rules.{index}.name", f"{rule.name!r} is used by another rule; "
                         "rule names must be unique (they label alerts and metrics)")
            seen.add(rule.name)
            for name in rule.notify:
                if name not in self.webhooks:
                    known = ", ".join(sorted(self.webhooks)) or "none is configured"
                    raise at(f"rules.{index}.notify", f"{name!r} is not a webhook under "
                             f"alerts.webhooks ({known})")
            if rule.kind == "country" and self.geoip is None:
                raise at(f"rules.{index}.kind", "a country rule needs alerts.geoip.database "
                         "(a MaxMind-format country database)")
        return self
