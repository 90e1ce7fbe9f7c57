"""The counters backend the config asks for: in this process, or shared through Redis."""

from __future__ import annotations

from apishield.config import Config
from apishield.state.counters import Counters, MemoryCounters
from apishield.state.redis_urls import PREFIXES, is_redis_url

REDIS_SCHEMES = PREFIXES  # redis://, rediss://, redis+sentinel://, redis+cluster://, ...


def is_redis(state: str) -> bool:
    return is_redis_url(state)


def open_counters(config: Config) -> Counters:
    if is_redis(config.state):
        from apishield.state.redis_counters import RedisCounters

        return RedisCounters(config.state, lease_fraction=config.rate_limiting.lease_fraction)
    return MemoryCounters()
