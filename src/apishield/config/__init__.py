"""`apishield.yaml` -> frozen, validated models.

Every model forbids unknown keys (a typo must not silently turn a control off) and every
problem is reported with its location, all at once (`ConfigError.problems`), so `apishield
check` can list them and `serve` can refuse to start with the same messages.
"""

from __future__ import annotations

import gc
import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

try:  # libyaml's parser (the constructor stays Python); PyYAML wheels ship it
    from yaml import CSafeLoader as YamlLoader
except ImportError:  # pragma: no cover - pure-Python fallback
    from yaml import SafeLoader as YamlLoader  # type: ignore[assignment]


class ConfigError(Exception):
    """One or more configuration problems, each `location: message`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2,
    "gb": 1000**3, "gib": 1024**3,
}
_DURATION_UNITS = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _parse_duration(value: Any) -> Any:
    """Seconds as a number, or a string such as `500ms`, `10s`, `2m`."""
    if isinstance(value, bool):  # YAML `yes`/`true` is not one second
        raise ValueError(f"{value!r} is not a duration; write e.g. 10, 10s, 500ms, 2m or 90d")
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a duration; write e.g. 10, 10s, 500ms, 2m or 90d")
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    return value


def _parse_size(value: Any) -> Any:
    """Bytes as an integer, or a string such as `64KiB`, `1MB`."""
    if isinstance(value, bool):  # YAML `true` is not one byte
        raise ValueError(f"{value!r} is not a size; write e.g. 1048576, 64KiB or 1MB")
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a size; write e.g. 1048576, 64KiB or 1MB")
        unit = match.group(2).lower() if match.group(2) else None
        return int(match.group(1)) * _SIZE_UNITS[unit]
    return value


def at(key: str, message: str) -> ValueError:
    """A model validator's error located at one of the model's keys (`tls.client_ca: ...`)
    instead of at the model itself; `format_validation_error` moves it there."""
    return ValueError(f"{_AT}{key}{_AT}{message}")


_AT = "\x00"

Seconds = Annotated[float, BeforeValidator(_parse_duration), Field(gt=0)]
def _check_cidrs(value: tuple[str, ...]) -> tuple[str, ...]:
    for cidr in value:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError as exc:
            raise ValueError(f"{cidr!r} is not an IP address or CIDR network") from exc
    return value


Cidrs = Annotated[tuple[str, ...], AfterValidator(_check_cidrs)]  # IPv4/IPv6 addresses, CIDRs
Leeway = Annotated[float, BeforeValidator(_parse_duration), Field(ge=0, le=600)]
Bytes = Annotated[int, BeforeValidator(_parse_size), Field(ge=0)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class Injection(Model):
    """Payload detection in unconstrained request strings (checklist B6)."""

    sql: bool = True
    xss: bool = True
    shell: bool = True


class Validation(Model):
    """Request validation against the contract (checklist B1, B2, B4, B6)."""

    strict: bool = True  # unknown query parameters and body properties are refused
    max_string_length: int = Field(default=8192, ge=1)  # for strings without maxLength
    max_array_items: int = Field(default=1000, ge=1)  # for arrays without maxItems
    max_json_depth: int = Field(default=32, ge=1)
    max_json_keys: int = Field(default=10000, ge=1)  # object keys in one body, all levels
    max_errors: int = Field(default=10, ge=1)  # listed in a refusal
    max_parts: int = Field(default=100, ge=1)  # parts in one multipart/form-data body
    max_file_bytes: Bytes = 10 * 1024 * 1024  # one multipart part; the body limit still holds
    injection: Injection = Injection()


ResponseMode = Literal["filter", "validate", "off"]


class Responses(Model):
    """What the gateway does to upstream responses (checklist E3)."""

    mask_errors: bool = True  # replace 5xx bodies with a problem; log them redacted
    # filter: drop undeclared and writeOnly properties from JSON responses; validate: a
    # response that breaks its schema (or an undeclared status) becomes a 502; off: untouched
    mode: ResponseMode = "filter"

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


class AccessLog(Model):
    enabled: bool = True
    path: str = "-"  # "-" = standard output



_SIGNING_ALGORITHMS = frozenset({
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA", "HS256", "HS384", "HS512",
})


class Secret(Model):
    """Where a secret is read from: an environment variable or a file, never the value
    itself (C4: config files are copied, diffed and pasted into tickets)."""

    env: str | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Secret:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of `env` (a variable name) or `file` (a path)")
        return self


class Jwks(Model):
    """How an issuer's signing keys are kept fresh (A1: rotation without restart)."""

    refresh_min: Seconds = 300.0  # never refetch on schedule sooner, whatever Cache-Control says
    refresh_max: Seconds = 86400.0  # refetch at least this often
    unknown_kid_cooldown: Seconds = 30.0  # junk kids cannot make the gateway hammer the issuer
    max_stale: Seconds = 86400.0  # serve the last good keys this long while the issuer is down
    fetch_timeout: Seconds = 5.0


class Introspection(Model):
    """RFC 7662 token introspection for opaque tokens (A2)."""

    url: str
    client_id: str
    client_secret: Secret
    cache_ttl: Seconds = 300.0  # ceiling; never past the token's own `exp`
    timeout: Seconds = 5.0

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname:
            raise ValueError(f"{value!r} must be an http:// or https:// URL")
        return value


class Issuer(Model):
    """A token issuer: how its JWTs are verified (A1, A3) or its opaque tokens introspected
    (A2), and where scopes and roles are found in its claims."""

    issuer: str  # the exact `iss` value
    schemes: tuple[str, ...] = ()  # securitySchemes it serves; () = every bearer/oauth2/OIDC one
    audiences: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = ()
    discovery: bool = False  # OIDC discovery from the scheme's openIdConnectUrl or the issuer
    jwks_url: str | None = None
    keys: tuple[str, ...] = ()  # PEM public keys or JWK / JWKS JSON files
    shared_secret: Secret | None = None  # HS* only
    leeway: Leeway = 30.0
    max_lifetime: Seconds | None = 86400.0  # refuse a JWT whose exp - iat is longer (A3)
    required_claims: tuple[str, ...] = ("exp",)
    subject_claim: str = "sub"
    scope_claims: tuple[str, ...] = ("scope", "scp")
    role_claims: tuple[str, ...] = ("roles",)  # dotted paths: realm_access.roles
    jwks: Jwks = Jwks()
    introspection: Introspection | None = None

    @field_validator("algorithms")
    @classmethod
    def _check_algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if name.lower() == "none":
                raise ValueError("`none` is never accepted: an unsigned token proves nothing "
                                 "(RFC 8725 3.1)")
            if name not in _SIGNING_ALGORITHMS:
                raise ValueError(f"{name!r} is not a JWS algorithm apishield verifies; use "
                                 f"one of {', '.join(sorted(_SIGNING_ALGORITHMS))}")
        return value

    @model_validator(mode="after")
    def _check_sources(self) -> Issuer:
        symmetric = [name for name in self.algorithms if name.startswith("HS")]
        asymmetric = [name for name in self.algorithms if not name.startswith("HS")]
        has_public = self.discovery or self.jwks_url is not None or bool(self.keys)
        if self.introspection is None and not self.algorithms:
            raise at("algorithms", "required: list the JWS algorithms this issuer signs with "
                     "(e.g. [RS256]), or configure `introspection` for opaque tokens")
        if symmetric and asymmetric:
            # RS256 -> HS256 key confusion (RFC 8725 2.1): one issuer, one key family
            raise at("algorithms", "mixes HMAC (HS*) and public-key algorithms; an issuer "
                     "uses one family so a public key can never serve as an HMAC secret")
        if self.keys and (self.discovery or self.jwks_url is not None):
            raise at("keys", "static keys and a remote key set (jwks_url or discovery) "
                     "cannot be combined; use one source")
        if symmetric and self.shared_secret is None:
            raise at("shared_secret", f"required by {symmetric[0]}: give it as "
                     "{env: NAME} or {file: path}")
        if symmetric and has_public:
            raise at("algorithms", "HS* with public keys (jwks_url, discovery or keys) "
                     "would let a public key act as an HMAC secret; remove one")
        if self.shared_secret is not None and not symmetric:
            raise at("shared_secret", "is only used with HS256/HS384/HS512 algorithms")
        if asymmetric and not has_public:
            raise at("algorithms", f"{asymmetric[0]} needs public keys: set jwks_url, "
                     "discovery: true, or keys")
        if self.algorithms and not self.audiences:
            raise at("audiences", "required: a token minted for another API must not be "
                     "accepted here (RFC 7519 4.1.3); list this API's audience(s)")
        if self.jwks_url is not None and urlsplit(self.jwks_url).scheme not in ("http", "https"):
            raise at("jwks_url", f"{self.jwks_url!r} must be an http:// or https:// URL")
        return self


class ApiKeys(Model):
    """The API-key lifecycle (A4, G2): keys live in the state store, hashed."""

    pepper: Secret | None = None  # HMAC key for the stored hashes; default: generated file
    cache_ttl: Seconds = 5.0  # longest a verified key is trusted from memory
    default_expires_in: Seconds | None = 90 * 86400.0  # `keys create` without --expires-in


class Auth(Model):
    """Authentication and authorization (checklist A1-A8)."""

    issuers: dict[str, Issuer] = {}
    api_keys: ApiKeys = ApiKeys()
    roles: dict[str, tuple[str, ...]] = {}  # role -> the permissions it grants
    realm: str = "api"  # WWW-Authenticate realm


class Require(Model):
    """What an operation demands of an authenticated caller, beyond its scopes (A5)."""

    roles: tuple[str, ...] = ()  # the caller holds at least one of these
    permissions: tuple[str, ...] = ()  # the caller's roles grant every one of these


_OWNER_SOURCE = re.compile(r"^(path|query|header|body)\.(.+)$")
_OWNER_TARGET = re.compile(r"^(subject|key_id|claim\..+)$")


class Owner(Model):
    """Object-level authorization (A6, OWASP API1 BOLA): a request value must equal the
    caller's identity, unless the caller holds a bypass role."""

    param: str  # path.user_id | query.owner | header.x-account | body.owner_id (JSON pointer-ish)
    equals: str = "subject"  # subject | key_id | claim.<dotted path>
    bypass_roles: tuple[str, ...] = ()

    @field_validator("param")
    @classmethod
    def _check_param(cls, value: str) -> str:
        if not _OWNER_SOURCE.match(value):
            raise ValueError(f"{value!r} must be path.NAME, query.NAME, header.NAME or "
                             "body.FIELD (body.a.b for a nested field)")
        return value

    @field_validator("equals")
    @classmethod
    def _check_equals(cls, value: str) -> str:
        if not _OWNER_TARGET.match(value):
            raise ValueError(f"{value!r} must be subject, key_id or claim.NAME")
        return value


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(ms|s|m|h|d)?\s*$")
_RATE_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _parse_rate(value: Any) -> Any:
    """`100/s`, `1000/m`, `10/10s` -> (count, period in seconds)."""
    if isinstance(value, str):
        match = _RATE.match(value)
        if not match or int(match.group(1)) < 1 or match.group(2) == "0":
            raise ValueError(f"{value!r} is not a rate; write COUNT/PERIOD, e.g. 100/s, "
                             "1000/m or 10/10s")
        period = float(match.group(2) or 1) * _RATE_UNITS[match.group(3)]
        if match.group(3) is None and not match.group(2):
            raise ValueError(f"{value!r} is not a rate; give the period's unit, e.g. 100/s")
        return (int(match.group(1)), period)
    raise ValueError(f"{value!r} is not a rate; write COUNT/PERIOD, e.g. 100/s or 1000/m")


Rate = Annotated[tuple[int, float], BeforeValidator(_parse_rate)]
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
    queue_timeout: Annotated[float, BeforeValidator(_parse_duration), Field(ge=0)] = 0.0


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
        names = [item.name for item in (*self.limits, *self.quotas)]
        for name in names:
            if names.count(name) > 1:
                raise at("limits", f"the name {name!r} is used twice; names label the "
                         "RateLimit headers and the state keys")
        rules = [rule.name for rule in self.bans.rules]
        for name in rules:
            if rules.count(name) > 1:
                raise at("bans.rules", f"the rule name {name!r} is used twice")
        return self


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
    mode: Literal["enforce", "log-only"] = "enforce"
    cors: Cors | None = None
    validation: Validation = Validation()
    responses: Responses = Responses()
    websockets: bool = False
    operations: dict[str, OperationPolicy] = {}
    auth: Auth = Auth()
    rate_limiting: RateLimiting = RateLimiting()
    # where shared state lives: a path = the embedded SQLite file (API keys, bans; counters
    # in memory), relative to the config file; redis:// or rediss:// = a Redis server
    # shared by every gateway instance (counters, bans, API keys); redis+sentinel://
    # host:26379,.../<service>[/<db>] = its master through Sentinel; redis+cluster://
    # host:port,.../ = a Redis Cluster (rediss+... for TLS; config/redis_urls.py)
    state: str = "apishield-state.db"
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


def read_yaml(path: Path) -> Any:
    """Parse a YAML file, turning syntax errors into located messages."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    collecting = gc.isenabled()
    gc.disable()  # the constructor makes ~100k objects a MB: cyclic GC passes tripled load time
    try:
        return yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
    finally:
        if collecting:
            gc.enable()


def load_config(path: str | Path) -> Config:
    """Read and validate `apishield.yaml`; raise ConfigError listing every problem."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: must be a mapping with at least a 'contract' key"])
    return config_from_dict(data, source_dir=path.parent.resolve(), origin=path.name)


def config_from_dict(data: dict[str, Any], *, source_dir: Path, origin: str = "config") -> Config:
    if "source_dir" in data:
        raise ConfigError([f'{origin}: unknown key "source_dir"'])
    try:
        return Config.model_validate({**data, "source_dir": str(source_dir)})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
