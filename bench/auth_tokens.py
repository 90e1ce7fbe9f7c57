#!/usr/bin/env python3
"""Key material and JWTs for `bench/run --only auth` (run with the venv's python: it needs
PyJWT and cryptography, which the stdlib-only harness must not import).

Writes into --dir:

  jwks.json          the public keys, as a JWK Set: an RSA 2048 key (kid bench-rs256) and a
                     P-256 key (kid bench-es256). The gateway's issuer reads it as a static
                     key file (`auth.issuers.<name>.keys: [jwks.json]`): no issuer server.
  token-hit.txt      one RS256 token (auth_jwt_hit sends it on every request)
  tokens-rs256.txt   --count distinct RS256 tokens, one a line (auth_jwt_miss_rs256)
  tokens-es256.txt   --count distinct ES256 tokens, one a line (auth_jwt_miss_es256)

Every token: `iss`, `aud`, `sub` (user-NNNNNN, fixed width so every token has the same
length), `scope`, `iat` = now, `exp` = now + --lifetime (1 h: under the issuer's default
`max_lifetime` of 24 h). They differ only by `sub`, so each is a distinct cache key.

Prints one JSON object on stdout: the files, counts, token lengths and minting times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

KIDS = {"RS256": "bench-rs256", "ES256": "bench-es256"}


def public_jwk(key, alg: str) -> dict:
    algorithm = RSAAlgorithm if alg == "RS256" else ECAlgorithm
    jwk = algorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid=KIDS[alg], alg=alg, use="sig")
    return jwk


def mint(key, alg: str, subjects: range, claims: dict) -> list[str]:
    headers = {"kid": KIDS[alg], "typ": "JWT"}
    return [jwt.encode({**claims, "sub": f"user-{i:06d}"}, key, algorithm=alg, headers=headers)
            for i in subjects]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--issuer", required=True)
    ap.add_argument("--audience", required=True)
    ap.add_argument("--count", type=int, default=12_000,
                    help="distinct tokens per algorithm for the miss targets (default 12000)")
    ap.add_argument("--lifetime", type=int, default=3600, help="exp - iat, seconds")
    ap.add_argument("--algorithms", default="RS256,ES256",
                    help="which miss token lists to write (default RS256,ES256)")
    args = ap.parse_args(argv)
    wanted = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    for alg in wanted:
        if alg not in KIDS:
            ap.error(f"unknown algorithm {alg!r}; use {', '.join(KIDS)}")
    args.dir.mkdir(parents=True, exist_ok=True)

    keys = {"RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ES256": ec.generate_private_key(ec.SECP256R1())}
    (args.dir / "jwks.json").write_text(json.dumps(
        {"keys": [public_jwk(keys[alg], alg) for alg in KIDS]}, indent=2) + "\n")

    now = int(time.time())
    claims = {"iss": args.issuer, "aud": args.audience, "scope": "items:read",
              "iat": now, "exp": now + args.lifetime}
    report: dict = {"dir": str(args.dir), "iat": now, "exp": now + args.lifetime,
                    "files": {"jwks": "jwks.json"}, "count": args.count, "mint_seconds": {}}

    hit = mint(keys["RS256"], "RS256", range(999_999, 1_000_000), claims)[0]
    (args.dir / "token-hit.txt").write_text(hit + "\n")
    report["files"]["hit"] = "token-hit.txt"
    report["token_bytes"] = {"hit_rs256": len(hit)}

    for alg in wanted:
        t0 = time.perf_counter()
        tokens = mint(keys[alg], alg, range(args.count), claims)
        report["mint_seconds"][alg] = round(time.perf_counter() - t0, 2)
        assert len(set(tokens)) == len(tokens)
        name = f"tokens-{alg.lower()}.txt"
        (args.dir / name).write_text("\n".join(tokens) + "\n")
        report["files"][alg] = name
        report["token_bytes"][alg.lower()] = len(tokens[0])
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
