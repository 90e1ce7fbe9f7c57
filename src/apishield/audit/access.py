"""Rules about who may call what: security requirements, schemes, issuers, roles, owners
(checklist A1-A9; OWASP API1, API2, API5)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import pairwise
from urllib.parse import urlsplit

from apishield.audit.context import AuditContext
from apishield.audit.findings import Location, Severity, rule
from apishield.auth.weak_secrets import weakness
from apishield.config import is_loopback
from apishield.config.secrets import read_secret
from apishield.contract.loader import Operation, escape_pointer

Found = Iterator[tuple[Location, str]]

# `id`, `ID`, `uuid`, `sid`; `userid`, `playerid` (lower case run together); `orderId`,
# `projectGuid`, `AccountSid` (Twilio); `user_id`, `task_gid` (Asana), `LIVE_STREAM_ID`.
# Every path parameter of the corpus these match is an object id (bench/RESULTS.md).
ID_PARAMETER = re.compile(r"((?i:^(id|uuid|guid|sid)$)|^[a-z]+id$"
                          r"|[a-z0-9](Id|ID|Uuid|UUID|Guid|GUID|Sid|SID)$"
                          r"|(?i:[_-](id|uuid|guid|gid|sid)$))")
ADMIN_PATH = re.compile(r"/(admin|administration|internal|manage|management|superuser|"
                        r"staff|ops|debug)(/|$|\{)", re.IGNORECASE)
# `admin` as a word anywhere in the path's literal text, not only as a whole segment:
# `/admin.apps.approve` (Slack), `Microsoft.Storage.Admin/farms` (Azure Stack),
# `#X-Amz-Target=...AdminCreateUser` (AWS), `/__admin/mappings` (WireMock), `/district_admins`
ADMIN_WORDS = frozenset({"admin", "admins", "administration", "administrator",
                         "administrators", "administrative", "superuser", "superusers"})
_PARAMETER = re.compile(r"\{[^}]*\}")
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+[a-z]*")
# words of a path or an operationId (camelCase and separators split) that name a
# credential check: `/auth/token`, `createSession`, `reset-password`, not `/authors`.
# `reset` alone is not one: `VpnGateways_Reset`, `instances.reset` reset machines (corpus).
CREDENTIAL_WORDS = frozenset({
    "login", "logon", "signin", "auth", "authenticate", "authentication", "oauth", "token",
    "tokens", "password", "passwords", "passwd", "forgot", "otp", "mfa", "2fa",
    "session", "sessions", "signup", "register", "registration"})
# sign-up too: account creation is where bots enumerate and spam (`apishield init` limits
# the same operations, so a starter policy passes this rule)
_CREDENTIAL_PAIRS = frozenset({("log", "in"), ("sign", "in"), ("log", "on"), ("sign", "up")})


def words(text: str) -> list[str]:
    """The lower-cased words of a name: camelCase, digits and separators split."""
    return [word.lower() for word in _WORD.findall(text)]


def credential_like(text: str) -> bool:
    """Whether a path or operationId reads like login, token or password reset."""
    found = words(text)
    return bool(CREDENTIAL_WORDS.intersection(found)) or any(
        pair in _CREDENTIAL_PAIRS for pair in pairwise(found))


def admin_like(path: str) -> bool:
    """Whether a path reads like an administrative one: a segment such as /admin/ or
    /internal/, or the word admin in its literal text (parameter names are not read)."""
    return bool(ADMIN_PATH.search(path)) or bool(
        ADMIN_WORDS.intersection(words(_PARAMETER.sub("/", path))))


MAX_LIFETIME = 86400.0


def secured(operation: Operation) -> bool:
    """Has at least one requirement with a credential (and is not made public)."""
    return (not operation.public and operation.security is not None
            and any(operation.security))


@rule("no-security", title="Operation declares no security and is not marked public",
      severity=Severity.MEDIUM, checklist="A7", owasp="API2",
      why="The contract does not say who may call the operation. apishield fails closed "
          "and refuses it to everyone (403 not-public), which is safe but is rarely what "
          "the author meant; another gateway would let anyone in.",
      fix="Give it a `security` requirement, or make it public explicitly with "
          "`security: []` or `x-apishield: {public: true}`.")
def no_security(ctx: AuditContext) -> Found:
    for operation in ctx.contract.operations:
        if operation.security is None and not operation.public:
            yield ctx.at_operation(operation), (
                f"{operation.label} has no security requirement and is not public, so "
                "apishield refuses it to everyone")


@rule("public-overrides-security", title="Policy makes a secured operation public",
      severity=Severity.HIGH, checklist="A7", owasp="API2",
      why="`public: true` overrides the contract's security requirement: anyone can call "
          "the operation without a credential, while the contract tells readers it is "
          "protected.",
      fix="Remove `public: true`, or remove the operation's `security` so the contract "
          "says what is enforced.")
def public_overrides(ctx: AuditContext) -> Found:
    for operation in ctx.contract.operations:
        if operation.public_over_security:
            yield ctx.at_operation(operation), (
                f"{operation.label}: public: true overrides its security requirement")


def _scheme_at(name: str) -> str:
    return "/components/securitySchemes/" + escape_pointer(name)


@rule("api-key-in-query", title="API key sent in the query string",
      severity=Severity.MEDIUM, checklist="A4", owasp="API2",
      why="URLs are written to access logs, proxy logs, browser history and Referer "
          "headers: a key in the query string leaks where headers do not.",
      fix="Declare the key `in: header` (e.g. X-API-Key) and have clients send it there.")
def api_key_in_query(ctx: AuditContext) -> Found:
    for name, scheme in ctx.contract.security_schemes.items():
        if scheme.get("type") == "apiKey" and scheme.get("in") == "query":
            yield ctx.at_contract(ctx.contract.source, _scheme_at(name)), (
                f"security scheme {name} reads the key from the query parameter "
                f"{scheme.get('name')!r}")


@rule("plain-http-server", title="Credentials over a plain-HTTP server",
      severity=Severity.HIGH, checklist="C1", owasp="API8",
      why="Clients that follow the contract's `servers` send tokens, keys and passwords in "
          "clear text to an http:// URL that is not loopback: anyone on the path reads them.",
      fix="Serve the API over https:// and list only https:// servers (http://localhost "
          "for development is fine).")
def plain_http_server(ctx: AuditContext) -> Found:
    if not ctx.contract.security_schemes:
        return
    resolver = ctx.contract.resolver
    doc = resolver.document(ctx.contract.source) if resolver is not None else {}
    servers = doc.get("servers") if isinstance(doc, dict) else None
    if not isinstance(servers, list):
        return
    for index, server in enumerate(servers):
        url = server.get("url") if isinstance(server, dict) else None
        if isinstance(url, str) and url.lower().startswith("http://") and not is_loopback(
                urlsplit(url).hostname or ""):
            yield ctx.at_contract(ctx.contract.source, f"/servers/{index}/url"), (
                f"server {url} is plain HTTP and the contract declares security schemes")


@rule("oauth-legacy-flow", title="OAuth implicit or password grant",
      severity=Severity.MEDIUM, checklist="A1", owasp="API2",
      why="OAuth 2.0 Security BCP (RFC 9700) forbids the resource owner password grant and "
          "advises against the implicit grant: the first hands the user's password to the "
          "client, the second returns tokens in URLs where they leak.",
      fix="Use the authorization code flow with PKCE (or client credentials between "
          "services) and remove the `implicit`/`password` flows.")
def oauth_legacy_flow(ctx: AuditContext) -> Found:
    for name, scheme in ctx.contract.security_schemes.items():
        flows = scheme.get("flows") if scheme.get("type") == "oauth2" else None
        if isinstance(flows, dict):
            for flow in ("implicit", "password"):
                if flow in flows:
                    yield ctx.at_contract(ctx.contract.source,
                                          f"{_scheme_at(name)}/flows/{flow}"), (
                        f"security scheme {name} offers the {flow} flow")


@rule("oauth-flow-without-scopes", title="OAuth flow without scopes",
      severity=Severity.LOW, checklist="A5", owasp="API5",
      why="Without scopes every token of the flow may call every operation the scheme "
          "protects: there is no least privilege to enforce.",
      fix="Declare scopes per capability (read:pets, write:pets) and require them in the "
          "operations' `security`.")
def oauth_without_scopes(ctx: AuditContext) -> Found:
    for name, scheme in ctx.contract.security_schemes.items():
        flows = scheme.get("flows") if scheme.get("type") == "oauth2" else None
        if isinstance(flows, dict):
            for flow, body in flows.items():
                if isinstance(body, dict) and not body.get("scopes"):
                    yield ctx.at_contract(ctx.contract.source,
                                          f"{_scheme_at(name)}/flows/{flow}"), (
                        f"security scheme {name}: the {flow} flow declares no scopes")


def _issuer_at(ctx: AuditContext, name: str, key: str) -> Location | None:
    return ctx.at_config(f"/auth/issuers/{escape_pointer(name)}/{key}")


@rule("jwt-issuer-check-off", title="JWT issuer check turned off",
      severity=Severity.MEDIUM, checklist="A1", owasp="API2",
      why="With `check_issuer: false` a token is accepted whoever issued it, as long as the "
          "key verifies: a second issuer sharing keys or a secret can mint tokens here.",
      fix="Have the issuer set `iss` and configure `issuer:` with its exact value.")
def issuer_check_off(ctx: AuditContext) -> Found:
    for name, issuer in ctx.config.auth.issuers.items():
        where = _issuer_at(ctx, name, "check_issuer")
        if not issuer.check_issuer and where is not None:
            yield where, f"issuer {name} accepts tokens without comparing `iss`"


@rule("jwt-audience-check-off", title="JWT audience check turned off",
      severity=Severity.HIGH, checklist="A1", owasp="API2",
      why="With `check_audience: false` a token minted for another API of the same issuer "
          "is accepted here (RFC 7519 4.1.3, RFC 8725 3.9): one leaked or low-value token "
          "opens every API.",
      fix="Have the issuer put this API's audience in `aud` and list it in `audiences:`.")
def audience_check_off(ctx: AuditContext) -> Found:
    for name, issuer in ctx.config.auth.issuers.items():
        where = _issuer_at(ctx, name, "check_audience")
        if issuer.algorithms and not issuer.check_audience and where is not None:
            yield where, f"issuer {name} accepts tokens minted for any audience"


@rule("jwt-long-lifetime", title="Long-lived or unbounded JWTs accepted",
      severity=Severity.MEDIUM, checklist="A3", owasp="API2",
      why="A stolen token works until it expires; a JWT cannot be revoked. Past a day "
          "(or with no limit at all) a leaked token is a long-lived credential.",
      fix="Set `max_lifetime` to the issuer's access-token lifetime (minutes to an hour is "
          "usual; at most 1d) and keep `iat` required.")
def long_lifetime(ctx: AuditContext) -> Found:
    for name, issuer in ctx.config.auth.issuers.items():
        where = _issuer_at(ctx, name, "max_lifetime")
        if not issuer.algorithms or where is None:
            continue
        if issuer.max_lifetime is None:
            yield where, f"issuer {name}: max_lifetime: null, any token lifetime is accepted"
        elif issuer.max_lifetime > MAX_LIFETIME:
            yield where, (f"issuer {name} accepts tokens living up to "
                          f"{issuer.max_lifetime / 3600:g} hours")


@rule("jwt-weak-secret", title="Weak HMAC secret accepted for JWTs",
      severity=Severity.CRITICAL, checklist="A1", owasp="API2",
      why="Whoever guesses an HS256 secret mints any token for any user: a short, "
          "patterned or published secret (jwt.io's example, framework quick starts) is "
          "found by offline guessing in minutes.",
      fix="Move the issuer to a random secret of 32 bytes or more (e.g. `openssl rand "
          "-base64 48`) or to an asymmetric algorithm, then remove `allow_weak_secret`.")
def weak_secret(ctx: AuditContext) -> Found:
    for name, issuer in ctx.config.auth.issuers.items():
        if issuer.shared_secret is None:
            continue
        try:
            secret = read_secret(issuer.shared_secret, ctx.config.source_dir,
                                 what=f"auth.issuers.{name}.shared_secret")
        except ValueError:
            secret = None  # not readable where the audit runs (CI): judge by the flag
        why = weakness(secret, issuer.algorithms) if secret is not None else None
        if issuer.allow_weak_secret:
            where = _issuer_at(ctx, name, "allow_weak_secret")
            if where is not None:
                yield where, (f"issuer {name}: allow_weak_secret: true; its secret "
                              + (why or ("could not be read here to check" if secret is None
                                         else "is not weak today; remove the flag")))
        elif why is not None:
            where = _issuer_at(ctx, name, "shared_secret")
            if where is not None:
                yield where, (f"issuer {name}: its shared secret {why}; the gateway "
                              "refuses to start with it")


def _owner_param(operation: Operation) -> str | None:
    owner = operation.policy.owner
    return owner.param if owner is not None else None


@rule("bola-id-parameter", title="ID-like path parameter without an ownership rule",
      severity=Severity.MEDIUM, checklist="A6", owasp="API1",
      why="An operation that takes an object id from the path and is open to any "
          "authenticated caller lets one user read or change another's object by changing "
          "the id (BOLA/IDOR, the first OWASP API risk), unless something checks ownership.",
      fix="Add an `owner` rule (x-apishield or operations.<operationId>): `owner: {param: "
          "path.<name>}` or `owner: {response: body.owner_id}`, or require a role, or "
          "document that the upstream checks ownership.")
def bola(ctx: AuditContext) -> Found:
    for operation in ctx.contract.operations:
        if not secured(operation) or operation.policy.owner is not None:
            continue
        require = operation.policy.require
        if require is not None and (require.roles or require.permissions):
            continue
        names = [p.name for p in operation.parameters
                 if p.location == "path" and ID_PARAMETER.search(p.name)]
        if names:
            yield ctx.at_operation(operation), (
                f"{operation.label}: path parameter {', '.join(names)} names an object, "
                "and no owner rule ties it to the caller")


@rule("admin-without-role", title="Admin-like path without a role requirement",
      severity=Severity.HIGH, checklist="A5", owasp="API5",
      why="Administrative operations open to every authenticated caller (or to everyone) "
          "are broken function-level authorization: a normal user calls them by guessing "
          "the path.",
      fix="Add `require: {roles: [admin]}` (or permissions) to the operation, in "
          "x-apishield or operations.<operationId>, or require an admin scope.")
def admin_without_role(ctx: AuditContext) -> Found:
    for operation in ctx.contract.operations:
        if not admin_like(operation.path):
            continue
        if operation.security is None and not operation.public:
            continue  # refused to everyone: no-security says so
        require = operation.policy.require
        if require is not None and (require.roles or require.permissions):
            continue
        scoped = operation.security is not None and any(
            scopes for requirement in operation.security for scopes in requirement.values())
        if scoped and not operation.public:
            continue
        yield ctx.at_operation(operation), (
            f"{operation.label} looks administrative and "
            + ("is public" if operation.public else "requires no role, permission or scope"))


@rule("delegated-scheme", title="Scheme verified by the upstream, not apishield",
      severity=Severity.LOW, checklist="A1", owasp="API2",
      why="With `mode: delegate` apishield only checks that the credential is present and "
          "well formed; a forged one reaches the upstream, whose own check is then the only "
          "line, and object or role rules cannot use the caller's identity.",
      fix="Where apishield can verify the scheme (JWT, introspection, API keys, Basic "
          "users), switch it to `mode: verify`; otherwise keep the upstream's check tested.")
def delegated(ctx: AuditContext) -> Found:
    for name, scheme in ctx.config.auth.schemes.items():
        where = ctx.at_config(f"/auth/schemes/{escape_pointer(name)}/mode")
        if scheme.mode == "delegate" and where is not None:
            yield where, f"security scheme {name} is delegated to the upstream"
