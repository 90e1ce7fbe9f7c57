"""Counters shared by every gateway through Redis (`state: redis://...`), without a Redis
round trip per request.

(The lease client described here lives in `leases.py`, shared with the supervisor of
`serve --workers N`, whose `local_leases.py` runs the same four scripts in Python; this
module is the scripts and their Redis transport. The design and the bound are here.)

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

import hashlib
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
from apishield.state.leases import (
    DOWN_FOR,
    LEASE_TTL,
    QUOTA_LEASE,
    QUOTA_RELEASE,
    QUOTA_SLACK,
    RATE_LEASE,
    RATE_RELEASE,
    Call,
    LeaseCounters,
    ScriptArgs,
    lease_size,
)

__all__ = ["QUOTA_LEASE", "QUOTA_RELEASE", "QUOTA_SLACK", "RATE_LEASE", "RATE_RELEASE",
           "RedisCounters", "lease_size"]

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

# In the order of the operations' numbers (RATE_LEASE, RATE_RELEASE, QUOTA_LEASE,
# QUOTA_RELEASE); `local_leases.LeaseBook` evaluates the same four in Python.
_SCRIPTS = (_RATE_LEASE, _RATE_RELEASE, _QUOTA_LEASE, _QUOTA_RELEASE)


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()




class RedisCounters(LeaseCounters):
    """The `Counters` protocol on Redis, with local leases (see the module docstring for
    the design and its accuracy bound): `LeaseCounters` with the four operations run as
    Lua scripts, every call of a batch in one pipeline."""

    server_name = "redis"
    _close_errors = (RedisError, OSError, TimeoutError)

    def __init__(self, url: str, *, lease_fraction: float = 0.02, timeout: float = 0.25,
                 lease_ttl: float = LEASE_TTL, down_for: float = DOWN_FOR,
                 salt: bytes = b"") -> None:
        try:
            password = parse_state_url(url).password or ""
        except StateUrlError:
            password = ""
        super().__init__(redact_url(url), lease_fraction=lease_fraction,
                         lease_ttl=lease_ttl, down_for=down_for, salt=salt,
                         password=password)
        self._redis: Redis | RedisCluster = async_client(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0,
            **({} if is_cluster_url(url) else {"retry_on_timeout": False,
                                                "single_connection_client": False}),
        )
        self._cluster = isinstance(self._redis, RedisCluster)
        self._shas = tuple(_sha(script) for script in _SCRIPTS)

    async def _execute(self, calls: Sequence[Call]) -> list[Any]:
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

    async def _pipeline(self, calls: Sequence[tuple[int, str, ScriptArgs]]) -> list[Any]:
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

    async def _disconnect(self) -> None:
        await self._redis.aclose()
        # Behind Sentinel the master's client does not close the sentinels' own clients.
        pool = getattr(self._redis, "connection_pool", None)
        sentinel = getattr(pool, "sentinel_manager", None)
        for client in sentinel.sentinels if sentinel is not None else ():
            await client.aclose()
