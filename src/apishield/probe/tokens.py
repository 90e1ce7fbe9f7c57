"""Forged bearer tokens (RFC 7519 JWTs), one per known way a verifier goes wrong.

The probe holds no signing key, so every token here must be refused; what each one tests
is which check refuses it. With a real token from `--identity`, the tampered, expired and
bad-signature tokens are that token edited (its real header, issuer and audience), so only
the edited part is wrong; without one they are built from the config's issuer. The
signature bytes are fixed, not random: the same plan every run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

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
    decoded = decode_jwt(real) if real else None
    if decoded is not None:
        header, claims, signature = decoded
        algorithm = str(header.get("alg", algorithm))
    else:
        header = {"alg": algorithm, "typ": "JWT"}
        claims = {"sub": "apishield-probe", "iat": now, "exp": now + 300}
        if issuer:
            claims["iss"] = issuer
        if audience:
            claims["aud"] = audience
        signature = b64url(_FAKE_SIGNATURE[:64 if algorithm.startswith("ES") else 256])
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
