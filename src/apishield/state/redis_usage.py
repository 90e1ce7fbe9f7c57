"""Usage counts in Redis (`state: redis://...`): one hash per UTC day, shared by every
gateway instance and read by `apishield usage`.

- Layout: `<ns>:usage:<YYYY-MM-DD>`, fields `r:<pair>`, `f:<pair>`, `i:<pair>`, `o:<pair>`
  (requests, refusals, bytes in, bytes out) where `<pair>` is the JSON array
  `[identity, operation]` (any character in an identity is safe), and `#pairs` the number
  of pairs the day tells apart. On a Cluster the namespace is a hash tag (`{apishield}`).
- One Lua script per day and flush: HINCRBY of every field, the `max_pairs` bound (a new
  pair past it counts under `other`) and EXPIREAT (the day's end plus the retention), all
  atomic on the server. Several gateways add up; nothing is ever overwritten.
- A day written is removed from the batch at once, so a flush that fails half-way (a
  batch across midnight) retries only the day that was not written: no double counts.
"""

from __future__ import annotations

import calendar
import json
import time

import redis

from apishield.config.redis_urls import cluster_namespace, redact_url
from apishield.state.redis_store import DEFAULT_NAMESPACE, SyncClient, connect
from apishield.state.usage import OTHER, Batch, UsageRow, UsageStoreError, day_of

_METRICS = ("r", "f", "i", "o")  # requests, refusals, bytes in, bytes out

# KEYS: the day's hash; ARGV: max_pairs, expire-at, then per pair: pair, other pair and
# the four counts
_ADD = """
local key = KEYS[1]
local max_pairs = tonumber(ARGV[1])
local pairs = tonumber(redis.call('HGET', key, '#pairs') or '0')
for i = 3, #ARGV, 6 do
  local pair = ARGV[i]
  if pair ~= ARGV[i + 1] and redis.call('HEXISTS', key, 'r:' .. pair) == 0 then
    if pairs >= max_pairs then
      pair = ARGV[i + 1]
    else
      pairs = pairs + 1
      redis.call('HINCRBY', key, '#pairs', 1)
    end
  end
  redis.call('HINCRBY', key, 'r:' .. pair, ARGV[i + 2])
  redis.call('HINCRBY', key, 'f:' .. pair, ARGV[i + 3])
  redis.call('HINCRBY', key, 'i:' .. pair, ARGV[i + 4])
  redis.call('HINCRBY', key, 'o:' .. pair, ARGV[i + 5])
end
redis.call('EXPIREAT', key, ARGV[2])
return pairs
"""


def _pair(identity: str, operation: str) -> str:
    return json.dumps([identity, operation], ensure_ascii=False, separators=(",", ":"))


class RedisUsageStore:
    """`UsageStore` on Redis. Synchronous: the gateway calls it from a worker thread."""

    def __init__(self, url: str, *, client: SyncClient | None = None,
                 namespace: str = DEFAULT_NAMESPACE) -> None:
        self._where = redact_url(url)
        self._client = client if client is not None else connect(url)
        self._prefix = f"{cluster_namespace(url, namespace)}:usage:"
        self._script = self._client.register_script(_ADD)

    def add(self, batch: Batch, max_pairs: int, retention_days: int) -> None:
        by_day: dict[str, list[str | int]] = {}
        for (day, identity, operation), counts in batch.items():
            args = by_day.setdefault(day, [])
            args += [_pair(identity, operation), _pair(OTHER, operation), *counts]
        for day, args in sorted(by_day.items()):
            start = calendar.timegm(time.strptime(day, "%Y-%m-%d"))
            expire_at = start + (retention_days + 1) * 86_400
            try:
                self._script(keys=[self._prefix + day], args=[max_pairs, expire_at, *args])
            except redis.RedisError as exc:
                raise UsageStoreError(f"usage store {self._where}: {exc}") from exc
            for key in [key for key in batch if key[0] == day]:
                del batch[key]

    def query(self, since_day: str, identity: str | None = None,
              operation: str | None = None) -> list[UsageRow]:
        start = calendar.timegm(time.strptime(since_day, "%Y-%m-%d"))
        today = day_of(time.time())
        days: list[str] = []
        moment = float(start)
        while (day := day_of(moment)) <= today:
            days.append(day)
            moment += 86_400.0
        try:
            pipe = self._client.pipeline(transaction=False)
            for day in days:
                pipe.hgetall(self._prefix + day)
            hashes = pipe.execute()
        except redis.RedisError as exc:
            raise UsageStoreError(f"usage store {self._where}: {exc}") from exc
        rows: list[UsageRow] = []
        for day, fields in zip(days, hashes, strict=True):
            counts: dict[tuple[str, str], dict[str, int]] = {}
            for raw_field, raw_value in fields.items():
                field = raw_field.decode() if isinstance(raw_field, bytes) else raw_field
                metric, _, pair = field.partition(":")
                if metric not in _METRICS:
                    continue
                who, what = json.loads(pair)
                if (identity is not None and who != identity) or (
                        operation is not None and what != operation):
                    continue
                counts.setdefault((who, what), {})[metric] = int(raw_value)
            rows += [UsageRow(day, who, what, c.get("r", 0), c.get("f", 0), c.get("i", 0),
                              c.get("o", 0)) for (who, what), c in sorted(counts.items())]
        return rows

    def close(self) -> None:
        self._client.close()
