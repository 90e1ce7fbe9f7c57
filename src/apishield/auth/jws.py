"""JWT access-token verification for one configured issuer (checklist A1, A3).

`TokenVerifier.verify(token, now)` is synchronous and runs on the hot path (after a token
cache miss). It does its own strict pre-checks on the compact serialization and the JOSE
header first, then verifies the signature with PyJWT's implementation of exactly that
allow-listed `alg` (`jwt.get_algorithm_by_name(alg).verify`: the library's reviewed code
for the ECDSA raw-to-DER conversion, RSA-PSS parameters and the constant-time HMAC
compare) and the one key the key set resolved, then checks the registered claims.

Why not `jwt.decode()`: it parses and validates the whole token again in pure Python
(PyJWT checks each base64 character in a Python loop): 44 us for a 1.2 KB token, measured
(`bench/jwt_verify.py`), 2.5 times the RSA-2048 verification itself, on every cache miss,
after apishield has already done the same checks more strictly. The claim checks it would
add are a few comparisons, done here with the caller's clock (PyJWT reads
`datetime.now()`; one clock per request keeps the decision reproducible and testable).

Why pre-check what PyJWT also parses: the attacks on JWT libraries live in the gaps
between what a token says and what a library lets it decide (RFC 8725 2.1-2.8). Here the
token never chooses: the algorithm must be in the issuer's allow-list, the key comes from
the configured key set only (never from `jku`/`x5u`/`jwk`/`x5c`), its type must fit the
algorithm family, and JSON that two parsers could read differently (duplicate names) is
refused before anything trusts it.

Every failure raises `AuthFailure(reason)` with a precise reason for the security event;
the client always sees the same 401 (no oracle). `UnknownKey` (a `kid` the current key
set does not hold) lets the caller refetch the issuer's keys once and call again.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jwt

from apishield.auth.jwa import UnknownKey, VerifyKey, key_fits
from apishield.auth.jwks import StaticKeys
from apishield.auth.principal import AuthFailure, Principal

if TYPE_CHECKING:
    from apishield.config import Issuer

__all__ = [
    "MAX_TOKEN_BYTES",
    "KeyProvider",
    "TokenVerifier",
    "UnknownKey",
    "claim_path",
    "key_fits",
    "roles_from",
    "scopes_from",
]

# A JWT access token is typically 0.5-2 KiB; 16 KiB leaves room for fat role claims while
# bounding what an unauthenticated client makes us base64-decode and JSON-parse.
MAX_TOKEN_BYTES = 16 * 1024
MAX_KID_CHARS = 1024  # a kid is a short opaque id; a megabyte "kid" is an attack, not a key

# Header parameters that carry or point at key material (RFC 7515 4.1.2-4.1.6). Trusting
# them lets the token choose the key it is verified with (RFC 8725 3.10): refused outright,
# even when the key they name happens to be ours, so there is a single rule to audit.
_KEY_HEADERS = frozenset({"jku", "jwk", "x5u", "x5c"})

# RFC 7515 4.1.9 / RFC 9068 2.1: `typ` is a media type whose "application/" prefix may be
# omitted. A JWT of another kind (`dpop+jwt`, `logout+jwt`, `secevent+jwt`...) signed by
# the same issuer is not an access token (RFC 8725 3.11: explicit typing).
_ALLOWED_TYP = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})

# RFC 4648 5 (base64url) without padding, as RFC 7515 2 requires for JWS.
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
# RFC 4648 3.5: the bits after the last full byte must be zero. Without this, several
# strings decode to the same bytes (a malleable signature string defeats token-keyed
# caches and audit de-duplication).
_LAST_CHAR_2 = frozenset("AQgw")  # 12 bits, 8 used: low 4 bits zero
_LAST_CHAR_3 = frozenset("AEIMQUYcgkosw048")  # 18 bits, 16 used: low 2 bits zero

# Raw signature sizes that do not depend on the key (RFC 7518 3.2, 3.4; RFC 8037 3.1).
# Checking them before the key lookup keeps junk (a stripped or truncated signature with
# a random `kid`) from ever triggering a JWKS refetch.
_SIG_SIZES = {"ES256": (64,), "ES384": (96,), "ES512": (132,), "EdDSA": (64, 114),
              "HS256": (32,), "HS384": (48,), "HS512": (64,)}


class KeyProvider(Protocol):
    """What the verifier needs from a key set (`StaticKeys`, `KeySource`): the key for a
    `kid` and an algorithm, synchronously and in O(1)."""

    def key_for(self, kid: str | None, alg: str) -> VerifyKey: ...


class _Duplicate(Exception):  # internal signal, never escapes this module
    """A JSON object repeated a member name."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` refusing repeated names. RFC 7515 4 and RFC 7519 4 say a JOSE
    header or claims set with duplicate names MUST be rejected (or the last one used);
    rejecting is the only choice under which every parser agrees on what the token says
    (`{"sub":"alice","sub":"admin"}` is alice to one parser and admin to another)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Duplicate
    return obj


def _no_constant(name: str) -> Any:
    """NaN and Infinity are not JSON (RFC 8259 6); `exp: Infinity` must not mean forever."""
    raise ValueError(f"{name} is not JSON")


def _b64decode(segment: str) -> bytes:
    """Strict base64url (RFC 7515 2, RFC 4648 5): alphabet only, no padding, canonical."""
    if not _B64URL.fullmatch(segment):
        raise AuthFailure("jwt-malformed")
    rest = len(segment) % 4
    if rest == 1 or (rest == 2 and segment[-1] not in _LAST_CHAR_2) or (
            rest == 3 and segment[-1] not in _LAST_CHAR_3):
        raise AuthFailure("jwt-malformed")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _json_object(data: bytes) -> dict[str, Any]:
    """A JSON object in strict UTF-8 (RFC 7519 7.2 step 4/10), duplicate names refused."""
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates,
                           parse_constant=_no_constant)
    except _Duplicate:
        raise AuthFailure("jwt-duplicate-claim") from None
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise AuthFailure("jwt-malformed") from None
    if not isinstance(value, dict):
        raise AuthFailure("jwt-malformed")
    return value


def _split(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """Header, payload, signature and signing input (RFC 7515 5.2: the ASCII of
    `header.payload`) of a JWS compact serialization (RFC 7515 7.1: exactly three base64url
    parts; RFC 7519 7.2 steps 1-10). The JWE form (five parts) and the JSON serializations
    are not access tokens here."""
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthFailure("jwt-malformed")
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthFailure("jwt-malformed")
    header = _json_object(_b64decode(parts[0]))
    signature = _b64decode(parts[2])
    payload = _json_object(_b64decode(parts[1]))
    # the three parts are base64url, hence ASCII (the regex above checked)
    return header, payload, signature, f"{parts[0]}.{parts[1]}".encode("ascii")


def claim_path(claims: dict[str, Any], path: str) -> Any:
    """A claim by name, or by dotted path into nested objects (`realm_access.roles`). The
    exact name wins: namespaced claims are URLs full of dots
    (`https://example.com/roles`)."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def scopes_from(claims: dict[str, Any], names: Iterable[str]) -> frozenset[str]:
    """The first present scope claim: a space-separated string (RFC 8693 4.2, RFC 9068
    2.2.3) or an array of strings (`scp` of some issuers). Non-strings are ignored: an
    unexpected shape grants nothing rather than something."""
    for name in names:
        value = claim_path(claims, name)
        if value is None:
            continue
        if isinstance(value, str):
            return frozenset(value.split())
        if isinstance(value, list):
            return frozenset(item for item in value if isinstance(item, str) and item)
        return frozenset()
    return frozenset()


def roles_from(claims: dict[str, Any], paths: Iterable[str]) -> frozenset[str]:
    """The union of every present role claim (issuers spread roles over several claims:
    `realm_access.roles` and `resource_access.<client>.roles`). A string is ONE role and
    is not split: splitting "super admin" would grant "admin"."""
    roles: set[str] = set()
    for path in paths:
        value = claim_path(claims, path)
        if isinstance(value, str):
            if value:
                roles.add(value)
        elif isinstance(value, list):
            roles.update(item for item in value if isinstance(item, str) and item)
    return frozenset(roles)


def _number(claims: dict[str, Any], name: str) -> float | None:
    """A NumericDate claim (RFC 7519 2: seconds, fractions allowed), or None when absent.
    Booleans, strings and non-finite values are malformed, not "absent"."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthFailure("jwt-malformed")
    number = float(value)
    if not math.isfinite(number):
        raise AuthFailure("jwt-malformed")
    return number


class TokenVerifier:
    """Verifies the JWTs of one configured issuer; built once at startup.

    `keys` is the issuer's key set (`StaticKeys` for PEM/JWK files or a shared secret,
    `KeySource` for a remote JWKS); None builds `StaticKeys` from `settings` (the HS*
    shared secret or key files, relative to `source_dir`)."""

    def __init__(self, name: str, settings: Issuer, keys: KeyProvider | None, scheme: str,
                 *, source_dir: str | Path = ".") -> None:
        if not settings.algorithms:
            raise ValueError(f"issuer {name!r}: no JWS algorithms configured")
        if settings.check_audience and not settings.audiences:
            raise ValueError(f"issuer {name!r}: audiences are required (RFC 7519 4.1.3)")
        if keys is None:
            keys = StaticKeys(settings, source_dir, name=name)
        self.name = name
        self.scheme = scheme
        self.settings = settings
        self.keys = keys
        # `none` cannot be configured (config/) and is refused here again, in any case
        self._algorithms = frozenset(a for a in settings.algorithms if a.lower() != "none")
        self._issuer = settings.issuer if settings.check_issuer else None
        self._audiences = list(settings.audiences)  # empty: check_audience is false
        self._leeway = float(settings.leeway)
        self._max_lifetime = settings.max_lifetime
        required = list(dict.fromkeys(settings.required_claims))
        if settings.max_lifetime is not None:
            required += [claim for claim in ("iat", "exp") if claim not in required]
        self._required = tuple(required)
        self._subject_claim = settings.subject_claim
        self._scope_claims = tuple(settings.scope_claims)
        self._role_claims = tuple(settings.role_claims)
        # PyJWT's implementation of each allowed algorithm, looked up once
        self._verifiers = {alg: jwt.get_algorithm_by_name(alg) for alg in self._algorithms}

    def verify(self, token: str, now: float) -> Principal:
        """The Principal of a valid token, else `AuthFailure` (`UnknownKey` for a kid the
        key set lacks). Synchronous: a signature check is CPU work, never I/O."""
        header, claims, signature, signing_input = _split(token)

        alg = header.get("alg")
        # RFC 8725 3.1 / 2.1: the allow-list decides, exact match (no case folding:
        # "None", "NONE", "hs256" are not algorithms), and `none` is never in it.
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise AuthFailure("jwt-alg-not-allowed")
        if not _KEY_HEADERS.isdisjoint(header):
            raise AuthFailure("jwt-header-key")
        if "crit" in header:
            # RFC 7515 4.1.11: a recipient that does not understand an extension listed
            # in `crit` MUST reject the JWS. apishield understands none (b64=false and
            # friends change what is signed).
            raise AuthFailure("jwt-crit-unsupported")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in _ALLOWED_TYP):
            raise AuthFailure("jwt-bad-typ")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_CHARS):
            raise AuthFailure("jwt-malformed")  # RFC 7515 4.1.4: a string

        # A stripped (`header.payload.`) or wrong-size signature is refused before any key
        # lookup, so it cannot make the caller refetch keys for a made-up kid.
        sizes = _SIG_SIZES.get(alg)
        if not signature or (sizes is not None and len(signature) not in sizes):
            raise AuthFailure("jwt-bad-signature")

        key = self.keys.key_for(kid, alg)  # UnknownKey / jwt-no-keys / jwt-alg-not-allowed
        if not key_fits(alg, key):  # key providers check this too; defence in depth
            raise AuthFailure("jwt-alg-not-allowed")

        try:  # the algorithm is the allow-listed one, never derived from the key
            valid = self._verifiers[alg].verify(signing_input, key, signature)
        except (ValueError, TypeError, jwt.PyJWTError):
            valid = False
        if not valid:
            raise AuthFailure("jwt-bad-signature")

        # The signature is good: from here on the token says what its issuer said.
        self._check_claims(claims)
        subject = self._subject(claims)
        exp = _number(claims, "exp")
        nbf = _number(claims, "nbf")
        iat = _number(claims, "iat")
        leeway = self._leeway
        if exp is not None and now >= exp + leeway:  # RFC 7519 4.1.4
            raise AuthFailure("jwt-expired", subject=subject)
        if nbf is not None and now < nbf - leeway:  # RFC 7519 4.1.5
            raise AuthFailure("jwt-not-yet-valid", subject=subject)
        if iat is not None and iat > now + leeway:
            # RFC 7519 4.1.6 does not forbid it; a token from the future means a broken
            # clock or a forged-in-advance token, and it would defeat max_lifetime.
            raise AuthFailure("jwt-issued-in-future", subject=subject)
        if self._max_lifetime is not None:
            if exp is None or iat is None:
                missing = "exp" if exp is None else "iat"
                raise AuthFailure(f"jwt-missing-claim:{missing}", subject=subject)
            if exp - iat > self._max_lifetime:
                # A3: a stolen token is useful until `exp`; an issuer minting year-long
                # tokens is refused even though it signed them.
                raise AuthFailure("jwt-lifetime-too-long", subject=subject)
        if subject is None:
            raise AuthFailure(f"jwt-missing-claim:{self._subject_claim}")

        return Principal(
            scheme=self.scheme,
            subject=subject,
            scopes=scopes_from(claims, self._scope_claims),
            roles=roles_from(claims, self._role_claims),
            issuer=self.name,
            claims=claims,
            expires_at=exp,
        )

    def _check_claims(self, claims: dict[str, Any]) -> None:
        """Presence of the required claims, `iss`, `aud`, and the types RFC 7519 gives
        `sub` and `jti` (the semantics of PyJWT's checks, which the tests pin down). A
        missing claim is named in the reason (`jwt-missing-claim:aud`): the security event
        says what the issuer left out; the client still sees the same 401."""
        for name in self._required:
            if claims.get(name) is None:
                raise AuthFailure(f"jwt-missing-claim:{name}")
        if self._issuer is not None:  # None: check_issuer is false (RFC 7519 4.1.1:
            iss = claims.get("iss")  # the use of iss is application specific)
            if iss is None:
                raise AuthFailure("jwt-missing-claim:iss")
            # RFC 7519 4.1.1 / OIDC Core 3.1.3.7: exact string comparison (no prefix, no
            # case folding, no trailing-slash normalization, not "contained in")
            if not isinstance(iss, str) or iss != self._issuer:
                raise AuthFailure("jwt-wrong-issuer")
        aud = claims.get("aud")
        if self._audiences or aud is not None:
            # With check_audience: false a token may carry no `aud`; one that does is still
            # refused unless it names us (RFC 7519 4.1.3: MUST be rejected), and with no
            # audiences configured none can.
            if not aud:
                raise AuthFailure("jwt-missing-claim:aud")
            # RFC 7519 4.1.3: a string or an array of strings; one of them must be ours
            audiences = [aud] if isinstance(aud, str) else aud
            if not isinstance(audiences, list) or not all(isinstance(a, str)
                                                          for a in audiences):
                raise AuthFailure("jwt-wrong-audience")
            if not any(a in audiences for a in self._audiences):
                raise AuthFailure("jwt-wrong-audience")
        for name in ("sub", "jti"):  # RFC 7519 4.1.2, 4.1.7: StringOrURI / string
            if name in claims and not isinstance(claims[name], str):
                raise AuthFailure("jwt-malformed")

    def _subject(self, claims: dict[str, Any]) -> str | None:
        """The subject claim as a string (an integer user id is accepted and stringified;
        an object or a boolean is not an identity)."""
        value = claim_path(claims, self._subject_claim)
        if isinstance(value, str):
            return value or None
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return None

