"""The lease client shared by the counters backends that keep the truth elsewhere: Redis
(`redis_counters`, the module docstring there has the design, its accuracy bound and its
cost) and the supervisor of `apishield serve --workers N` (`local_leases`).

A backend is this class plus one method, `_execute(calls) -> results`: a batch of the four
operations (RATE_LEASE, RATE_RELEASE, QUOTA_LEASE, QUOTA_RELEASE) evaluated atomically,
one after the other, on the server's clock, each answering what the Lua scripts of
`redis_counters` answer. Everything else (leases, slow start, refill ahead, single flight,
cached refusals, one batch per event-loop tick, outages) is here, once, so both backends
decide alike and the bound proven for Redis holds for both.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Sequence
from typing import Any

from apishield.state.counters import Decision, StoreOutage, StoreUnavailable

LEASE_TTL = 1.0  # seconds a lease may be spent before its unspent tokens go back
DOWN_FOR = 1.0  # seconds `prepare` fails fast after a store error
SATURATED_BATCH = 0.01  # after a refusal, wait until this much of the rate fits
QUOTA_RECHECK = 1.0  # seconds a quota refusal is answered locally before asking again
QUOTA_SLACK = 3600  # seconds a quota key outlives its period (clock skew allowance)

_mono = time.monotonic

RATE_LEASE, RATE_RELEASE, QUOTA_LEASE, QUOTA_RELEASE = range(4)
ScriptArgs = tuple[str | int, ...]  # the arguments of one operation (floats go as repr())
Call = tuple[int, str, ScriptArgs]  # (operation, key name, arguments)


class _Lease:
    """This gateway's share of one key: tokens already counted on the server."""

    __slots__ = (
        "flight", "granted_at", "granted_tokens", "interval", "least", "limit", "low",
        "period", "refused_until", "reset_at", "size", "state", "store_key", "tokens",
        "valid_until", "waiting",
    )

    def __init__(self, store_key: str, interval: float, limit: int, period: float) -> None:
        self.store_key = store_key
        self.interval = interval  # rate limits: seconds per token (0 for quotas)
        self.limit = limit  # burst (rate) or limit (quota)
        self.period = period  # quotas: the period's end (epoch seconds), part of the key
        self.tokens = 0  # unspent, already reserved on the server
        self.valid_until = 0.0  # monotonic: unspent tokens go back after this
        self.granted_at = -math.inf  # monotonic time of the last grant
        self.granted_tokens = 0  # tokens held right after the last grant
        self.state = 0.0  # rate: the server's TAT (monotonic); quota: used after last grant
        self.refused_until = 0.0  # monotonic: answer refusals locally until then
        self.reset_at = 0.0  # rate: the server's TAT as last seen, for local refusals
        self.size = 1  # tokens the next lease asks for (slow start up to n)
        self.low = -1  # refill ahead at or below this many tokens (-1: never)
        self.least = 1  # tokens that must fit for a grant (>1 only while saturated)
        self.flight: asyncio.Future[None] | None = None  # the lease request in flight
        self.waiting = 0  # callers in `prepare` for this key right now


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a background refill's error as seen (it already opened the circuit)."""
    if not future.cancelled():
        future.exception()


class LeaseCounters:
    """The `Counters` protocol with local leases of tokens counted by a server (see
    `redis_counters` for the design and its accuracy bound). `take` and `count` ignore
    the caller's `now` for lease timing (the server's clock decides; local timing is
    `time.monotonic()`); `count` uses `now` only against `expires_at`, which is in the
    same (epoch) clock. Subclasses implement `_execute` and `_disconnect`."""

    def __init__(self, where: str, *, lease_fraction: float = 0.02,
                 lease_ttl: float = LEASE_TTL, down_for: float = DOWN_FOR,
                 salt: bytes = b"", password: str = "") -> None:
        if not 0 < lease_fraction <= 0.5:
            raise ValueError("lease_fraction must be in (0, 0.5]")
        self._lease_fraction = lease_fraction
        self._lease_ttl = lease_ttl
        self._down_for = down_for
        self._salt = salt[:64]
        self._rate: dict[str, _Lease] = {}
        self._quota: dict[str, _Lease] = {}
        self._calls: list[tuple[int, _Lease, ScriptArgs, bool]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._down_until = 0.0
        self._down_reason = ""
        self.round_trips = 0  # batches sent (for tests and the bench)
        self._password = password  # masked out of every logged reason
        self.outage = StoreOutage(where)  # the rate-limit step counts into it

    async def _execute(self, calls: Sequence[Call]) -> list[Any]:
        """Run every call, in order, atomically each, on the server; one result per call:
        the operation's answer (a list of ints) or an Exception the server answered with.
        Raise (OSError, TimeoutError, the client's own errors) when there is no answer."""
        raise NotImplementedError

    async def _disconnect(self) -> None:
        """Close the connection to the server (after `close` gave the tokens back)."""
        raise NotImplementedError

    server_name = "the lease server"  # in the reason of an error the server answered
    # Errors `close` ignores while giving tokens back (they come back on their own).
    _close_errors: tuple[type[BaseException], ...] = (OSError, TimeoutError)

    def _masked(self, text: str) -> str:
        """An error message fit for a log: no password, not a page long."""
        if self._password:
            text = text.replace(self._password, "***")
        return text[:300]

    # ------------------------------------------------------------------ hot path
    def take(self, key: str, interval: float, burst: int, now: float) -> Decision | None:
        lease = self._rate.get(key)
        if lease is None:
            return None
        mono = _mono()
        tokens = lease.tokens
        if tokens and mono < lease.valid_until:
            tokens -= 1
            lease.tokens = tokens
            if tokens <= lease.low and lease.flight is None:
                self._refill_ahead(lease, mono)
            # As if the unspent tokens were not reserved: what this request leaves.
            ahead = lease.state - tokens * interval - mono
            if ahead < interval:
                ahead = interval
            remaining = int((burst * interval - ahead) / interval + 1e-9)
            return Decision(True, burst, remaining if remaining > 0 else 0, ahead, 0.0)
        if mono < lease.refused_until:
            reset = lease.reset_at - mono
            return Decision(False, burst, 0, reset if reset > 0 else 0.0,
                            lease.refused_until - mono)
        if tokens:
            self._expire(lease)
        return None

    def count(self, key: str, limit: int, expires_at: float, now: float) -> Decision | None:
        lease = self._quota.get(key)
        if lease is None or (lease.period != expires_at
                             and abs(lease.period - expires_at) > 0.001):
            return None
        mono = _mono()
        tokens = lease.tokens
        if tokens and mono < lease.valid_until:
            tokens -= 1
            lease.tokens = tokens
            if tokens <= lease.low and lease.flight is None:
                self._refill_ahead(lease, mono)
            remaining = limit - int(lease.state) + tokens
            return Decision(True, limit, remaining if remaining > 0 else 0,
                            expires_at - now, 0.0)
        if mono < lease.refused_until:
            return Decision(False, limit, 0, expires_at - now, expires_at - now)
        if tokens:
            self._expire(lease)
        return None

    # ------------------------------------------------------------------ I/O
    async def prepare(self, key: str, interval: float, burst: int) -> None:
        lease = self._rate.get(key)
        if lease is None:
            lease = self._rate[key] = _Lease(self._name("rl", key), interval, burst, 0.0)
        elif lease.interval != interval or lease.limit != burst:  # the config changed
            lease.interval, lease.limit = interval, burst
        await self._prepare(lease)

    async def prepare_count(self, key: str, limit: int, expires_at: float) -> None:
        lease = self._quota.get(key)
        if lease is None or abs(lease.period - expires_at) > 0.001:
            if lease is not None and lease.tokens:
                self._expire(lease)  # the old period's tokens go back (harmless if ended)
            name = f"{self._name('q', key)}:{round(expires_at * 1000)}"
            lease = self._quota[key] = _Lease(name, 0.0, limit, expires_at)
        lease.limit = limit
        await self._prepare(lease)

    async def _prepare(self, lease: _Lease) -> None:
        """Return once `take`/`count` can answer for this caller: a token of a lease, or
        a refusal. Concurrent callers share one request, which asks for a token for each
        of them (they spend it at once, so it is never held) or the lease size if more;
        if others were quicker to spend the answer, ask again. The caller must take right
        after this returns, without awaiting in between (the pipeline does)."""
        lease.waiting += 1
        try:
            while True:
                mono = _mono()
                if (lease.tokens and mono < lease.valid_until) or mono < lease.refused_until:
                    return
                flight = lease.flight
                if flight is None:
                    if mono < self._down_until:
                        raise StoreUnavailable(self._down_reason)
                    if mono - lease.granted_at < self._lease_ttl / 2:
                        lease.size = min(self._max_lease(lease), lease.size * 2)  # ran out fast
                    flight = self._request(lease)
                try:
                    await flight
                except asyncio.CancelledError:
                    # Awaiting the shared future directly (asyncio.shield costs an extra
                    # loop iteration per round trip), a waiter that is cancelled cancels it
                    # for everyone. The others, not cancelled themselves, wait on a
                    # replacement: the batch resolves whichever future the lease holds.
                    task = asyncio.current_task()
                    if task is None or task.cancelling():
                        raise
                    if lease.flight is flight:
                        lease.flight = asyncio.get_running_loop().create_future()
        finally:
            lease.waiting -= 1

    def _max_lease(self, lease: _Lease) -> int:
        return lease_size(lease.limit, self._lease_fraction)

    def _refill_ahead(self, lease: _Lease, mono: float) -> None:
        """Half spent: lease more in the background if, at the pace since the last grant,
        the tokens left would run out before the lease expires (a slow key does not)."""
        if lease.least > 1 or mono < lease.refused_until or mono < self._down_until:
            return  # saturated, refused or down: a refill now would gain nothing
        spent = lease.granted_tokens - lease.tokens
        if spent * (lease.valid_until - mono) < lease.tokens * (mono - lease.granted_at):
            return
        lease.size = min(self._max_lease(lease), lease.size * 2)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # called outside an event loop: nothing to refill with
            return
        self._request(lease).add_done_callback(_retrieve)

    def _request(self, lease: _Lease) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lease.flight = future
        self._enqueue(RATE_LEASE if lease.interval else QUOTA_LEASE, lease, (), True)
        return future

    @staticmethod
    def _lease_args(lease: _Lease) -> ScriptArgs:
        """A lease request's arguments, built when its pipeline is sent, so that callers
        who joined the flight in the meantime are counted in `want`."""
        want = min(lease.limit, max(lease.size, lease.waiting))
        if lease.interval:
            return (repr(lease.interval * 1e6), lease.limit, want, lease.least)
        return (lease.limit, want, int((lease.period + QUOTA_SLACK) * 1000))

    def _expire(self, lease: _Lease) -> None:
        """The lease lived out its time unspent: give the tokens back, lease less."""
        tokens, lease.tokens = lease.tokens, 0
        lease.size = max(1, lease.size // 2)
        lease.low = lease.size // 2 if lease.size >= 2 else -1
        if _mono() < self._down_until:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        if lease.interval:
            self._enqueue(RATE_RELEASE, lease, (repr(tokens * lease.interval * 1e6),), False)
        else:
            self._enqueue(QUOTA_RELEASE, lease, (tokens,), False)

    def _name(self, kind: str, key: str) -> str:
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16,
                                 key=self._salt).hexdigest()
        return f"apishield:{kind}:{digest}"

    def _enqueue(self, script: int, lease: _Lease, args: ScriptArgs,
                 reply: bool) -> None:
        """Queue one script call; `reply`: a lease request, whose answer resolves the
        lease's flight (a release is fire-and-forget)."""
        self._calls.append((script, lease, args, reply))
        if self._flusher is None:
            # The task starts on the next loop iteration: every call made in this tick
            # joins the same pipeline.
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._calls:
                batch, self._calls = self._calls, []
                await self._send(batch)
        finally:
            self._flusher = None
            if self._calls:  # cancelled (loop shutting down): nobody will send these
                calls, self._calls = self._calls, []
                self._fail(calls, StoreUnavailable("lease counters: flusher cancelled"))

    @staticmethod
    def _fail(batch: list[tuple[int, _Lease, ScriptArgs, bool]],
              error: StoreUnavailable) -> None:
        for _script, lease, _args, reply in batch:
            if not reply:
                continue  # a release: its lease may have a flight in another batch
            future, lease.flight = lease.flight, None
            if future is not None and not future.done():
                future.set_exception(error)

    async def _send(self, batch: list[tuple[int, _Lease, ScriptArgs, bool]]) -> None:
        try:
            if _mono() < self._down_until:
                raise StoreUnavailable(self._down_reason)
            results = await self._execute([
                (script, lease.store_key, self._lease_args(lease) if reply else args)
                for script, lease, args, reply in batch])
        except BaseException as exc:
            # Every waiter must hear something, whatever went wrong (a waiter on a future
            # nobody resolves would hang its request). Only a cancellation goes on up.
            if not isinstance(exc, StoreUnavailable):
                self._down_until = _mono() + self._down_for
                self._down_reason = self._masked(f"{type(exc).__name__}: {exc}")
                if isinstance(exc, Exception):
                    self.outage.down(self._down_reason)
            self._fail(batch, StoreUnavailable(self._down_reason))
            if isinstance(exc, Exception):
                return
            raise
        received = _mono()
        refused = next((result for result in results if isinstance(result, Exception)), None)
        if refused is None:
            self.outage.up()
        else:  # it answers, with errors (out of memory, read-only replica, ...)
            self.outage.down(self._masked(f"{self.server_name} refused: {refused}"))
        for (script, lease, _args, reply), result in zip(batch, results, strict=True):
            if not reply:
                continue  # a release: nothing to learn
            future, lease.flight = lease.flight, None
            if isinstance(result, Exception):
                if future is not None and not future.done():
                    future.set_exception(StoreUnavailable(
                        self._masked(f"{self.server_name} refused: {result}")))
                continue
            if script == RATE_LEASE:
                self._granted_rate(lease, result, received)
            else:
                self._granted_quota(lease, result, received)
            if future is not None and not future.done():
                future.set_result(None)

    def _granted_rate(self, lease: _Lease, result: list[int], received: float) -> None:
        granted, ahead_us = int(result[0]), int(result[1])
        if granted:
            interval, ahead = lease.interval, ahead_us / 1e6
            lease.state = lease.reset_at = received + ahead
            lease.refused_until = 0.0
            if lease.limit - ahead / interval >= lease.size:
                lease.least = 1
            else:
                # Less than another lease left on the server: the key is saturated. No
                # refill runs ahead (it would find a token or two), and once these
                # tokens are spent, refusals are answered locally until a batch worth
                # ~10 ms of the rate fits, instead of asking just to hear "not yet".
                lease.least = self._saturated_batch(lease)
                fits_in = ahead - lease.limit * interval + lease.least * interval
                if fits_in > 0:
                    lease.refused_until = received + fits_in
            self._add_tokens(lease, granted, received)
        else:
            lease.reset_at = received + ahead_us / 1e6
            lease.refused_until = received + int(result[2]) / 1e6
            lease.least = self._saturated_batch(lease)

    def _saturated_batch(self, lease: _Lease) -> int:
        """Tokens worth ~10 ms of the rate (at most a lease): at saturation a key then
        costs ~100 round trips a second per gateway, not one per admitted request (when
        the round trip is longer than the interval, every ask would find a token or two)."""
        return min(self._max_lease(lease), max(1, math.ceil(SATURATED_BATCH / lease.interval)))

    def _granted_quota(self, lease: _Lease, result: list[int], received: float) -> None:
        granted, used = int(result[0]), int(result[1])
        lease.state = float(used)
        if granted:
            self._add_tokens(lease, granted, received)
            lease.refused_until = 0.0
        else:
            lease.refused_until = received + QUOTA_RECHECK

    def _add_tokens(self, lease: _Lease, granted: int, received: float) -> None:
        if received >= lease.valid_until and lease.tokens:
            self._expire(lease)  # the old tokens' time is up: they go back first
        lease.tokens += granted
        lease.granted_tokens = lease.tokens
        lease.granted_at = received
        lease.valid_until = received + self._lease_ttl
        lease.low = lease.size // 2 if lease.size >= 2 else -1

    # ------------------------------------------------------------------ upkeep
    def sweep(self, now: float) -> None:
        """Drop leases that no longer answer anything; give back expired tokens."""
        mono = _mono()
        for leases in (self._rate, self._quota):
            for key, lease in list(leases.items()):
                if lease.flight is not None or mono < lease.refused_until:
                    continue
                if mono < lease.valid_until and lease.tokens:
                    continue
                if lease.tokens:
                    self._expire(lease)
                if mono - lease.granted_at >= self._lease_ttl:
                    del leases[key]

    async def close(self) -> None:
        """Give back every unspent token (best effort, one pipeline), then disconnect."""
        if self._flusher is not None:  # requests in flight land first
            await asyncio.gather(self._flusher, return_exceptions=True)
        calls = [(RATE_RELEASE if lease.interval else QUOTA_RELEASE, lease.store_key,
                  (repr(lease.tokens * lease.interval * 1e6),) if lease.interval
                  else (lease.tokens,))
                 for leases in (self._rate, self._quota) for lease in leases.values()
                 if lease.tokens and _mono() < lease.valid_until]
        if calls and _mono() >= self._down_until:
            try:
                await self._execute(calls)
            except self._close_errors:
                pass  # the tokens come back on their own when their TAT passes
        self._rate.clear()
        self._quota.clear()
        await self._disconnect()

def lease_size(limit: int, lease_fraction: float) -> int:
    """The largest lease of a key: n = max(1, floor(limit * lease_fraction))."""
    return max(1, int(limit * lease_fraction))
