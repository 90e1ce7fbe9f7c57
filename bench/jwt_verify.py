#!/usr/bin/env python3
"""What a bearer token costs on the hot path (issue 3, A1): stdlib timing only.

Measures, per operation, the median over `--repeat` runs of `--number` calls each:
- a token-cache hit (`TokenCache.get`: SHA-256 of the token + dict lookup);
- a full verification on a cache miss (`TokenVerifier.verify`): RS256 (RSA-2048),
  ES256 (P-256) and EdDSA (Ed25519), apishield's pre-checks included;
- the pre-checks alone (compact form, strict base64url, duplicate-free JSON, header);
- a junk token (valid header, tampered payload, RS256): verified every time (no failure
  cache) vs answered from the failure cache (`TokenCache.failure`).

    .venv/bin/python bench/jwt_verify.py [--repeat 7] [--number 2000]
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from apishield.auth import jws
from apishield.auth.jws import TokenVerifier
from apishield.auth.principal import AuthFailure
from apishield.auth.token_cache import TokenCache
from apishield.config import Issuer

ISSUER = "https://idp.example.test/realms/main"
AUDIENCE = "https://api.example.test"


def _pem(private: Any) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


def _claims() -> dict[str, Any]:
    """A realistic access token body (~600 bytes of JSON: Keycloak-like)."""
    now = int(time.time())
    return {
        "iss": ISSUER, "aud": [AUDIENCE, "account"], "sub": "f1d2d2f9-24c1-4b8a-9e0c-0d1e2f3a4b5c",
        "iat": now, "exp": now + 3600, "jti": "3c9b6c2e-6d8e-4b77-8a50-1f0e2d3c4b5a",
        "azp": "web-frontend", "typ": "Bearer", "sid": "a5b6c7d8-e9f0-4a1b-8c2d-3e4f5a6b7c8d",
        "scope": "openid profile email orders:read orders:write",
        "realm_access": {"roles": ["offline_access", "uma_authorization", "customer"]},
        "resource_access": {"account": {"roles": ["manage-account", "view-profile"]}},
        "email_verified": True, "name": "Alice Example", "preferred_username": "alice",
        "email": "alice@example.test",
    }


def _verifier(alg: str, private: Any, folder: Path) -> tuple[TokenVerifier, str]:
    path = folder / f"{alg}.pem"
    path.write_bytes(_pem(private))
    settings = Issuer.model_validate({
        "issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": [alg], "keys": [path.name],
        "role_claims": ["realm_access.roles", "resource_access.account.roles"]})
    verifier = TokenVerifier("idp", settings, None, "bearer", source_dir=folder)
    token = jwt.encode(_claims(), private, algorithm=alg, headers={"kid": f"{alg}-1"})
    verifier.verify(token, time.time())  # must be valid
    return verifier, token


def measure(fn: Callable[[], object], number: int, repeat: int) -> float:
    """Median microseconds per call."""
    fn()
    runs = timeit.repeat(fn, number=number, repeat=repeat)
    return statistics.median(runs) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=2000)
    args = parser.parse_args()
    n, r = args.number, args.repeat

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rs_verifier, rs_token = _verifier(
            "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048), folder)
        es_verifier, es_token = _verifier("ES256", ec.generate_private_key(ec.SECP256R1()),
                                          folder)
        ed_verifier, ed_token = _verifier("EdDSA", ed25519.Ed25519PrivateKey.generate(),
                                          folder)

    now = time.time()
    cache = TokenCache()
    cache.put(rs_token, rs_verifier.verify(rs_token, now), "idp", "RS256-1")
    assert cache.get(rs_token, now) is not None

    head, _, signature = rs_token.split(".")
    tampered = dict(_claims(), sub="admin")
    junk = f"{head}.{base64.urlsafe_b64encode(json.dumps(tampered).encode()).rstrip(b'=').decode()}"
    junk += f".{signature}"

    def junk_uncached() -> None:
        try:
            rs_verifier.verify(junk, now)
        except AuthFailure:
            pass
        else:
            raise AssertionError("the junk token verified")

    failures = TokenCache()
    failures.put_failure(junk, "jwt-bad-signature", now)

    def junk_cached() -> None:
        if failures.get(junk, now) is None and failures.failure(junk, now) is None:
            raise AssertionError("not cached")

    rows = [
        ("token cache hit (get)", lambda: cache.get(rs_token, now), n * 10),
        ("pre-checks only (parse + header)", lambda: jws._split(rs_token), n * 5),
        ("verify RS256 (RSA-2048), cache miss", lambda: rs_verifier.verify(rs_token, now), n),
        ("verify ES256 (P-256), cache miss", lambda: es_verifier.verify(es_token, now), n),
        ("verify EdDSA (Ed25519), cache miss", lambda: ed_verifier.verify(ed_token, now), n),
        ("junk RS256 token, no failure cache", junk_uncached, n),
        ("junk RS256 token, failure cached", junk_cached, n * 10),
    ]
    print(f"token: RS256 {len(rs_token)} bytes, ES256 {len(es_token)} bytes; "
          f"median of {r} runs")
    print(f"{'operation':<40} {'us/op':>10} {'ops/s':>12}")
    for label, fn, number in rows:
        us = measure(fn, number, r)
        print(f"{label:<40} {us:>10.2f} {1e6 / us:>12,.0f}")


if __name__ == "__main__":
    main()
