"""JSON Web Algorithms (RFC 7518): which key each algorithm takes, and the failure of a
key lookup. Shared by the key sets (`jwks.py`) and the verifier (`jws.py`), which
therefore do not import each other both ways.
"""

from __future__ import annotations

from typing import TypeAlias

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from apishield.auth.principal import AuthFailure

_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
# HS* keys must be at least the hash size (RFC 7518 3.2)
HMAC_SIZES = {"HS256": 32, "HS384": 48, "HS512": 64}

# A public key apishield verifies with (RSA, EC P-256/384/521, Ed25519/Ed448).
PublicKey: TypeAlias = (rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
                        | ed448.Ed448PublicKey)
# What a key set hands the verifier: a public key, or the shared secret's bytes for HS*.
VerifyKey: TypeAlias = PublicKey | bytes


class UnknownKey(AuthFailure):
    """The token names a `kid` the current key set does not hold. The caller may
    `await keys.refresh_for_unknown(kid)` (bounded by a cooldown) and verify once more."""

    def __init__(self, kid: str) -> None:
        super().__init__("jwt-unknown-kid")
        self.kid = kid


def key_fits(alg: str, key: VerifyKey) -> bool:
    """Whether `key` is of the type `alg` is defined for (RFC 7518 3.1, RFC 8037 3.1):
    RSA for RS*/PS*, EC on the algorithm's own curve for ES*, Ed25519/Ed448 for EdDSA, a
    byte string for HS*. The defence against key confusion (RFC 8725 2.1): an RSA public
    key is never handed to HMAC as a secret, a P-256 key never verifies ES512."""
    family = alg[:2]
    if family in ("RS", "PS"):
        return isinstance(key, rsa.RSAPublicKey)
    if family == "ES":
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _EC_CURVES.get(
            alg)
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    if family == "HS":
        return isinstance(key, bytes)
    return False
