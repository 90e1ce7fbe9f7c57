"""HTTP Basic (RFC 7617) against apishield's user store: parsing, Argon2id hashing, and
verification that never runs on the event loop (issue 16).

A password check is memory-hard on purpose (Argon2id, about 25 ms and 19 MiB at the
default cost), so an attacker who copies the store cannot test guesses cheaply. That cost
must not land on the gateway's event loop, nor let a flood of wrong passwords take every
CPU. So:

- **Off the loop.** A cache miss raises `Suspend`; the pipeline awaits `verify`, which
  runs the check on a dedicated pool of `max_concurrent` threads (argon2-cffi releases
  the GIL while hashing), then reruns the step, which finds the outcome on its `Attempt`
  (the Suspend's owner, kept on the exchange as `waited_for`).
- **Bounded.** At most `max_concurrent` checks run and `max_waiting` more wait for a
  thread; any attempt beyond that is answered 503 with `Retry-After: 1` at once (the
  gateway's capacity is spent, not this caller's quota, so 503 rather than 429). Checks for
  one user name run one at a time with at most one more waiting (`MAX_PER_USER`), so a
  flood of guesses against one account holds one thread and cannot fill the line; the
  same header sent by many requests at once is checked once (they share
  the in-flight check).
- **Cached.** An outcome is remembered keyed by HMAC-SHA256 of the whole header value
  under a random per-process key: never the password, and useless outside this process.
  A success for `cache_ttl` (a client sending the same header on every request costs one
  check per ttl), a failure for `failure_ttl` (replaying a wrong header costs one check per
  ttl). A write to the store (rotate, revoke, from any process) clears both.
- **No user enumeration by timing.** An unknown user is checked against a dummy hash of
  the configured cost; the password is checked before revocation and expiry are looked at,
  so those are only reported (privately) to someone who knows the password.

The private reasons (`basic-malformed`, `basic-unknown-user`, `basic-wrong-password`,
`basic-revoked`, `basic-expired`) go to the security event; the client sees one 401.
The user name is the failure's subject (for `by: subject` ban rules and the event) only
when the user exists: a name that matches no user may be a password typed in the wrong
field, and is never logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from apishield.auth.principal import AuthFailure, Principal
from apishield.problems import Problem, ServiceUnavailable
from apishield.state.users import UserRecord, UserStore, UserStoreError

if TYPE_CHECKING:
    from apishield.config import Argon2, Basic

logger = logging.getLogger("apishield")

MAX_NAME = 200  # characters of a user name
MIN_PASSWORD = 12  # characters of a password given to `users create --password-stdin`
MAX_PASSWORD = 1024  # bytes; longer is refused before any hashing
GENERATED_BYTES = 24  # `users create` without a password: 192 random bits, 32 characters
DEFAULT_MAX_ENTRIES = 10_000  # per cache (successes, failures)
RETRY_AFTER = b"1"
# checks of one user name running or waiting: a flood of guesses against one account holds
# one thread and one place in the line, not the whole pool
MAX_PER_USER = 2

Outcome = Principal | AuthFailure | Problem
_V = TypeVar("_V")


def hasher(params: Argon2) -> PasswordHasher:
    """An Argon2id hasher with the configured cost (16-byte salt, 32-byte hash)."""
    return PasswordHasher(time_cost=params.time_cost, memory_cost=params.memory_kib,
                          parallelism=params.parallelism, hash_len=32, salt_len=16,
                          type=Type.ID)


def hash_password(password: str, params: Argon2) -> str:
    """The PHC string stored for `password` (`$argon2id$v=19$m=...,t=...,p=...$...`)."""
    return hasher(params).hash(password)


def generate_password() -> str:
    return secrets.token_urlsafe(GENERATED_BYTES)


def check_user_name(name: str) -> str:
    """A name a client can send: RFC 7617 forbids `:` and control characters in the
    user-id; at most 200 characters."""
    if not name:
        raise ValueError("the user name must not be empty")
    if len(name) > MAX_NAME:
        raise ValueError(f"the user name is longer than {MAX_NAME} characters")
    if ":" in name:
        raise ValueError("the user name must not contain ':' (RFC 7617: Basic cannot send it)")
    if any(ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 for char in name):
        raise ValueError("the user name must not contain control characters")
    if name != name.strip():
        raise ValueError("the user name must not start or end with a space")
    return name


def check_password(password: str) -> str:
    """A password chosen by someone (`--password-stdin`): long enough to resist guessing
    within the ban rules' budget, short enough to hash, no control characters."""
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"the password is shorter than {MIN_PASSWORD} characters")
    if len(password.encode("utf-8")) > MAX_PASSWORD:
        raise ValueError(f"the password is longer than {MAX_PASSWORD} bytes")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in password):
        raise ValueError("the password must not contain control characters")
    return password


def parse_basic(token: str) -> tuple[str, str]:
    """`(user, password)` from the base64 part of `Authorization: Basic ...`;
    `AuthFailure("basic-malformed")` unless it is strict base64 of UTF-8
    `user-id ":" password` with a non-empty user-id without control characters."""
    try:
        raw = base64.b64decode(token, validate=True)
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        raise AuthFailure("basic-malformed") from None
    user, colon, password = text.partition(":")
    if not colon or not user or len(user) > MAX_NAME or len(raw) > MAX_PASSWORD + MAX_NAME \
            or any(ord(char) < 0x20 or ord(char) == 0x7F for char in user):
        raise AuthFailure("basic-malformed")
    return user, password


class Attempt:
    """One request's wait for a check: the `Suspend` owner, so the step's rerun finds the
    outcome here even when the cache could not keep it (a 503 is never cached)."""

    __slots__ = ("key", "outcome")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.outcome: Outcome | None = None


class Busy(Exception):
    """Every thread is busy and the waiting line is full."""


class PasswordPool:
    """The threads Argon2 runs on, shared by every Basic scheme of a gateway: at most
    `max_concurrent` checks at once, `max_waiting` waiting, one at a time per user (and
    at most `MAX_PER_USER` running or waiting)."""

    def __init__(self, settings: Basic) -> None:
        self.max_concurrent = settings.max_concurrent
        self.max_waiting = settings.max_waiting
        self.params = settings.argon2
        self._hasher = hasher(settings.argon2)
        self._executor: ThreadPoolExecutor | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self.pending = 0  # checks running or waiting
        self._users: dict[str, tuple[asyncio.Lock, int]] = {}
        self._dummy: str | None = None
        self._dummy_lock = threading.Lock()

    async def run(self, user: str, check: Callable[[], Outcome]) -> Outcome:
        """`check()` on a pool thread, after the user's earlier checks; `Busy` at once
        when the pool and its waiting line are full."""
        lock, holders = self._users.get(user, (None, 0))
        if self.pending >= self.max_concurrent + self.max_waiting or holders >= MAX_PER_USER:
            raise Busy
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.max_concurrent,
                                                thread_name_prefix="apishield-basic")
            self._semaphore = asyncio.Semaphore(self.max_concurrent)
        executor, semaphore = self._executor, self._semaphore
        assert semaphore is not None
        if lock is None:
            lock = asyncio.Lock()
        self._users[user] = (lock, holders + 1)
        self.pending += 1
        try:
            async with lock, semaphore:
                return await asyncio.get_running_loop().run_in_executor(executor, check)
        finally:
            self.pending -= 1
            lock, holders = self._users[user]
            if holders == 1:
                del self._users[user]
            else:
                self._users[user] = (lock, holders - 1)

    def matches(self, stored: str | None, password: str) -> bool:
        """Whether `password` matches the PHC string `stored` (in a pool thread). None:
        an unknown user, checked against a dummy hash of the configured cost so that the
        answer takes as long as for a real user."""
        if stored is None:
            with self._dummy_lock:
                if self._dummy is None:
                    self._dummy = self._hasher.hash(secrets.token_urlsafe(16))
                stored = self._dummy
            try:
                self._hasher.verify(stored, password)
            except VerificationError:
                pass
            return False
        try:
            return self._hasher.verify(stored, password)
        except VerifyMismatchError:
            return False
        except (VerificationError, InvalidHashError):
            logger.error("a stored Basic password hash is not a valid Argon2 PHC string; "
                         "rotate that user's password (apishield users rotate)")
            return False

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


class BasicVerifier:
    """One Basic scheme's view of the user store: the outcome caches and the checks.

    `cached` runs on the event loop (a dict lookup); `verify` is what the pipeline awaits
    on a miss. `UserStoreError` becomes a 503 (`user-store-unavailable`): the store could not
    answer, so neither a 401 (it is not the caller's fault) nor a pass."""

    def __init__(self, store: UserStore, pool: PasswordPool, settings: Basic, scheme: str, *,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.store = store
        self.pool = pool
        self.scheme = scheme
        self.cache_ttl = settings.cache_ttl
        self.failure_ttl = settings.failure_ttl
        self.max_entries = max_entries
        self._key = secrets.token_bytes(32)  # this process only: cache keys mean nothing outside
        self._successes: dict[bytes, tuple[Principal, float]] = {}
        self._failures: dict[bytes, tuple[AuthFailure, float]] = {}
        self._inflight: dict[bytes, asyncio.Future[Outcome]] = {}
        self.checks = 0  # password checks run (tests, metrics)

    def cache_key(self, credential: str) -> bytes:
        return hmac.new(self._key, credential.encode("latin-1"), hashlib.sha256).digest()

    def cached(self, key: bytes, now: float) -> Principal | AuthFailure | None:
        entry = self._successes.get(key)
        if entry is not None:
            principal, until = entry
            if now < until:
                if principal.expires_at is not None and now >= principal.expires_at:
                    self._successes.pop(key, None)
                    return AuthFailure("basic-expired", subject=principal.subject)
                return principal
            self._successes.pop(key, None)
        failed = self._failures.get(key)
        if failed is not None:
            failure, until = failed
            if now < until:
                return AuthFailure(failure.reason, subject=failure.subject)
            self._failures.pop(key, None)
        return None

    async def verify(self, attempt: Attempt, user: str, password: str) -> None:
        """Check `user:password` off the loop and leave the outcome on `attempt` (and in
        the cache). Never raises: the pipeline's `wait` contract."""
        key = attempt.key
        shared = self._inflight.get(key)
        if shared is not None:  # the same header is being checked for another request
            try:
                attempt.outcome = await asyncio.shield(shared)
                return
            except asyncio.CancelledError:
                if not shared.cancelled():
                    raise  # this request itself was cancelled
                # the request running it went away (client gone): check here instead
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            outcome = await self._check(user, password)
        except BaseException:
            future.cancel()
            raise
        finally:
            del self._inflight[key]
        future.set_result(outcome)
        attempt.outcome = outcome
        now = time.time()
        if isinstance(outcome, Principal):
            self._remember(self._successes, key, (outcome, now + self.cache_ttl))
        elif isinstance(outcome, AuthFailure):
            self._remember(self._failures, key, (outcome, now + self.failure_ttl))

    async def _check(self, user: str, password: str) -> Outcome:
        try:
            outcome = await self.pool.run(user, lambda: self._check_sync(user, password))
        except Busy:
            return ServiceUnavailable("basic-busy", headers=[(b"retry-after", RETRY_AFTER)])
        except UserStoreError:
            logger.exception("user store unavailable")
            return ServiceUnavailable("user-store-unavailable")
        except Exception:  # a bug must not leave the request waiting or pass it
            logger.exception("Basic password check failed")
            return ServiceUnavailable("basic-check-failed")
        self.checks += 1
        return outcome

    def _check_sync(self, user: str, password: str) -> Outcome:
        """In a pool thread: the store read and the Argon2 check."""
        record: UserRecord | None = self.store.get(user)
        if record is None:
            self.pool.matches(None, password)  # the same work as for a real user
            return AuthFailure("basic-unknown-user")
        if not self.pool.matches(record.hash, password):
            return AuthFailure("basic-wrong-password", subject=record.name)
        if record.revoked_at is not None:
            return AuthFailure("basic-revoked", subject=record.name)
        if record.expires_at is not None and time.time() >= record.expires_at:
            return AuthFailure("basic-expired", subject=record.name)
        return Principal(scheme=self.scheme, subject=record.name,
                         scopes=frozenset(record.scopes), roles=frozenset(record.roles),
                         expires_at=record.expires_at)

    def _remember(self, cache: dict[bytes, _V], key: bytes, value: _V) -> None:
        if len(cache) >= self.max_entries:
            cache.pop(next(iter(cache)), None)  # the oldest: bounded memory under junk
        cache[key] = value

    def clear(self) -> None:
        """Forget every outcome (the store changed: a rotation or revocation)."""
        self._successes.clear()
        self._failures.clear()

    def __len__(self) -> int:
        return len(self._successes) + len(self._failures)
