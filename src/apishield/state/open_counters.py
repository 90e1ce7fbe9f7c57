"""The counters backend the config asks for: in this process, or shared through Redis."""

from __future__ import annotations

from apishield.config import Config
from apishield.state.counters import Counters, MemoryCounters

REDIS_SCHEMES = ("redis://", "rediss://")


def is_redis(state: str) -> bool:
    return state.startswith(REDIS_SCHEMES)


def open_counters(config: Config) -> Counters:
    if is_redis(config.state):
        from apishield.state.redis_counters import RedisCounters

        return RedisCounters(config.state, lease_fraction=config.rate_limiting.lease_fraction)
    return MemoryCounters()
