"""Who the caller is and what it may do: issuers, API keys, roles, per-operation demands.

The validators here are security checks, not conveniences: they refuse `alg: none`,
mixing HMAC and public-key algorithms on one issuer (key confusion), an issuer without
audiences, and secrets written inline (a config file is copied, diffed and pasted into
tickets, so `Secret` only ever names where a secret is read from). Read by
`apishield.auth` and the `authorize` step; `Require` and `Owner` are the per-operation
half, used from `OperationPolicy`.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from apishield.config.errors import at
from apishield.config.units import Leeway, Model, Seconds

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
    (A2), and where scopes and roles are found in its claims.

    Strict by default (iss, aud, exp and iat required and checked, HMAC secrets at least as
    long as the hash); each check can be relaxed for tokens real apps issue, but only by
    writing so, because a token checked with a weak key is still far better than an
    operation marked public to get it through (issue 16)."""

    issuer: str | None = None  # the exact `iss` value (required unless check_issuer: false)
    schemes: tuple[str, ...] = ()  # securitySchemes it serves; () = every bearer/oauth2/OIDC one
    audiences: tuple[str, ...] = ()
    # Legacy tokens (apps that sign only `sub`/`exp`): each check is off only when written.
    check_issuer: bool = True
    check_audience: bool = True
    allow_weak_secret: bool = False  # a short or well-known HS* secret (logged at start)
    algorithms: tuple[str, ...] = ()
    discovery: bool = False  # OIDC discovery from the scheme's openIdConnectUrl or the issuer
    jwks_url: str | None = None
    keys: tuple[str, ...] = ()  # PEM public keys or JWK / JWKS JSON files
    shared_secret: Secret | None = None  # HS* only
    leeway: Leeway = 30.0
    max_lifetime: Seconds | None = 86400.0  # refuse a JWT whose exp - iat is longer (A3)
    required_claims: tuple[str, ...] = ("exp", "iat")  # iat: max_lifetime needs it
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
        if self.check_issuer and self.issuer is None:
            raise at("issuer", "required: the exact `iss` value of this issuer's tokens; "
                     "for tokens that carry no `iss`, write check_issuer: false instead")
        if not self.check_issuer and self.issuer is not None:
            raise at("issuer", "is never compared with check_issuer: false; remove one")
        if not self.check_issuer and (self.introspection is not None or self.discovery):
            raise at("check_issuer", "false applies to JWTs verified with static keys, a "
                     "jwks_url or a shared secret (introspection and discovery need `issuer`)")
        if self.algorithms and self.check_audience and not self.audiences:
            raise at("audiences", "required: a token minted for another API must not be "
                     "accepted here (RFC 7519 4.1.3); list this API's audience(s), or, "
                     "for tokens that carry no `aud`, write check_audience: false")
        if not self.check_audience and self.audiences:
            raise at("audiences", "are never compared with check_audience: false; remove one")
        if self.algorithms and self.max_lifetime is not None and \
                not {"iat", "exp"} <= set(self.required_claims):
            missing = sorted({"iat", "exp"} - set(self.required_claims))
            raise at("max_lifetime", f"needs {' and '.join(missing)} in every token to "
                     "measure exp - iat: add it to required_claims, or write "
                     "max_lifetime: null for tokens without it")
        if self.allow_weak_secret and self.shared_secret is None:
            raise at("allow_weak_secret", "only applies to an HS* shared_secret")
        if self.jwks_url is not None and urlsplit(self.jwks_url).scheme not in ("http", "https"):
            raise at("jwks_url", f"{self.jwks_url!r} must be an http:// or https:// URL")
        return self


class ApiKeys(Model):
    """The API-key lifecycle (A4, G2): keys live in the state store, hashed."""

    pepper: Secret | None = None  # HMAC key for the stored hashes; default: generated file
    cache_ttl: Seconds = 5.0  # longest a verified key is trusted from memory
    default_expires_in: Seconds | None = 90 * 86400.0  # `keys create` without --expires-in


class Argon2(Model):
    """The Argon2id cost of new password hashes (RFC 9106). The defaults are OWASP's
    minimum for Argon2id (19 MiB, 2 passes, 1 lane): about 25 ms on one core, memory-hard
    so a GPU gains little. Every hash carries its own parameters (PHC string), so raising
    them later needs no migration: old hashes keep verifying, and `apishield users rotate`
    hashes the new password with the values configured then."""

    time_cost: int = Field(default=2, ge=1, le=50)
    memory_kib: int = Field(default=19456, ge=8192, le=4 * 1024 * 1024)
    parallelism: int = Field(default=1, ge=1, le=64)


class Basic(Model):
    """HTTP Basic users (RFC 7617) verified against apishield's user store (issue 16).

    A password check is deliberately slow, so it runs on worker threads, never on the event
    loop, at most `max_concurrent` at a time; `max_waiting` more may wait for a thread,
    and past that an attempt is answered 503 with Retry-After (the gateway's capacity is
    spent, not this caller's quota). Results are remembered in memory, keyed by an HMAC
    of the header, so a client repeating the same header costs one check per `cache_ttl`
    and repeating a wrong one costs one per `failure_ttl`."""

    cache_ttl: Seconds = 5.0  # longest a verified password is trusted from memory
    failure_ttl: Seconds = 5.0  # how long a refused header is refused without a new check
    max_concurrent: int = Field(default=2, ge=1, le=64)  # verifications (threads) at once
    max_waiting: int = Field(default=32, ge=0, le=10_000)  # queued for a thread; then 503
    default_expires_in: Seconds | None = None  # `users create` without --expires-in
    argon2: Argon2 = Argon2()


class Scheme(Model):
    """What apishield does with one security scheme of the contract. `verify` (the default):
    apishield checks the credential itself. `delegate`: the upstream does; apishield only
    checks that the credential is there and well formed, passes it on unchanged, and
    counts the upstream's 401/403 answers as authentication failures (bans, security
    events). For schemes apishield cannot verify (HTTP digest, mutual, oauth, ...) or
    should not (the app keeps its own password database). `refuse`: the scheme is not set
    up yet (what `apishield init` writes for a scheme it cannot configure): every
    credential of it is refused, so the policy loads and fails closed until the operator
    writes an issuer (or delegates the scheme)."""

    mode: Literal["verify", "delegate", "refuse"] = "verify"


class Auth(Model):
    """Authentication and authorization (checklist A1-A8)."""

    issuers: dict[str, Issuer] = {}
    api_keys: ApiKeys = ApiKeys()
    basic: Basic = Basic()
    schemes: dict[str, Scheme] = {}  # by the name in components.securitySchemes
    roles: dict[str, tuple[str, ...]] = {}  # role -> the permissions it grants
    realm: str = "api"  # WWW-Authenticate realm


class Require(Model):
    """What an operation demands of an authenticated caller, beyond its scopes (A5)."""

    roles: tuple[str, ...] = ()  # the caller holds at least one of these
    permissions: tuple[str, ...] = ()  # the caller's roles grant every one of these


_OWNER_SOURCE = re.compile(r"^(path|query|header|body)\.(.+)$")
_OWNER_TARGET = re.compile(r"^(subject|key_id|claim\..+)$")


_OWNER_RESPONSE = re.compile(r"^body((?:\.[^.\[\]]+)*)(\[\])?((?:\.[^.\[\]]+)*)$")


class Owner(Model):
    """Object-level authorization (A6, OWASP API1 BOLA): a value of the request (`param`)
    or of the response (`response`) must equal the caller's identity, unless the caller
    holds a bypass role. The response side is for APIs that find objects by something
    other than their owner (`GET /things/{title}`): only the answer says whose it is."""

    param: str | None = None  # path.user_id | query.owner | header.x-account | body.owner_id
    # body.owner (one object), body[].owner or body.items[].owner (a list: others dropped)
    response: str | None = None
    equals: str = "subject"  # subject | key_id | claim.<dotted path>
    bypass_roles: tuple[str, ...] = ()
    on_mismatch: Literal[404, 403] = 404  # response side: 404 says nothing of existence

    @field_validator("param")
    @classmethod
    def _check_param(cls, value: str | None) -> str | None:
        if value is not None and not _OWNER_SOURCE.match(value):
            raise ValueError(f"{value!r} must be path.NAME, query.NAME, header.NAME or "
                             "body.FIELD (body.a.b for a nested field)")
        return value

    @field_validator("response")
    @classmethod
    def _check_response(cls, value: str | None) -> str | None:
        if value is None:
            return None
        found = _OWNER_RESPONSE.match(value)
        if found is None or not (found.group(1) or found.group(3)) or (
                found.group(2) and not found.group(3)):
            raise ValueError(f"{value!r} must be body.FIELD (body.a.b nested) for one "
                             "object, or body[].FIELD / body.items[].FIELD for a list")
        return value

    @model_validator(mode="after")
    def _one_side(self) -> Owner:
        if (self.param is None) == (self.response is None):
            raise ValueError("give exactly one of `param` (a value of the request) or "
                             "`response` (a field of the answer)")
        return self

    def response_path(self) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
        """(path to the value, or to the list; path inside each item, or None)."""
        assert self.response is not None
        found = _OWNER_RESPONSE.match(self.response)
        assert found is not None
        head = tuple(found.group(1).split(".")[1:])
        tail = tuple(found.group(3).split(".")[1:])
        return (head, tail) if found.group(2) else (head + tail, None)

    @field_validator("equals")
    @classmethod
    def _check_equals(cls, value: str) -> str:
        if not _OWNER_TARGET.match(value):
            raise ValueError(f"{value!r} must be subject, key_id or claim.NAME")
        return value
