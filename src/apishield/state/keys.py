"""What an API-key store holds and must do, independent of the backend.

The protocol is deliberately narrow (single-record reads and compare-and-set writes, plus a
cheap change probe) so that a Redis backend can implement it with plain commands: the
gateway's hot path only ever calls `get` (on a cache miss) and `changed` (about once a
second, from `ApiKeyVerifier.poll`).
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Literal, Protocol

KeyState = Literal["active", "rotating", "expired", "revoked"]


class KeyStoreError(Exception):
    """The store cannot be read or written (disk error, locked for too long, corrupt).

    Distinct from "no such key" (`get` returns None): the gateway must answer 503 here,
    never 401, and never fall back to accepting a key it could not check."""


class DuplicateKeyId(KeyStoreError):
    """`create` was given an id that already exists (a 60-bit random id collided, or a
    record was inserted twice); the caller draws a new id."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One issued API key. The key itself is never stored: only `hash`, an
    HMAC-SHA256 under the pepper (see `apishield.auth.apikeys`), which is useless without
    the pepper and cannot be turned back into the key."""

    id: str  # public record id, the `<id>` part of `ask_<id>_<secret>`
    name: str  # the owner; becomes Principal.subject
    hash: bytes = field(repr=False)  # never in a repr, so never in a log line by accident
    scopes: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    created_at: float = 0.0  # epoch seconds
    expires_at: float | None = None  # epoch seconds; None = never (discouraged)
    revoked_at: float | None = None
    rotated_to: str | None = None  # id of the key that replaced this one (grace period)

    def state(self, now: float) -> KeyState:
        """What `keys list` shows; revocation wins over expiry, expiry over rotation."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        if self.rotated_to is not None:
            return "rotating"
        return "active"


class KeyStore(Protocol):
    """Storage for `KeyRecord`s. Methods are synchronous: the SQLite backend answers an
    indexed read in microseconds, and the verifier caches, so the event loop is not held."""

    def create(self, record: KeyRecord) -> None:
        """Insert a new record; `DuplicateKeyId` if its id exists."""
        ...

    def get(self, key_id: str) -> KeyRecord | None:
        """The record with this id, or None."""
        ...

    def list(self) -> builtins.list[KeyRecord]:
        """Every record, oldest first (for `keys list`; not on the hot path)."""
        ...

    def revoke(self, key_id: str, at: float) -> bool:
        """Mark the key revoked at `at`. False if there is no such key or it was already
        revoked (the first revocation time is kept)."""
        ...

    def set_expiry(self, key_id: str, expires_at: float | None, rotated_to: str | None) -> bool:
        """Compare-and-set used by rotation: set the expiry and successor of a key that is
        neither revoked nor already rotated. False otherwise (unknown, revoked, rotated),
        so two concurrent rotations cannot both win."""
        ...

    def changed(self) -> bool:
        """Whether another process or connection wrote since the last call (or since the
        store was opened). Must be cheap: it is polled about once a second."""
        ...

    def close(self) -> None:
        """Release the connection; idempotent."""
        ...
