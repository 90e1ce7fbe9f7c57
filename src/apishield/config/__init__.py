"""`apishield.yaml` -> frozen, validated models: the configuration layer's one public face.

The rule: a feature's configuration model lives in config/, one module per feature; the
step that reads it imports it from `apishield.config`. Models stay in this lowest layer
(not beside their steps) because they nest into one `Config` that `apishield check`
validates whole, before any step is built, and because several layers read the same
model (`Issuer` by auth/, `IpLists` by a step and by `OperationPolicy`). Readers import
from this facade, never from the modules below, so a model can move between them without
touching a reader.

- `errors`: `ConfigError`, `at()`, pydantic errors -> `location: message` lines
- `units`: the `Model` base (unknown keys refused, frozen) and durations, sizes, rates, CIDRs
- `transport`: listener, TLS, upstream hop, size limits, timeouts
- `validation`: request validation bounds, payload detection
- `responses`: security headers, CORS, response filtering
- `observe`: access log
- `admin`: the admin listener and metrics
- `usage`: usage counts per identity and operation, persisted (F4)
- `reload`: live reload (file watch)
- `auth`: issuers, secrets, API keys, roles, per-operation `require` and `owner`
- `rate_limiting`: rate limits, quotas, concurrency, IP lists, bans
- `root`: `Config` (the whole file) and `OperationPolicy` (the per-operation override)
- `loading`: YAML file -> `Config`, every problem reported at once
- `redis_urls`: the `state:` URLs that name Redis

Inside the package a module imports only the ones listed above it (`root` and `loading`
gather the rest), never this facade: no import cycle.
"""

from __future__ import annotations

from apishield.config.admin import Admin, Metrics, is_loopback
from apishield.config.alerts import Alerts, GeoIp, Rule, Webhook
from apishield.config.auth import (
    ApiKeys,
    Argon2,
    Auth,
    Basic,
    Introspection,
    Issuer,
    Jwks,
    Owner,
    Require,
    Scheme,
    Secret,
)
from apishield.config.errors import ConfigError, at, format_validation_error
from apishield.config.loading import config_from_dict, load_config, read_yaml
from apishield.config.observe import AccessLog, AuditLog, Redact
from apishield.config.rate_limiting import (
    BanEvent,
    BanRule,
    Bans,
    Concurrency,
    IpLists,
    LimitKey,
    Quota,
    RateLimit,
    RateLimiting,
)
from apishield.config.reload import Reload
from apishield.config.responses import Cors, ResponseMode, Responses, SecurityHeaders
from apishield.config.root import Config, OperationPolicy
from apishield.config.transport import (
    Limits,
    Listen,
    OperationLimits,
    PlainHttp,
    Timeouts,
    Tls,
    Upstream,
    UpstreamTls,
)
from apishield.config.units import (
    Bytes,
    Cidrs,
    Leeway,
    Model,
    Rate,
    Seconds,
    parse_duration,
    parse_rate,
    parse_size,
)
from apishield.config.usage import Usage
from apishield.config.validation import Injection, Validation

# The old single module's private name, still imported by cli/keys.py (`--expires-in`).
_parse_duration = parse_duration

__all__ = [
    "AccessLog",
    "Admin",
    "Alerts",
    "ApiKeys",
    "Argon2",
    "AuditLog",
    "Auth",
    "BanEvent",
    "BanRule",
    "Bans",
    "Basic",
    "Bytes",
    "Cidrs",
    "Concurrency",
    "Config",
    "ConfigError",
    "Cors",
    "GeoIp",
    "Injection",
    "Introspection",
    "IpLists",
    "Issuer",
    "Jwks",
    "Leeway",
    "LimitKey",
    "Limits",
    "Listen",
    "Metrics",
    "Model",
    "OperationLimits",
    "OperationPolicy",
    "Owner",
    "PlainHttp",
    "Quota",
    "Rate",
    "RateLimit",
    "RateLimiting",
    "Redact",
    "Reload",
    "Require",
    "ResponseMode",
    "Responses",
    "Rule",
    "Scheme",
    "Seconds",
    "Secret",
    "SecurityHeaders",
    "Timeouts",
    "Tls",
    "Upstream",
    "UpstreamTls",
    "Usage",
    "Validation",
    "Webhook",
    "at",
    "config_from_dict",
    "format_validation_error",
    "is_loopback",
    "load_config",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "read_yaml",
]
