"""Opaque access tokens, asked to the issuer: OAuth 2.0 Token Introspection (RFC 7662,
checklist A2).

`cached(token, now)` is the synchronous hot path; `introspect(token, now)` is the rare
I/O (a POST with the gateway's client credentials), run by the pipeline's suspension.

Choices, and why:
- Fail closed: an unreachable, slow or confused introspection endpoint means
  `introspection-unavailable` (401), never "let it through".
- Only `"active": true` (the JSON boolean) is active (RFC 7662 2.2); anything else is
  `token-inactive`. `iss`, `aud` and `exp` are still checked when present: an
  introspection endpoint shared by several resource servers answers "active" for tokens
  minted for the others.
- Answers are cached by SHA-256(token), never the token: an active one until
  min(now + cache_ttl, exp) (RFC 7662 4: a cache must not outlive the token), an inactive
  one for `inactive_ttl` (10 s) so a replayed junk token costs one call per 10 s. Both are
  bounded (least recently used evicted).
- Concurrent requests with the same uncached token share one call (single-flight), and
  at most `max_concurrency` calls run at once: a burst does not become a burst on the IdP
  or exhaust the worker threads.
- The client secret is read once at build (env or file) and only ever goes into the
  `Authorization` header; log lines carry the issuer name, a status or an exception class.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import ssl
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote_plus, urlencode, urlsplit

from apishield.auth.jwks import FetchError, fetch_json, read_secret
from apishield.auth.jws import claim_path, roles_from, scopes_from
from apishield.auth.principal import AuthFailure, Principal

if TYPE_CHECKING:
    from apishield.config import Issuer

__all__ = ["MAX_RESPONSE_BYTES", "Introspector"]

logger = logging.getLogger("apishield")
_Entry = TypeVar("_Entry")  # a cached answer: (Principal, until) or (reason, until)

MAX_RESPONSE_BYTES = 64 * 1024  # an introspection answer is a few hundred bytes
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _key(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Introspector:
    """RFC 7662 introspection for one configured issuer (`settings.introspection`)."""

    def __init__(self, name: str, settings: Issuer, scheme: str,
                 source_dir: str | Path = ".", *, ssl_context: ssl.SSLContext | None = None,
                 max_entries: int = 10_000, inactive_ttl: float = 10.0,
                 max_concurrency: int = 16) -> None:
        if settings.introspection is None:
            raise ValueError(f"issuer {name!r}: no introspection configured")
        config = settings.introspection
        self.name = name
        self.scheme = scheme
        self.settings = settings
        self.url = config.url
        self.timeout = float(config.timeout)
        self.cache_ttl = float(config.cache_ttl)
        self.inactive_ttl = inactive_ttl
        self.max_entries = max_entries
        self.context = ssl_context if ssl_context is not None else ssl.create_default_context()
        secret = read_secret(config.client_secret, source_dir,
                             what=f"issuer {name!r}: introspection.client_secret")
        # RFC 6749 2.3.1: client id and secret are form-urlencoded, then HTTP Basic
        credentials = f"{quote_plus(config.client_id)}:{quote_plus(secret.decode('utf-8'))}"
        self._authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
        parts = urlsplit(self.url)
        if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
            logger.warning("issuer %r: introspection over plain http sends the client "
                           "credentials and tokens unencrypted; use https", name)
        self._active: OrderedDict[bytes, tuple[Principal, float]] = OrderedDict()
        self._inactive: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[Principal]] = {}
        self._limit = asyncio.Semaphore(max_concurrency)

    # -- hot path ------------------------------------------------------------------------

    def cached(self, token: str, now: float) -> Principal | None:
        """The cached Principal of an active token; None when nothing is cached (then
        call `introspect`). A cached negative answer raises its `AuthFailure` right away."""
        return self._lookup(_key(token), now)

    def _lookup(self, key: bytes, now: float) -> Principal | None:
        hit = self._active.get(key)
        if hit is not None:
            if hit[1] > now:
                self._active.move_to_end(key)
                return hit[0]
            del self._active[key]
        miss = self._inactive.get(key)
        if miss is not None:
            if miss[1] > now:
                raise AuthFailure(miss[0])
            del self._inactive[key]
        return None

    # -- I/O -----------------------------------------------------------------------------

    async def introspect(self, token: str, now: float) -> Principal:
        """Ask the issuer (or join the call in progress for the same token). Raises
        `AuthFailure`: token-inactive, token-expired, token-wrong-issuer,
        token-wrong-audience, token-missing-subject, introspection-unavailable."""
        key = _key(token)
        principal = self._lookup(key, now)
        if principal is not None:
            return principal
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._call(token, key, now))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    async def _call(self, token: str, key: bytes, now: float) -> Principal:
        body = urlencode({"token": token, "token_type_hint": "access_token"}).encode()
        headers = {"Authorization": self._authorization,
                   "Content-Type": "application/x-www-form-urlencoded"}
        try:
            async with self._limit:
                answer, _ = await asyncio.to_thread(
                    fetch_json, self.url, timeout=self.timeout, context=self.context,
                    max_bytes=MAX_RESPONSE_BYTES, data=body, headers=headers,
                    accept=("application/json", "application/token-introspection+json"))
        except FetchError as exc:
            logger.warning("issuer %r: token introspection failed: %s", self.name, exc)
            raise AuthFailure("introspection-unavailable") from None
        if not isinstance(answer, dict):
            logger.warning("issuer %r: token introspection answered a non-object", self.name)
            raise AuthFailure("introspection-unavailable")
        try:
            principal, until = self._principal(answer, now)
        except AuthFailure as failure:
            self._remember(self._inactive, key, (failure.reason, now + self.inactive_ttl))
            raise
        self._remember(self._active, key, (principal, until))
        return principal

    def _remember(self, table: OrderedDict[bytes, _Entry], key: bytes, value: _Entry) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.max_entries:
            table.popitem(last=False)

    def _principal(self, answer: dict[str, Any], now: float) -> tuple[Principal, float]:
        """The Principal of an active answer and how long it may be cached."""
        if answer.get("active") is not True:
            raise AuthFailure("token-inactive")
        settings = self.settings
        iss = answer.get("iss")
        if iss is not None and iss != settings.issuer:
            raise AuthFailure("token-wrong-issuer")
        aud = answer.get("aud")
        if aud is not None and settings.audiences:
            auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if not any(isinstance(a, str) and a in settings.audiences for a in auds):
                raise AuthFailure("token-wrong-audience")
        exp = _number(answer.get("exp"))
        nbf = _number(answer.get("nbf"))
        subject = _subject(answer, settings.subject_claim)
        leeway = float(settings.leeway)
        if exp is not None and now >= exp + leeway:
            raise AuthFailure("token-expired", subject=subject)
        if nbf is not None and now < nbf - leeway:
            raise AuthFailure("token-not-yet-valid", subject=subject)
        if subject is None:
            raise AuthFailure("token-missing-subject")
        until = now + self.cache_ttl
        if exp is not None:
            until = min(until, exp)
        principal = Principal(
            scheme=self.scheme,
            subject=subject,
            scopes=scopes_from(answer, settings.scope_claims),
            roles=roles_from(answer, settings.role_claims),
            issuer=self.name,
            claims=answer,
            expires_at=exp,
        )
        return principal, until


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _subject(answer: dict[str, Any], claim: str) -> str | None:
    """The configured subject claim, else RFC 7662's `username`, else `client_id` (a
    client-credentials token has no user)."""
    for name in (claim, "username", "client_id"):
        value = claim_path(answer, name)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    return None
