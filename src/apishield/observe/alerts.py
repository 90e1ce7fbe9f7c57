"""The alert engine (F3): rules over security events and request outcomes.

Two inputs: the security events of observe/events.py (`event()`, a subscriber: failed
authentications, bans) and every finished request (`request()`, one guarded call in
`Pipeline.record`: status, outcome, reason, client address, identity, operation). Both run
inline on the event loop, so each rule only does a few dict operations; everything slow
(the webhook POST) happens in observe/webhooks.py, behind a bounded queue.

Counting is bounded: a rule tracks at most `alerts.max_keys` keys (addresses, accounts,
identities, reasons), least recently seen evicted first (an `OrderedDict` used as an LRU:
`move_to_end` is O(1) in C). A flood of fresh addresses therefore forgets the coldest
keys instead of growing memory; the price is that a key evicted mid-window starts again
from zero.

Windows are sliding, estimated from two fixed windows (the current one and the previous
one, weighted by how much of it still overlaps the sliding window): two numbers per key,
no timestamps list, and a burst that straddles two fixed windows still counts whole.

A rule fires at most once per (rule, key) per `cooldown`; past that, the rule's
`rate_limit` caps how many of its alerts are delivered (the others are still logged,
counted and shown). Each fired alert is a security line `event: alert`, a count in
`apishield_alerts_total{rule}`, an entry in `ALERT_FEED` (the dashboard), a call to each
of `listeners` (the audit trail hooks in there) and a POST to each `notify` webhook.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from apishield.config.admin import is_loopback as _loopback
from apishield.config.alerts import Alerts, Rule
from apishield.observe import events
from apishield.observe.alert_feed import ALERT_FEED, FiredAlert
from apishield.observe.geoip import CountryLookup
from apishield.observe.logjson import fields
from apishield.observe.metrics import Metrics
from apishield.observe.webhooks import Delivery, resolve

security_log = logging.getLogger("apishield.security")

EWMA_ALPHA = 0.3  # weight of the window just closed in an identity's baseline
FAILED_AUTH_EVENTS = ("authn-failure", "upstream-authn-failure")

Listener = Callable[[FiredAlert], None]


class SlidingCounter:
    """Per-key counts over a sliding window of `window` seconds, at most `max_keys` keys.

    Each key holds [fixed window index, count in it, count in the one before]; the
    estimate is `previous * (share of the previous window still inside the sliding one)
    + current`."""

    def __init__(self, window: float, max_keys: int) -> None:
        self.window = window
        self.max_keys = max_keys
        self.keys: OrderedDict[str, list[float]] = OrderedDict()

    def add(self, key: str, now: float, amount: float = 1.0) -> float:
        """Count `amount` for `key` at `now`; the sliding-window total after it."""
        position = now / self.window
        index = int(position)
        keys = self.keys
        entry = keys.get(key)
        if entry is None:
            if len(keys) >= self.max_keys:
                keys.popitem(last=False)  # the coldest key
            entry = keys[key] = [index, 0.0, 0.0]
        else:
            keys.move_to_end(key)
            if entry[0] != index:
                entry[2] = entry[1] if index - entry[0] == 1 else 0.0
                entry[1] = 0.0
                entry[0] = index
        entry[1] += amount
        return entry[2] * (1.0 - (position - index)) + entry[1]


class Ratio:
    """Errors among requests over a sliding window (one key: the whole gateway)."""

    def __init__(self, window: float) -> None:
        self.total = SlidingCounter(window, 1)
        self.errors = SlidingCounter(window, 1)

    def add(self, error: bool, now: float) -> tuple[float, float]:
        """(requests, errors) in the sliding window, this request included."""
        return (self.total.add("", now), self.errors.add("", now, 1.0 if error else 0.0))


class Baseline:
    """Each identity's requests per window against an EWMA of its own past windows.

    Per identity: [window index, count in it, baseline or None before a first full
    window]. When a window closes, baseline += alpha * (count - baseline); windows the
    identity sent nothing in decay it as zeros would. At most `max_keys` identities."""

    def __init__(self, window: float, max_keys: int, alpha: float = EWMA_ALPHA) -> None:
        self.window = window
        self.max_keys = max_keys
        self.alpha = alpha
        self.keys: OrderedDict[str, list[Any]] = OrderedDict()

    def add(self, key: str, now: float) -> tuple[int, float | None]:
        """Count one request; (count in the current window, baseline or None)."""
        index = int(now / self.window)
        keys = self.keys
        entry = keys.get(key)
        if entry is None:
            if len(keys) >= self.max_keys:
                keys.popitem(last=False)
            entry = keys[key] = [index, 0, None]
        else:
            keys.move_to_end(key)
            if entry[0] != index:
                closed, gap = entry[1], index - entry[0]
                baseline = closed if entry[2] is None else (
                    entry[2] + self.alpha * (closed - entry[2]))
                entry[2] = baseline * (1.0 - self.alpha) ** (gap - 1)
                entry[0], entry[1] = index, 0
        entry[1] += 1
        return entry[1], entry[2]


class TokenBucket:
    """`count` alerts per `period` seconds, for a rule's deliveries."""

    def __init__(self, count: int, period: float, now: float) -> None:
        self.capacity = float(count)
        self.per_second = count / period
        self.tokens = float(count)
        self.at = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.per_second)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class _RuleState:
    """One rule's dedup memory and delivery budget."""

    def __init__(self, rule: Rule, max_keys: int, now: float) -> None:
        self.rule = rule
        self.max_keys = max_keys
        self.fired: OrderedDict[str, float] = OrderedDict()  # key -> when it last fired
        self.bucket = TokenBucket(*rule.rate_limit, now)
        self.suppressed = 0  # alerts the cooldown held back

    def due(self, key: str, now: float) -> bool:
        """Whether `key` may fire now (not within its cooldown); records it if so."""
        fired = self.fired
        last = fired.get(key)
        if last is not None and now - last < self.rule.cooldown:
            self.suppressed += 1
            return False
        if last is not None:
            del fired[key]
        elif len(fired) >= self.max_keys:
            fired.popitem(last=False)  # the one that fired longest ago
        fired[key] = now
        return True


class AlertEngine:
    def __init__(self, config: Alerts, source_dir: str, metrics: Metrics | None,
                 clock: Callable[[], float] = time.time) -> None:
        """Reads webhook secrets and opens the GeoIP database: a ConfigError when either
        is missing, so `apishield check` and a reload report it."""
        self.config = config
        self.clock = clock
        self.metrics = metrics
        self.listeners: list[Listener] = []  # called with each fired alert (audit trail)
        self.geoip = (CountryLookup(Path(source_dir) / config.geoip.database)
                      if config.geoip is not None else None)
        self.delivery = Delivery(
            {name: resolve(name, webhook, source_dir) for name, webhook in
             config.webhooks.items()}, config.queue_size, metrics)
        now = clock()
        self.states = {rule.name: _RuleState(rule, config.max_keys, now)
                       for rule in config.rules}
        self._per_request: list[Callable[[int, str, str | None, str, str | None,
                                          str | None, float], None]] = []
        self._per_event: dict[str, list[Callable[[dict[str, object], float], None]]] = {}
        for rule in config.rules:
            self._compile(rule)
        self._subscribed = False

    # -- rules -------------------------------------------------------------------------

    def _compile(self, rule: Rule) -> None:
        max_keys = self.config.max_keys
        limit = rule.limit
        if rule.kind == "failed-auth-burst":
            counter = SlidingCounter(rule.window, max_keys)
            by_ip = rule.by == "ip"

            def failed_auth(values: dict[str, object], now: float) -> None:
                key = (values.get("client_ip") if by_ip
                       else values.get("subject") or values.get("key_id"))
                if not isinstance(key, str):
                    return  # by account, and the account is not known
                count = counter.add(key, now)
                if count >= limit:
                    self.fire(rule, key, now, f"{int(count)} failed authentications from "
                              f"{'address' if by_ip else 'account'} {key} within "
                              f"{rule.window:g}s", {"count": int(count), "by": rule.by,
                                                     "window_s": rule.window})

            for event in FAILED_AUTH_EVENTS:
                self._per_event.setdefault(event, []).append(failed_auth)
        elif rule.kind == "ban":
            def banned(values: dict[str, object], now: float) -> None:
                key = f"{values.get('target')}:{values.get('value')}"
                self.fire(rule, key, now, f"{values.get('target')} {values.get('value')} "
                          f"banned by rule {values.get('rule')}",
                          {"target": values.get("target"), "value": values.get("value"),
                           "ban_rule": values.get("rule"), "offense": values.get("offense")})

            self._per_event.setdefault("ban", []).append(banned)
        elif rule.kind == "refusal-spike":
            spikes = SlidingCounter(rule.window, max_keys)
            # a reason code, or a glob over them (`jwt-*`); None: every refusal
            regex = re.compile(fnmatch.translate(rule.reason)) if rule.reason else None

            def refused(status: int, outcome: str, reason: str | None, client_ip: str,
                        identity: str | None, operation: str | None, now: float) -> None:
                if outcome != "refused" or reason is None:
                    return
                if regex is not None and not regex.match(reason):
                    return
                count = spikes.add(reason, now)
                if count >= limit:
                    self.fire(rule, reason, now, f"{int(count)} requests refused for "
                              f"{reason} within {rule.window:g}s",
                              {"count": int(count), "reason": reason,
                               "window_s": rule.window})

            self._per_request.append(refused)
        elif rule.kind == "error-ratio":
            ratio = Ratio(rule.window)
            least = rule.min_requests if rule.min_requests is not None else 50

            def errors(status: int, outcome: str, reason: str | None, client_ip: str,
                       identity: str | None, operation: str | None, now: float) -> None:
                total, failed = ratio.add(status >= 500, now)
                if status >= 500 and total >= least and failed / total >= limit:
                    self.fire(rule, "all", now, f"{failed / total:.1%} of {int(total)} "
                              f"requests answered 5xx within {rule.window:g}s",
                              {"ratio": round(failed / total, 4), "requests": int(total),
                               "errors": int(failed), "window_s": rule.window})

            self._per_request.append(errors)
        elif rule.kind == "identity-baseline":
            baseline = Baseline(rule.window, max_keys)
            factor = rule.factor if rule.factor is not None else 10.0
            least = rule.min_requests if rule.min_requests is not None else 100

            def hog(status: int, outcome: str, reason: str | None, client_ip: str,
                    identity: str | None, operation: str | None, now: float) -> None:
                if identity is None:
                    return
                count, usual = baseline.add(identity, now)
                if usual is not None and count >= least and count > factor * max(usual, 1.0):
                    self.fire(rule, identity, now, f"identity {identity} sent {count} "
                              f"requests within {rule.window:g}s, {factor:g}x over its "
                              f"baseline of {usual:.1f}",
                              {"count": count, "baseline": round(usual, 2),
                               "factor": factor, "window_s": rule.window})

            self._per_request.append(hog)
        elif rule.kind == "country":
            lookup = self.geoip
            assert lookup is not None  # the model requires alerts.geoip
            allowed = frozenset(rule.allow)
            operations = frozenset(rule.operations)
            identities = frozenset(rule.identities)

            def country(status: int, outcome: str, reason: str | None, client_ip: str,
                        identity: str | None, operation: str | None, now: float) -> None:
                if operations and operation not in operations:
                    return
                if identities and identity not in identities:
                    return
                code = lookup.country(client_ip)
                if code is None or code in allowed:
                    return
                who = identity or client_ip
                self.fire(rule, f"{who}:{code}", now, f"request from {code} ({client_ip}) "
                          f"by {identity or 'an anonymous client'} to "
                          f"{operation or 'an unmatched route'}; allowed: "
                          f"{', '.join(sorted(allowed))}",
                          {"country": code, "client_ip": client_ip, "identity": identity,
                           "operation": operation})

            self._per_request.append(country)

    # -- inputs ------------------------------------------------------------------------

    def request(self, status: int, outcome: str, reason: str | None, client_ip: str,
                identity: str | None, operation: str | None) -> None:
        """One finished request (Pipeline.record)."""
        if not self._per_request:
            return
        now = self.clock()
        for watch in self._per_request:
            watch(status, outcome, reason, client_ip, identity, operation, now)

    def event(self, values: dict[str, object]) -> None:
        """One security event (an observe/events.py subscriber)."""
        watchers = self._per_event.get(str(values.get("event")))
        if watchers:
            now = self.clock()
            for watch in watchers:
                watch(values, now)

    # -- output ------------------------------------------------------------------------

    def fire(self, rule: Rule, key: str, now: float, summary: str,
             details: dict[str, Any]) -> FiredAlert | None:
        """Fire `rule` for `key` unless its cooldown holds it back; the alert, or None."""
        state = self.states[rule.name]
        if not state.due(key, now):
            return None
        alert = FiredAlert(rule=rule.name, kind=rule.kind, key=key, at=round(now, 3),
                           summary=summary, severity=rule.severity, details=details)
        deliver = bool(rule.notify) and state.bucket.take(now)
        log = security_log.critical if rule.severity == "critical" else (
            security_log.info if rule.severity == "info" else security_log.warning)
        log("alert: %s", summary, extra=fields(
            "security", None, event="alert", rule=rule.name, alert_kind=rule.kind, key=key,
            severity=rule.severity, summary=summary, details=details,
            webhooks=list(rule.notify) if deliver else []))
        if self.metrics is not None:
            self.metrics.alert(rule.name)
        ALERT_FEED.add(alert)
        for listener in self.listeners:
            try:
                listener(alert)
            except Exception:
                security_log.exception("an alert listener failed", extra=fields("error", None))
        if deliver:
            self.delivery.send(alert, rule.notify)
        elif rule.notify:
            for name in rule.notify:
                self.delivery.count(name, "rate-limited")
        return alert

    def warnings(self) -> list[str]:
        """Risky but working settings, for `apishield check`: a webhook over plain HTTP
        to another host (the alert, and any header secret, cross the network in clear).
        Named by the webhook, never by its URL (it may be a secret)."""
        found = []
        for name, target in self.delivery.targets.items():
            parts = urlsplit(target.url)
            if parts.scheme == "http" and not _loopback(parts.hostname or ""):
                found.append(f"alerts.webhooks.{name}: plain HTTP to another host: anyone "
                             "on the path reads the alerts (and any secret header); use "
                             "https://")
        return found

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if not self._subscribed and self._per_event:
            events.subscribe(self.event)
            self._subscribed = True
        await self.delivery.start()

    def unsubscribe(self) -> None:
        """Stop listening to events (a successor took over; its own engine listens)."""
        events.unsubscribe(self.event)
        self._subscribed = False

    async def stop(self) -> None:
        self.unsubscribe()
        await self.delivery.stop()

    def close(self) -> None:
        if self.geoip is not None:
            self.geoip.close()
