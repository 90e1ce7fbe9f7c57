"""Automatic temporary bans (checklist A9, D5): `rate_limiting.bans.rules` over security
events.

A rule counts the events it listens to (`on`: authn-failure, not-found, ...) per source
(`by: ip`, or `by: subject`: one account across addresses). When `threshold` of them fall
within `window`, the source is banned for `duration * escalation ** offenses` (offenses:
its earlier bans in the last 30 days, any rule or the CLI), at most `max_duration`; the
counter starts again from zero.

Counting is exact: each (rule, source) keeps the times of its last `threshold` events
(an `array('d')`, 8 bytes each) and a ban fires when the oldest of them is still inside
the window. The approximate alternative (two fixed buckets, the previous one weighted by
how much of it still overlaps the window) assumes events spread evenly; a burst at the
end of one bucket followed by a few at the start of the next can then ban a client that
never made `threshold` mistakes in one window, or miss one that did. A ban locks a user
out, so the rule must mean what the config says; the price, a few timestamps per source,
is bounded twice:
- `sweep(now)` (the gateway calls it every 30 s) drops sources whose last event left
  the window; sources are kept in least-recently-seen order, so it stops at the first
  live one instead of scanning everything;
- each rule tracks at most `max_keys` sources and `max_timestamps` timestamps (so at most
  `max_timestamps // threshold` sources); past that the least recently seen is dropped.
  An attacker rotating addresses therefore costs bounded memory (about 35 MB per rule at
  the defaults, whatever the threshold) and only evicts idle sources first.

Counting is per gateway instance: each instance bans on what it sees itself (a shared
counter would cost a Redis round trip per refused request, which is exactly the traffic
an attack generates). The bans themselves are shared through the store, so a source
banned by one instance is refused by all within about a second.
"""

from __future__ import annotations

import logging
import math
from array import array
from collections import OrderedDict

from apishield.config import BanRule
from apishield.state.bans import BanKind, BanRecord, BanStore, BanStoreError, canonical_value

logger = logging.getLogger("apishield.abuse.bans")

DEFAULT_MAX_KEYS = 100_000
DEFAULT_MAX_TIMESTAMPS = 1_000_000


def ban_duration(rule: BanRule, offenses: int) -> float:
    """`duration * escalation ** offenses`, capped at `max_duration` (no overflow for
    a source banned hundreds of times)."""
    try:
        seconds = rule.duration * rule.escalation ** offenses
    except OverflowError:
        seconds = math.inf
    return min(seconds, rule.max_duration)


def human_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


class _RuleCounter:
    """One rule's sliding windows, per source, in least-recently-seen order."""

    __slots__ = ("kind", "max_keys", "rule", "threshold", "times", "window")

    def __init__(self, rule: BanRule, max_keys: int, max_timestamps: int) -> None:
        self.rule = rule
        self.kind: BanKind = rule.by
        self.threshold = rule.threshold
        self.window = rule.window
        self.max_keys = max(1, min(max_keys, max_timestamps // rule.threshold))
        # OrderedDict, not dict: popping its oldest entry is O(1), where a dict that has
        # lost entries at its front scans their holes (quadratic under IP rotation)
        self.times: OrderedDict[str, array[float]] = OrderedDict()

    def hit(self, value: str, now: float) -> bool:
        """Count one event; True when it completes `threshold` within `window` (the
        source's counter is then gone: a new ban starts from zero)."""
        times = self.times.get(value)
        new = times is None
        if times is None:
            times = array("d")
        else:
            self.times.move_to_end(value)  # most recently seen last
            cutoff = now - self.window
            stale = 0
            for moment in times:
                if moment > cutoff:
                    break
                stale += 1
            if stale:
                del times[:stale]
        times.append(now)
        if len(times) > self.threshold:
            del times[0]
        if len(times) >= self.threshold:
            self.times.pop(value, None)
            return True
        if new:
            self.times[value] = times
            if len(self.times) > self.max_keys:
                self.times.popitem(last=False)  # the least recently seen
        return False

    def forget(self, value: str) -> None:
        self.times.pop(value, None)

    def sweep(self, now: float) -> int:
        cutoff = now - self.window
        idle = []
        for value, times in self.times.items():
            if times[-1] > cutoff:
                break  # everything after was seen more recently
            idle.append(value)
        for value in idle:
            del self.times[value]
        return len(idle)


class BanRules:
    """The configured rules over one ban store. Synchronous and cheap: `observe` is a
    dict pop/insert and an append per listening rule; `check` two dict lookups."""

    def __init__(self, rules: tuple[BanRule, ...], store: BanStore, *,
                 max_keys: int = DEFAULT_MAX_KEYS,
                 max_timestamps: int = DEFAULT_MAX_TIMESTAMPS) -> None:
        self.store = store
        self.counters = tuple(_RuleCounter(rule, max_keys, max_timestamps) for rule in rules)
        listening: dict[str, list[_RuleCounter]] = {}
        for counter in self.counters:
            for event in counter.rule.on:
                listening.setdefault(event, []).append(counter)
        self._listening = {event: tuple(found) for event, found in listening.items()}

    def check(self, ip: str | None, subject: str | None, now: float) -> BanRecord | None:
        """The ban in force on this address (or a network holding it) or subject."""
        record = self.store.banned("ip", ip, now) if ip else None
        if record is None and subject:
            record = self.store.banned("subject", subject, now)
        return record

    def observe(self, event: str, ip: str | None, subject: str | None,
                now: float) -> BanRecord | None:
        """Count one security event; the ban it triggered, if any (the caller logs it).
        When one event completes two rules at once (say by ip and by subject), both bans
        are made and the first is returned; `observe_all` returns every one."""
        made = self.observe_all(event, ip, subject, now)
        return made[0] if made else None

    def observe_all(self, event: str, ip: str | None, subject: str | None,
                    now: float) -> list[BanRecord]:
        made: list[BanRecord] = []
        for counter in self._listening.get(event, ()):
            value = ip if counter.kind == "ip" else subject
            if not value:
                continue  # a by-subject rule ignores anonymous events
            if counter.hit(value, now):
                record = self._ban(counter, value, now)
                if record is not None:
                    made.append(record)
        return made

    def _ban(self, counter: _RuleCounter, value: str, now: float) -> BanRecord | None:
        rule = counter.rule
        if self.store.banned(counter.kind, value, now) is not None:
            return None  # already banned (by another rule, instance or the CLI)
        value = canonical_value(counter.kind, value)
        offenses = self.store.offenses(counter.kind, value, now)
        record = BanRecord(
            kind=counter.kind, value=value, until=now + ban_duration(rule, offenses),
            rule=rule.name,
            reason=(f"{rule.threshold} {' or '.join(rule.on)} event(s) within "
                    f"{human_duration(rule.window)}"),
            created_at=now, offense=offenses + 1,
        )
        try:
            self.store.ban(record)
        except BanStoreError as exc:  # it applies here all the same (the mirror has it)
            logger.warning("ban on %s %s could not be stored (%s); it applies in this "
                           "process only", record.kind, record.value, exc)
        return record

    def sweep(self, now: float) -> int:
        """Forget sources whose last event left their rule's window; how many went."""
        return sum(counter.sweep(now) for counter in self.counters)

    def tracked(self) -> int:
        """Sources being counted, over all rules (metrics, tests)."""
        return sum(len(counter.times) for counter in self.counters)
