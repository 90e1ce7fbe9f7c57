"""Whether an HMAC secret is too weak to trust a token signed with it (A1, C4).

An HS256 token is as strong as its secret: whoever guesses the secret mints any token.
Three ways a secret is weak, checked once at load:
- shorter than the hash output (RFC 7518 3.2: "a key of the same size as the hash output
  or larger MUST be used"),
- one that documentation publishes (data/weak_jwt_secrets.txt: jwt.io's
  `your-256-bit-secret`, framework quick starts), or
- long but made of few distinct characters (`aaaa...`, `1212...`): its length overstates
  it; estimated from the character frequencies, under 64 bits is weak.
"""

from __future__ import annotations

import math
from collections import Counter
from functools import cache
from importlib.resources import files

from apishield.auth.jwa import HMAC_SIZES

MIN_ESTIMATED_BITS = 64


@cache
def known_weak() -> frozenset[str]:
    text = files("apishield.auth").joinpath("data/weak_jwt_secrets.txt").read_text("utf-8")
    return frozenset(line.strip().lower() for line in text.splitlines()
                     if line.strip() and not line.startswith("#"))


def estimated_bits(secret: bytes) -> float:
    """Shannon entropy of the secret's own byte frequencies times its length: an upper
    bound for a random secret, a fair alarm for a patterned one."""
    if not secret:
        return 0.0
    total = len(secret)
    per_byte = -sum(n / total * math.log2(n / total) for n in Counter(secret).values())
    return per_byte * total


def weakness(secret: bytes, algorithms: tuple[str, ...]) -> str | None:
    """Why `secret` is weak for these algorithms, or None."""
    need = max((HMAC_SIZES[alg] for alg in algorithms if alg in HMAC_SIZES), default=0)
    if len(secret) < need:
        alg = next(a for a in algorithms if HMAC_SIZES.get(a) == need)
        return (f"is {len(secret)} bytes; {alg} needs at least {need} (the hash output "
                "size, RFC 7518 3.2)")
    if secret.decode("utf-8", "replace").strip().lower() in known_weak():
        return "is a well-known secret published in documentation and examples"
    bits = estimated_bits(secret)
    if bits < MIN_ESTIMATED_BITS:
        return (f"repeats a few characters (about {bits:.0f} bits estimated, under "
                f"{MIN_ESTIMATED_BITS})")
    return None
