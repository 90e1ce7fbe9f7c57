"""Verified tokens and recent failures, in memory, bounded (checklist A1, hot path).

A signature check costs tens of microseconds (RS256 ~30 us, ES256 ~60 us, measured in
`bench/jwt_verify.py`); a client sends the same token on every request until it expires.
So a verified token's `Principal` is kept until the token's `exp`, and the request pays a
SHA-256 and a dict lookup instead.

Choices, and why:
- Keyed by SHA-256(token), never the token: a heap dump, a debugger or a core file must
  not hand out working bearer credentials, and the key has a fixed size (32 bytes) however
  large the token is. A collision would need a second preimage of SHA-256.
- An entry never outlives the token: `get` treats `expires_at <= now` as a miss and drops
  it. A token without `exp` is kept `max_ttl` at most, so a revoked key is not trusted
  from memory forever.
- Bounded (`max_entries`), least recently used evicted first (an `OrderedDict`: O(1)
  lookup, move and eviction): a flood of distinct valid tokens cannot grow memory, and
  the tokens in use stay cached.
- `evict_kids`: when an issuer's key disappears from its JWKS (rotation after a
  compromise), tokens signed with it must stop working now, not at their `exp`. It scans
  the entries: key removal happens a few times a year, and an index would cost every
  `put` for a rare event.
- Failures are cached briefly (`failure_ttl`, 10 s), under the same hashed key: a client
  replaying a junk or expired token pays one signature check per 10 s, not per request.
  Reasons that depend on the key set (`jwt-unknown-kid`, `jwt-no-keys`) are not cached:
  they cost no signature check, and the keys may arrive a moment later.

Single-threaded by design: it is used from the event loop only.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import NamedTuple

from apishield.auth.principal import Principal

__all__ = ["UNCACHED_FAILURES", "TokenCache"]

# Failures a refetch of the issuer's keys may turn into successes within seconds.
UNCACHED_FAILURES = frozenset({"jwt-unknown-kid", "jwt-no-keys"})


class _Entry(NamedTuple):
    principal: Principal
    issuer: str | None
    kid: str | None
    expires_at: float  # epoch seconds


def _key(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenCache:
    """Principals of verified tokens and reasons of recent failures, by token hash."""

    def __init__(self, max_entries: int = 10_000, failure_ttl: float = 10.0, *,
                 max_ttl: float = 300.0) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.failure_ttl = failure_ttl
        self.max_ttl = max_ttl  # for a token without `exp`
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._failures: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str, now: float) -> Principal | None:
        """The cached Principal of `token`, or None (unknown or expired: removed)."""
        key = _key(token)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry.principal

    def put(self, token: str, principal: Principal, issuer: str | None, kid: str | None,
            *, now: float | None = None) -> None:
        """Remember a verified token until its `expires_at` (`max_ttl` from `now`, default
        the wall clock, when it has none); evicts the least recently used entry when
        full."""
        if now is None:
            now = time.time()
        expires_at = principal.expires_at
        if expires_at is None:
            expires_at = now + self.max_ttl
        key = _key(token)
        self._entries[key] = _Entry(principal, issuer, kid, expires_at)
        self._entries.move_to_end(key)
        self._failures.pop(key, None)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def put_failure(self, token: str, reason: str, now: float) -> None:
        """Remember that `token` failed, for `failure_ttl` (reasons in UNCACHED_FAILURES
        are ignored: see the module docstring)."""
        if reason in UNCACHED_FAILURES or self.failure_ttl <= 0:
            return
        key = _key(token)
        self._failures[key] = (reason, now + self.failure_ttl)
        self._failures.move_to_end(key)
        while len(self._failures) > self.max_entries:
            self._failures.popitem(last=False)

    def failure(self, token: str, now: float) -> str | None:
        """The reason `token` failed recently, or None."""
        key = _key(token)
        found = self._failures.get(key)
        if found is None:
            return None
        if found[1] <= now:
            del self._failures[key]
            return None
        return found[0]

    def evict_kids(self, issuer: str | None, kids: Iterable[str]) -> int:
        """Drop the tokens of `issuer` signed with any of `kids`; returns how many."""
        kids = set(kids)
        if not kids:
            return 0
        doomed = [key for key, entry in self._entries.items()
                  if entry.issuer == issuer and entry.kid in kids]
        for key in doomed:
            del self._entries[key]
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()
        self._failures.clear()
