"""Who a request is from, once a credential has been verified, and why one was refused."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True, eq=False)
class Principal:
    """A verified caller. Built once per verified credential and cached with it, so the
    hot path reuses one object per token or key instead of rebuilding it. Compared and
    hashed by identity (`eq=False`): memos keyed by it (identity headers) then cost a
    pointer hash instead of hashing every field on each request (bench/RESULTS.md)."""

    scheme: str  # the securityScheme that authenticated it
    subject: str  # `sub` of a token, the owner name of an API key
    scopes: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    key_id: str | None = None  # API key record id
    issuer: str | None = None  # the configured issuer's name (tokens)
    claims: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    expires_at: float | None = None  # epoch seconds; the cache never keeps it past this


class AuthFailure(Exception):
    """A credential was presented and is not valid. `reason` is precise and private
    (`jwt-expired`, `jwt-bad-signature`, `api-key-revoked`, ...): it goes to the security
    event and the access log, never to the client, who sees one generic 401 for every
    reason (no oracle)."""

    def __init__(self, reason: str, *, subject: str | None = None,
                 key_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.subject = subject  # when known (e.g. an expired but well-signed token)
        self.key_id = key_id
