"""One authenticator per `securityScheme` of the contract (ARCHITECTURE.md).

An authenticator finds its credential in a request (`credential`: None when absent; the
scheme says where) and turns it into a `Principal` (`authenticate`: raises `AuthFailure`
for a bad credential, or `Suspend` when it needs I/O first). Both are synchronous: on the
hot path a credential is a cache hit, and the rare I/O goes through the pipeline's
suspension instead of making every request pay for a task.

What each scheme type means here:
- `http` + `bearer`, `oauth2`, `openIdConnect`: an `Authorization: Bearer` token (RFC 6750
  2.1), a JWT verified locally against a configured issuer (A1, A3) or an opaque token
  introspected (RFC 7662, A2);
- `apiKey`: an apishield API key (A4) in the header, query parameter or cookie the scheme
  names, verified against the key store;
- `mutualTLS` (OpenAPI 3.1): a client certificate verified during the TLS handshake;
- `http` + `basic`: a user name and password verified against the user store (`basic`).
Any scheme but mutualTLS may instead be delegated (`auth.schemes.<name>.mode: delegate`):
`DelegatedAuthenticator` checks only that the credential is present and well formed, and
the upstream verifies it. Other `http` schemes (digest, ...) must be delegated.
Any scheme may be refused (`mode: refuse`): `RefusedAuthenticator` refuses every credential
of it, the starter policy's way to fail closed on a scheme nobody has set up yet.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import time
from collections.abc import Awaitable, Callable
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias
from urllib.parse import unquote

import orjson

from apishield.auth.principal import AuthFailure, Principal
from apishield.exchange import Exchange, Suspend
from apishield.observe import events
from apishield.observe.logjson import fields
from apishield.problems import ServiceUnavailable
from apishield.state.keys import KeyStoreError

if TYPE_CHECKING:
    from apishield.auth.apikey_verifier import ApiKeyVerifier
    from apishield.auth.basic import BasicVerifier, Outcome
    from apishield.auth.introspection import Introspector
    from apishield.auth.jws import TokenVerifier
    from apishield.auth.token_cache import TokenCache

    # what a bearer scheme keeps per `iss` value: (configured issuer name, its JWT
    # verifier, its async refresh_for_unknown(kid) or None for static keys)
    IssuerEntry: TypeAlias = tuple[str, TokenVerifier, Callable[[str], Awaitable[object]] | None]

logger = logging.getLogger("apishield")

# RFC 6750 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")
MAX_CREDENTIAL = 8192  # longer is refused before any parsing


class Authenticator(Protocol):
    name: str  # the securityScheme's name
    kind: str  # bearer | apiKey | mutualTLS
    challenge: str  # its WWW-Authenticate challenge ("" when the scheme has none)

    def credential(self, request: Exchange) -> str | None: ...

    def authenticate(self, credential: str, exchange: Exchange) -> Principal: ...


def _only(request: Exchange, name: bytes) -> bytes | None:
    """The one value of a header; two of them are ambiguous (which would the upstream
    read?), so they are a failure rather than a pick."""
    found = None
    for key, value in request.headers:
        if key == name:
            if found is not None:
                raise AuthFailure("credential-ambiguous")
            found = value
    return found


class BearerAuthenticator:
    """Bearer tokens for one scheme, served by one or more configured issuers."""

    kind = "bearer"

    def __init__(
        self,
        name: str,
        realm: str,
        # `iss` value -> its issuer; None: the issuer with check_issuer: false, for tokens
        # whose `iss` names no configured issuer (or that carry none)
        verifiers: dict[str | None, IssuerEntry],
        introspectors: list[Introspector],  # opaque tokens
        cache: TokenCache,
    ) -> None:
        self.name = name
        self.challenge = f'Bearer realm="{realm}"'
        self.verifiers = verifiers
        self.only_verifier = next(iter(verifiers.values())) if len(verifiers) == 1 else None
        self.introspector = introspectors[0] if introspectors else None
        self.cache = cache

    def credential(self, request: Exchange) -> str | None:
        value = _only(request, b"authorization")
        if value is None:
            return None
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer":
            return None  # another scheme's credential (Basic, ...): not ours
        token = token.strip(b" ")
        if len(token) > MAX_CREDENTIAL or not _B64TOKEN.fullmatch(token):
            raise AuthFailure("bearer-malformed")
        return token.decode("ascii")

    def authenticate(self, credential: str, exchange: Exchange) -> Principal:
        cache = self.cache
        now = time.time()
        principal = cache.get(credential, now)
        if principal is not None:
            return principal
        reason = cache.failure(credential, now)
        if reason is not None:
            raise AuthFailure(reason)
        if credential.count(".") == 2 and self.verifiers:
            principal = self._verify_jwt(credential, exchange, now)
        elif self.introspector is not None:
            principal = self._introspect(credential, exchange, now)
        else:
            raise self._fail(credential, AuthFailure("jwt-malformed"), now)
        events.authn_success(exchange, principal)
        return principal

    def _fail(self, token: str, failure: AuthFailure, now: float) -> AuthFailure:
        self.cache.put_failure(token, failure.reason, now)
        return failure

    def _verify_jwt(self, token: str, exchange: Exchange, now: float) -> Principal:
        header, payload = _peek(token)
        issuer = payload.get("iss")
        # a non-string `iss` (unhashable when a list or an object) names no issuer
        entry = self.only_verifier or (
            self.verifiers.get(issuer) if isinstance(issuer, str) else None
        ) or self.verifiers.get(None)
        if entry is None:
            raise self._fail(token, AuthFailure("jwt-wrong-issuer"), now)
        issuer_name, verifier, refresh = entry
        try:
            principal = verifier.verify(token, now)
        except AuthFailure as failure:
            if failure.reason == "jwt-unknown-kid" and exchange.resumes == 0:
                # maybe the issuer rotated its keys: refetch (bounded by a cooldown), retry
                if refresh is not None:
                    kid = str(header.get("kid", ""))

                    async def wait() -> None:
                        try:
                            await refresh(kid)
                        except Exception:  # noqa: S110 - the rerun reports jwt-unknown-kid
                            pass

                    raise Suspend(wait) from None
            raise self._fail(token, failure, now) from None
        header_kid = header.get("kid")
        self.cache.put(token, principal, issuer_name,
                       header_kid if isinstance(header_kid, str) else None)
        return principal

    def _introspect(self, token: str, exchange: Exchange, now: float) -> Principal:
        introspector = self.introspector
        assert introspector is not None
        principal = introspector.cached(token, now)
        if principal is not None:
            return principal
        if exchange.resumes == 0:
            cache = self.cache

            async def wait() -> None:
                try:
                    await introspector.introspect(token, time.time())
                except AuthFailure as failure:
                    cache.put_failure(token, failure.reason, time.time())
                except Exception:
                    cache.put_failure(token, "introspection-unavailable", time.time())

            raise Suspend(wait)
        raise AuthFailure("introspection-unavailable")


def _peek(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and payload of a JWT, unverified: only to pick the issuer and the `kid`.
    Nothing read here is trusted; the verifier parses strictly and checks the signature."""
    try:
        parts = token.split(".")
        header = orjson.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
        payload = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error, orjson.JSONDecodeError):
        return {}, {}
    return (header if isinstance(header, dict) else {}), (
        payload if isinstance(payload, dict) else {})


class ApiKeyAuthenticator:
    """An apishield API key where the `apiKey` scheme says: header, query or cookie."""

    kind = "apiKey"

    def __init__(self, name: str, realm: str, location: str, param: str,
                 verifier: Callable[[], ApiKeyVerifier]) -> None:
        self.name = name
        self.challenge = f'ApiKey realm="{realm}"'
        self.location = location
        self.param = param
        self.header = param.lower().encode("latin-1")
        self.verifier = verifier  # opens the key store on first use
        self.reader = {"header": self._from_header, "query": self._from_query,
                       "cookie": self._from_cookie}[location]

    def credential(self, request: Exchange) -> str | None:
        value = self.reader(request)
        if value is not None and len(value) > MAX_CREDENTIAL:
            raise AuthFailure("api-key-malformed")
        return value

    def _from_header(self, request: Exchange) -> str | None:
        value = _only(request, self.header)
        return value.decode("latin-1").strip() if value is not None else None

    def _from_query(self, request: Exchange) -> str | None:
        found = None
        for pair in request.query.split(b"&"):
            name, _, value = pair.partition(b"=")
            if unquote(name.decode("latin-1")) == self.param:
                if found is not None:
                    raise AuthFailure("credential-ambiguous")
                found = unquote(value.decode("latin-1"))
        return found

    def _from_cookie(self, request: Exchange) -> str | None:
        found = None
        for key, value in request.headers:
            if key != b"cookie":
                continue
            try:
                jar = SimpleCookie(value.decode("latin-1"))
            except CookieError:
                raise AuthFailure("credential-ambiguous") from None
            if self.param in jar:
                if found is not None:
                    raise AuthFailure("credential-ambiguous")
                found = jar[self.param].value
        return found

    def authenticate(self, credential: str, exchange: Exchange) -> Principal:
        try:
            return self.verifier().verify(credential, time.time())
        except KeyStoreError:
            # the store cannot answer: fail closed, but say it is us, not the caller
            logger.exception("API key store unavailable (request %s)", exchange.id,
                             extra=fields("error", exchange.id))
            raise ServiceUnavailable("key-store-unavailable") from None


class MutualTlsAuthenticator:
    """A client certificate the TLS handshake verified against `tls.client_ca`: the
    certificate is the credential, its subject CN the principal (OpenAPI 3.1 mutualTLS)."""

    kind = "mutualTLS"
    challenge = ""

    def __init__(self, name: str) -> None:
        self.name = name

    def credential(self, request: Exchange) -> str | None:
        for key, value in request.client_identity:
            if key == b"x-apishield-client-subject":
                return unquote(value.decode("ascii"))
        return "" if request.client_identity else None

    def authenticate(self, credential: str, exchange: Exchange) -> Principal:
        return Principal(scheme=self.name, subject=credential)


# how challenges spell the registered HTTP schemes (names are case-insensitive, RFC 9110
# 11.1; the contract's spelling is kept for the others)
_SCHEME_NAMES = {"basic": "Basic", "bearer": "Bearer", "digest": "Digest"}
_BASIC_TOKEN = re.compile(rb"[A-Za-z0-9+/]+={0,2}")  # RFC 7617: token68, base64 alphabet


def _authorization(request: Exchange, scheme: bytes) -> bytes | None:
    """The credential after `<scheme> ` in the one Authorization header; None when absent
    or another scheme's (an alternative of the requirement may take it)."""
    value = _only(request, b"authorization")
    if value is None:
        return None
    name, _, rest = value.partition(b" ")
    if name.lower() != scheme:
        return None
    return rest.strip(b" ")


class BasicAuthenticator:
    """HTTP Basic (RFC 7617) against the user store. A cache hit answers at once; a miss
    suspends the request while a pool thread runs the Argon2id check (`auth.basic`)."""

    kind = "basic"

    def __init__(self, name: str, realm: str, verifier: Callable[[], BasicVerifier]) -> None:
        self.name = name
        self.challenge = f'Basic realm="{realm}", charset="UTF-8"'
        self.verifier = verifier  # opens the user store on first use

    def credential(self, request: Exchange) -> str | None:
        from apishield.auth.basic import parse_basic

        token = _authorization(request, b"basic")
        if token is None:
            return None
        if len(token) > MAX_CREDENTIAL or not _BASIC_TOKEN.fullmatch(token):
            raise AuthFailure("basic-malformed")
        credential = token.decode("ascii")
        parse_basic(credential)  # the syntax now: a malformed header never reaches a thread
        return credential

    def authenticate(self, credential: str, exchange: Exchange) -> Principal:
        from apishield.auth.basic import Attempt, parse_basic

        verifier = self.verifier()
        key = verifier.cache_key(credential)
        outcome: Outcome | None = verifier.cached(key, time.time())
        first = False
        if outcome is None:
            waited = exchange.waited_for
            if not (isinstance(waited, Attempt) and waited.key == key):
                user, password = parse_basic(credential)
                attempt = Attempt(key)
                raise Suspend(lambda: verifier.verify(attempt, user, password), owner=attempt)
            outcome = waited.outcome
            first = True
        if isinstance(outcome, Principal):
            if first:
                events.authn_success(exchange, outcome)
            return outcome
        if isinstance(outcome, AuthFailure):
            raise AuthFailure(outcome.reason, subject=outcome.subject)
        if outcome is None:  # cannot happen: `verify` always leaves an outcome
            raise ServiceUnavailable("basic-check-failed")
        raise outcome  # a 503: every thread busy, or the store cannot answer


class DelegatedAuthenticator:
    """A scheme the upstream verifies (`auth.schemes.<name>.mode: delegate`). apishield
    checks that the credential is present where the scheme says and well formed, and
    passes it on unchanged; the request carries no verified caller (`exchange.principal`
    stays None, no identity headers) and the upstream's 401/403 are counted as
    authentication failures (`auth/delegate.py`). `authenticate` is never called: the
    authenticate step recognises this class."""

    kind = "delegated"

    def __init__(self, name: str, scheme: dict[str, Any], realm: str) -> None:
        self.name = name
        kind = scheme.get("type")
        self.reader: Callable[[Exchange], str | None]
        self.api_key = kind == "apiKey"
        if self.api_key:
            keys = ApiKeyAuthenticator(name, realm, scheme["in"], scheme["name"],
                                       verifier=_never)
            self.challenge = keys.challenge
            self.reader = keys.credential
            return
        http = str(scheme.get("scheme", "bearer") if kind == "http" else "bearer")
        self.http_scheme = http.lower().encode("ascii", "replace")
        label = _SCHEME_NAMES.get(http.lower(), http)
        self.challenge = f'{label} realm="{realm}"'
        self.reader = self._authorization

    def _authorization(self, request: Exchange) -> str | None:
        token = _authorization(request, self.http_scheme)
        if token is None:
            return None
        if not token or len(token) > MAX_CREDENTIAL:
            raise AuthFailure("delegated-malformed")
        if self.http_scheme == b"basic":
            from apishield.auth.basic import parse_basic

            if not _BASIC_TOKEN.fullmatch(token):
                raise AuthFailure("delegated-malformed")
            try:
                parse_basic(token.decode("ascii"))
            except AuthFailure:
                raise AuthFailure("delegated-malformed") from None
        elif self.http_scheme == b"bearer":
            if not _B64TOKEN.fullmatch(token):
                raise AuthFailure("delegated-malformed")
        elif any(byte < 0x20 or byte == 0x7F for byte in token):  # digest, mutual, ...
            raise AuthFailure("delegated-malformed")
        return ""  # present and well formed; the value is not needed here

    def credential(self, request: Exchange) -> str | None:
        try:
            value = self.reader(request)
        except AuthFailure as failure:
            if failure.reason == "credential-ambiguous":
                raise
            raise AuthFailure("delegated-malformed") from None
        if value is not None and self.api_key and not value:
            raise AuthFailure("delegated-malformed")  # an empty API key
        return value

    def authenticate(self, credential: str, exchange: Exchange) -> Principal:
        raise AssertionError(f"{self.name} is delegated: the upstream verifies it")


class RefusedAuthenticator:
    """A scheme the config refuses (`auth.schemes.<name>.mode: refuse`): declared by the
    contract, not set up here yet. A request that presents its credential is refused
    (401, reason `scheme-refused`, a security event like any failed attempt); one that
    presents none gets the usual 401 with the scheme's challenge. So an operation that
    accepts this scheme or another one still works with the other, and one that accepts
    only this scheme is closed until the operator configures it."""

    kind = "refused"

    def __init__(self, name: str, scheme: dict[str, Any], realm: str) -> None:
        self.name = name
        # a client certificate is checked in the TLS handshake, not in the request: a
        # refused mutualTLS scheme never finds a credential (the request gets the 401)
        self._presence = (None if scheme.get("type") == "mutualTLS"
                          else DelegatedAuthenticator(name, scheme, realm))
        self.challenge = self._presence.challenge if self._presence is not None else ""

    def credential(self, request: Exchange) -> str | None:
        if self._presence is None:
            return None
        try:
            found = self._presence.credential(request)
        except AuthFailure:
            return ""  # malformed or ambiguous: refused all the same
        return None if found is None else ""

    def authenticate(self, credential: str, exchange: Exchange) -> Principal:
        raise AuthFailure("scheme-refused")


def _never() -> ApiKeyVerifier:
    raise AssertionError("a delegated API key is never verified here")
