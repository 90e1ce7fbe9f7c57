"""Verifying a presented API key on the gateway's hot path (A4, G2).

`verify` is synchronous and cheap on the common path: a strict parse, one SHA-256 of the
60-character key, one dict lookup and an expiry test. Only a cache miss reads the store
(one indexed SQLite row) and computes the HMAC.

Revocation must not wait for `cache_ttl`: the gateway calls `poll()` about once a second
and, when the store reports a write by anyone else (the CLI revoking or rotating a key),
the whole cache is dropped. Clearing everything is simpler and safer than tracking which
entry a write touched, and writes are rare. Expiry needs no poll: every `verify`, cached or
not, compares `now` with the key's expiry.
"""

from __future__ import annotations

import hashlib

from apishield.auth.apikeys import key_matches, parse_key
from apishield.auth.principal import AuthFailure, Principal
from apishield.state.keys import KeyStore

DEFAULT_MAX_ENTRIES = 10_000

_CacheKey = tuple[str, bytes]


class ApiKeyVerifier:
    """Presented key -> `Principal`, or `AuthFailure` with a precise private reason:
    api-key-malformed, api-key-unknown, api-key-mismatch, api-key-revoked, api-key-expired.

    The cache is keyed by (record id, SHA-256 of the presented key): a hit proves the same
    key string was verified against the store less than `cache_ttl` ago, without keeping the
    key itself in memory. Failures are not cached: each costs one indexed store read, and
    a 256-bit secret cannot be guessed however many reads an attacker buys; request rate
    limiting bounds that load.

    `KeyStoreError` from the store propagates: the caller answers 503, never 401 and never
    a pass."""

    def __init__(self, store: KeyStore, pepper: bytes, cache_ttl: float, scheme: str, *,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.store = store
        self.scheme = scheme
        self.cache_ttl = cache_ttl
        self.max_entries = max_entries
        self._pepper = pepper
        # insertion-ordered: when full, the oldest entry goes (bounded memory under junk
        # traffic made of many valid keys is not a concern; a bound is)
        self._cache: dict[_CacheKey, tuple[Principal, float]] = {}

    def verify(self, presented: str, now: float) -> Principal:
        """The caller behind `presented`, checked at wall-clock time `now` (epoch seconds)."""
        key_id = parse_key(presented)
        cache_key = (key_id, hashlib.sha256(presented.encode("ascii")).digest())
        entry = self._cache.get(cache_key)
        if entry is not None:
            principal, cached_until = entry
            if now < cached_until:
                if principal.expires_at is not None and now >= principal.expires_at:
                    self._cache.pop(cache_key, None)
                    raise AuthFailure("api-key-expired", subject=principal.subject,
                                      key_id=key_id)
                return principal
            self._cache.pop(cache_key, None)
        principal = self._check_store(key_id, presented, now)
        if len(self._cache) >= self.max_entries:
            self._cache.pop(next(iter(self._cache)), None)
        self._cache[cache_key] = (principal, now + self.cache_ttl)
        return principal

    def _check_store(self, key_id: str, presented: str, now: float) -> Principal:
        record = self.store.get(key_id)
        if record is None:
            raise AuthFailure("api-key-unknown", key_id=key_id)
        # The hash first: revoked/expired are only reported for the real key, not for
        # anyone who knows (or guesses) an id.
        if not key_matches(self._pepper, presented, record.hash):
            raise AuthFailure("api-key-mismatch", key_id=key_id)
        if record.revoked_at is not None:
            raise AuthFailure("api-key-revoked", subject=record.name, key_id=key_id)
        if record.expires_at is not None and now >= record.expires_at:
            raise AuthFailure("api-key-expired", subject=record.name, key_id=key_id)
        return Principal(
            scheme=self.scheme,
            subject=record.name,
            scopes=frozenset(record.scopes),
            roles=frozenset(record.roles),
            key_id=record.id,
            expires_at=record.expires_at,
        )

    def poll(self) -> bool:
        """Drop the cache if the store was written by another process or connection since
        the last poll; True when it was. Call about once a second. If the store cannot be
        asked, the cache is dropped too (fail closed) and the error propagates."""
        try:
            changed = self.store.changed()
        except BaseException:
            self._cache.clear()
            raise
        if changed:
            self._cache.clear()
        return changed

    def clear(self) -> None:
        """Forget every cached verification (e.g. after this process wrote to the store)."""
        self._cache.clear()

    def __len__(self) -> int:
        """Cached entries (for tests and metrics)."""
        return len(self._cache)
