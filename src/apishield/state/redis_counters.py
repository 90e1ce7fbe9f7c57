"""Counters shared by every gateway through Redis (`state: redis://...`), without a Redis
round trip per request.

Why leases: one redis-py round trip costs 110-160 us of client CPU (PERF-BASELINE), which
would cap a worker near 7k rps. So the truth lives in Redis, but a gateway *leases* a few
tokens of a key at a time in one atomic Lua script and spends them locally: a lease hit is
a dict lookup and some arithmetic (~1 us, like `MemoryCounters`), and Redis is asked again
only when the lease runs low.

Rate limits (GCRA, as in `counters.gcra`): the script runs on the server's clock
(`TIME`), so gateways' clocks never matter. It grants k = min(want, what fits now) tokens
by advancing the key's TAT by k * interval (a reservation: other gateways see the tokens
as used), or refuses and says when `least` tokens will fit. Quotas: the script INCRBYs the
period's counter by k = min(want, limit - used). Unspent tokens are given back (TAT moved
back, or DECRBY) when a lease expires, on `sweep` and on `close`.

Hot path, all synchronous (`take` / `count`): spend a token of an unexpired lease; or
answer a cached refusal until its retry time (a client hammering a refused key costs no
I/O); or return None, and the caller awaits `prepare` (one round trip, shared by every
concurrent caller of that key, asking for a token for each of them: single flight) and
asks again; `prepare` returns only once that second ask will be answered. When a lease is half spent
and would run out before it expires, a refill starts in the background, so steady traffic
almost never waits. Every script call of one event-loop tick goes out in one pipeline,
and while a pipeline is in flight the next calls queue for the next one.

Lease sizes: at most n = max(1, floor(burst * lease_fraction)) tokens (quotas:
floor(limit * lease_fraction)). A key starts with leases of 1 and doubles the size while
its leases run out quickly (TCP-like slow start); it halves when a lease expires unspent.
So a key that sees one request now and then never holds tokens it will not use, and a hot
key reaches n after log2(n) round trips. Once a key is saturated (refused, or a grant left
less than another lease on the server) the gateway answers refusals locally until `least`
= min(n, ceil(10 ms / interval)) tokens fit, then asks again: a saturated key costs about
max(100, rate / n) round trips a second per gateway, not one per admitted request (nor one
per round-trip time, which is what "grant whatever fits" would cost when T < the RTT).

Accuracy bound (G gateways sharing a key, n as above, T = interval, b = burst):

- A gateway holds at most L = n + n // 2 unspent tokens (it refills only at <= half).
  Every token was granted by the server's GCRA, which grants at most b + W / T in any
  window of W seconds; tokens spent in a window were granted in it or held at its start.
  So admissions in any window <= b + W / T + G * L. Over-admission is at most G * L
  tokens, e.g. 3% of the burst per gateway with the default lease_fraction 0.02, and it
  does not grow with the window or with the lease lifetime. Quotas never over-admit (the
  INCRBY is capped at the limit).
- Under-admission: tokens leased but not yet spent are unavailable to other gateways:
  at most G * L at any instant, each for at most `lease_ttl` (1 s) before it is given
  back. A saturated gateway waits for `least` tokens, so it may admit up to least - 1
  (< 10 ms worth of the rate) later than an exact limiter.
- A single gateway therefore admits within L + least tokens of an exact GCRA over any
  window; with bursts under 1 / lease_fraction (n = 1) it decides like `MemoryCounters`,
  request by request (to within a round trip's timing, and the microsecond to which the
  server stores TAT).
- Measured (tests/test_redis_counters.py, hammered by 20 tasks per process): one process
  at 1,000/s (burst 1,000) admits 0.3% under the exact figure over 2 s; two processes at
  1,000/s admitted 0.3% under over 3 s on a quiet machine, but 9% under while the rest of
  the suite shared the two cores (the clients could not offer the rate), so the test runs
  them at 250/s; two gateways holding full leases when the bucket has refilled admit
  exactly burst + 2 * L.
- If Redis loses a key (restart, eviction) it forgets what was used: the limit starts full.

Cost (bench/counters_bench.py, client CPU per decision, memory = 1.0): a lease hit 1.03x,
a cached refusal 0.9x; the step's whole loop on a hot key with refills included 1.1x at
n = 2,000, 1.5x at n = 200, 6.6x (+7 us) at n = 20; leases of 1 for 64 keys at once,
pipelined, ~25 us; one round trip per decision (what this avoids) ~110 us.

Store errors: calls time out after `timeout` (250 ms; connection refused fails at once),
`prepare` then raises `StoreUnavailable` and keeps failing fast for `down_for` (1 s)
instead of paying a timeout per request; the next call after that tries again and
redis-py reconnects on its own, reloading the scripts if the server lost them (NOSCRIPT).
Leases held when Redis goes down are still spent (they were granted). The outage is
logged once (`StoreOutage`, `self.outage`): when a round trip fails, then a count every
5 s of the requests `on_store_error` decided, then when a round trip succeeds again; the
URL in those lines is redacted and the reason has the password masked.

Topologies (`redis_urls`): a single server, Sentinel (the master, followed across a
failover) or a Cluster. Every script touches one key (KEYS[1]), so on a Cluster each
call runs on the node of its key's slot, and redis-py's cluster pipeline splits a tick's
pipeline per node; missing scripts are loaded on every primary.

Keys: `apishield:rl:<h>` and `apishield:q:<h>:<period end, ms>`, where h is a 16-byte
BLAKE2b of the caller's key (IPs and identities: nothing personal in clear, and long
identities do not bloat Redis; pass `salt` so that hashed IPv4 addresses cannot be
reversed by enumeration). Rate keys expire when their bucket is full again; quota keys an
hour after their period ends (the period is in the name, so a gateway whose clock is a few
seconds off never reopens a spent period).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from apishield.config.redis_urls import (
    StateUrlError,
    async_client,
    is_cluster_url,
    parse_state_url,
    redact_url,
)
from apishield.state.counters import Decision, StoreOutage, StoreUnavailable

LEASE_TTL = 1.0  # seconds a lease may be spent before its unspent tokens go back
DOWN_FOR = 1.0  # seconds `prepare` fails fast after a store error
SATURATED_BATCH = 0.01  # after a refusal, wait until this much of the rate fits
QUOTA_RECHECK = 1.0  # seconds a quota refusal is answered locally before asking again
QUOTA_SLACK = 3600  # seconds a quota key outlives its period (clock skew allowance)

_mono = time.monotonic

# KEYS[1] = bucket; ARGV = interval (us, may be fractional), burst, want, least.
# Returns {granted, TAT - now (us)} or {0, TAT - now, us until `least` tokens fit}.
# TAT is stored as whole microseconds ('%.0f': Lua's tostring keeps 14 digits only).
_RATE_LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2]) * interval
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local fits = math.floor((capacity - (tat - now) + 1) / interval)
local least = tonumber(ARGV[4])
if fits >= least then
  local k = math.min(tonumber(ARGV[3]), fits)
  tat = tat + k * interval
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX',
             math.ceil((tat - now) / 1000) + 1)
  return {k, math.ceil(tat - now)}
end
return {0, math.ceil(tat - now), math.ceil(tat + least * interval - capacity - now)}
"""

# KEYS[1] = bucket; ARGV[1] = microseconds to give back (unspent tokens * interval).
_RATE_RELEASE = """
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
tat = tat - tonumber(ARGV[1])
if tat <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX',
             math.ceil((tat - now) / 1000) + 1)
end
return 1
"""

# KEYS[1] = period counter; ARGV = limit, want, expire-at (ms since the epoch).
# Returns {granted, used after the grant}.
_QUOTA_LEASE = """
local used = tonumber(redis.call('GET', KEYS[1]) or 0)
local k = math.min(tonumber(ARGV[2]), tonumber(ARGV[1]) - used)
if k <= 0 then return {0, used} end
used = redis.call('INCRBY', KEYS[1], k)
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
return {k, used}
"""

# KEYS[1] = period counter; ARGV[1] = unspent tokens to give back.
_QUOTA_RELEASE = """
local used = tonumber(redis.call('GET', KEYS[1]))
if not used or used <= 0 then return 0 end
return redis.call('DECRBY', KEYS[1], math.min(tonumber(ARGV[1]), used))
"""

_SCRIPTS = (_RATE_LEASE, _RATE_RELEASE, _QUOTA_LEASE, _QUOTA_RELEASE)
RATE_LEASE, RATE_RELEASE, QUOTA_LEASE, QUOTA_RELEASE = range(4)
_ScriptArgs = tuple[str | int, ...]  # ARGV of one script call (floats go as repr())


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


class _Lease:
    """This gateway's share of one key: tokens already counted on the server."""

    __slots__ = (
        "flight", "granted_at", "granted_tokens", "interval", "least", "limit", "low",
        "period", "redis_key", "refused_until", "reset_at", "size", "state", "tokens",
        "valid_until", "waiting",
    )

    def __init__(self, redis_key: str, interval: float, limit: int, period: float) -> None:
        self.redis_key = redis_key
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


class RedisCounters:
    """The `Counters` protocol on Redis, with local leases (see the module docstring for
    the design and its accuracy bound). `take` and `count` ignore the caller's `now` for
    lease timing (the server's clock decides; local timing is `time.monotonic()`); `count`
    uses `now` only against `expires_at`, which is in the same (epoch) clock."""

    def __init__(self, url: str, *, lease_fraction: float = 0.02, timeout: float = 0.25,
                 lease_ttl: float = LEASE_TTL, down_for: float = DOWN_FOR,
                 salt: bytes = b"") -> None:
        if not 0 < lease_fraction <= 0.5:
            raise ValueError("lease_fraction must be in (0, 0.5]")
        self._redis: Redis | RedisCluster = async_client(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0,
            **({} if is_cluster_url(url) else {"retry_on_timeout": False,
                                                "single_connection_client": False}),
        )
        self._cluster = isinstance(self._redis, RedisCluster)
        self._lease_fraction = lease_fraction
        self._lease_ttl = lease_ttl
        self._down_for = down_for
        self._salt = salt[:64]
        self._rate: dict[str, _Lease] = {}
        self._quota: dict[str, _Lease] = {}
        self._calls: list[tuple[int, _Lease, _ScriptArgs, bool]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._down_until = 0.0
        self._down_reason = ""
        self._shas = tuple(_sha(script) for script in _SCRIPTS)
        self.round_trips = 0  # pipelines sent (for tests and the bench)
        try:
            self._password = parse_state_url(url).password or ""
        except StateUrlError:
            self._password = ""
        self.outage = StoreOutage(redact_url(url))  # the rate-limit step counts into it

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
    def _lease_args(lease: _Lease) -> _ScriptArgs:
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

    def _enqueue(self, script: int, lease: _Lease, args: _ScriptArgs,
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
                self._fail(calls, StoreUnavailable("redis counters: flusher cancelled"))

    @staticmethod
    def _fail(batch: list[tuple[int, _Lease, _ScriptArgs, bool]],
              error: StoreUnavailable) -> None:
        for _script, lease, _args, reply in batch:
            if not reply:
                continue  # a release: its lease may have a flight in another batch
            future, lease.flight = lease.flight, None
            if future is not None and not future.done():
                future.set_exception(error)

    async def _send(self, batch: list[tuple[int, _Lease, _ScriptArgs, bool]]) -> None:
        try:
            if _mono() < self._down_until:
                raise StoreUnavailable(self._down_reason)
            results = await self._execute([
                (script, lease.redis_key, self._lease_args(lease) if reply else args)
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
            self.outage.down(self._masked(f"redis refused: {refused}"))
        for (script, lease, _args, reply), result in zip(batch, results, strict=True):
            if not reply:
                continue  # a release: nothing to learn
            future, lease.flight = lease.flight, None
            if isinstance(result, Exception):
                if future is not None and not future.done():
                    future.set_exception(StoreUnavailable(
                        self._masked(f"redis refused: {result}")))
                continue
            if script == RATE_LEASE:
                self._granted_rate(lease, result, received)
            else:
                self._granted_quota(lease, result, received)
            if future is not None and not future.done():
                future.set_result(None)

    async def _execute(self, calls: Sequence[tuple[int, str, _ScriptArgs]]) -> list[Any]:
        """EVALSHA every call in one pipeline; load the scripts the server lacks (first
        use, or after a restart) and send those calls again."""
        self.round_trips += 1
        results = await self._pipeline(calls)
        missing = [index for index, result in enumerate(results)
                   if isinstance(result, NoScriptError)]
        if missing:
            if self._cluster:  # SCRIPT LOAD on every primary (a pipeline picks one node)
                for script in _SCRIPTS:
                    await self._redis.script_load(script)
            else:
                pipe = self._redis.pipeline(transaction=False)
                for script in _SCRIPTS:
                    pipe.script_load(script)
                await pipe.execute()
            self.round_trips += 2
            again = await self._pipeline([calls[index] for index in missing])
            for index, result in zip(missing, again, strict=True):
                results[index] = result
        return results

    async def _pipeline(self, calls: Sequence[tuple[int, str, _ScriptArgs]]) -> list[Any]:
        shas = self._shas
        if len(calls) == 1:  # a plain command costs ~15 us less than a pipeline of one
            script, name, args = calls[0]
            try:
                return [await self._redis.evalsha(shas[script], 1, name, *args)]
            except ResponseError as exc:  # NOSCRIPT among them: an answer, not an outage
                return [exc]
        pipe = self._redis.pipeline(transaction=False)
        for script, name, args in calls:
            # execute_command: redis-py's cluster pipeline blocks its `evalsha` method
            # (a script may name keys of several slots; ours name one, KEYS[1]) but
            # routes EVALSHA by its keys; a plain pipeline sends the very same command.
            pipe.execute_command("EVALSHA", shas[script], 1, name, *args)
        return list(await pipe.execute(raise_on_error=False))

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
        calls = [(RATE_RELEASE if lease.interval else QUOTA_RELEASE, lease.redis_key,
                  (repr(lease.tokens * lease.interval * 1e6),) if lease.interval
                  else (lease.tokens,))
                 for leases in (self._rate, self._quota) for lease in leases.values()
                 if lease.tokens and _mono() < lease.valid_until]
        if calls and _mono() >= self._down_until:
            try:
                await self._execute(calls)
            except (RedisError, OSError, TimeoutError):
                pass  # the tokens come back on their own when their TAT passes
        self._rate.clear()
        self._quota.clear()
        await self._redis.aclose()
        # Behind Sentinel the master's client does not close the sentinels' own clients.
        pool = getattr(self._redis, "connection_pool", None)
        sentinel = getattr(pool, "sentinel_manager", None)
        for client in sentinel.sentinels if sentinel is not None else ():
            await client.aclose()


def lease_size(limit: int, lease_fraction: float) -> int:
    """The largest lease of a key: n = max(1, floor(limit * lease_fraction))."""
    return max(1, int(limit * lease_fraction))
