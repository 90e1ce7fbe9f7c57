"""What a user store (HTTP Basic credentials, issue 16) holds and must do, independent of
the backend: the twin of `state.keys` for passwords.

A user is found by name (the `user-id` of RFC 7617), so the name is the record's key. The
password itself is never stored: only its Argon2id hash as a PHC string
(`$argon2id$v=19$m=...,t=...,p=...$salt$hash`), which carries its own parameters, so they
can be raised later without a schema change: `users rotate` hashes with the current ones.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Literal, Protocol

UserState = Literal["active", "expired", "revoked"]


class UserStoreError(Exception):
    """The store cannot be read or written. Distinct from "no such user" (`get` returns
    None): the gateway answers 503 here, never 401 and never a pass."""


class DuplicateUser(UserStoreError):
    """`create` was given the name of a user that exists and is not revoked."""


@dataclass(frozen=True, slots=True)
class UserRecord:
    """One Basic user. `hash` is never in a repr, so never in a log line by accident."""

    name: str  # the RFC 7617 user-id; becomes Principal.subject
    hash: str = field(repr=False)  # Argon2id PHC string
    scopes: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    created_at: float = 0.0  # epoch seconds
    expires_at: float | None = None  # the password's end; None = never
    revoked_at: float | None = None
    changed_at: float = 0.0  # the last password change (create or rotate)

    def state(self, now: float) -> UserState:
        """What `users list` shows; revocation wins over expiry."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"


class UserStore(Protocol):
    """Storage for `UserRecord`s, with the key store's shape: single-record reads,
    compare-and-set writes and a cheap change probe (polled about once a second)."""

    def create(self, record: UserRecord) -> None:
        """Insert a user, or replace a revoked one of the same name; `DuplicateUser` if a
        user of that name exists and is not revoked."""
        ...

    def get(self, name: str) -> UserRecord | None:
        """The user with this name, or None."""
        ...

    def list(self) -> builtins.list[UserRecord]:
        """Every user, oldest first (for `users list`; not on the hot path)."""
        ...

    def set_password(self, name: str, password_hash: str, at: float,
                     expires_at: float | None) -> bool:
        """Compare-and-set used by rotation: a new hash and expiry for a user that is not
        revoked. False otherwise (unknown or revoked)."""
        ...

    def revoke(self, name: str, at: float) -> bool:
        """Mark the user revoked at `at`. False if unknown or revoked already (the first
        revocation time is kept)."""
        ...

    def changed(self) -> bool:
        """Whether another process or connection wrote since the last call."""
        ...

    def close(self) -> None:
        """Release the connection; idempotent."""
        ...
