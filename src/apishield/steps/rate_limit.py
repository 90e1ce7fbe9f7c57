"""Rate limits and quotas (checklist D1, D2; IETF RateLimit headers; RFC 6585 429).

Two instances run in the head phase: `pre_auth_limit` before authentication (limits with
`pre_auth: true`, keyed by client IP: credential stuffing against a login or token
endpoint is slowed before any expensive check runs) and `rate_limit` after authorization
(every other limit and quota; identities and roles are known).

Per request and limit this is one key string and one `Counters.take` (a dict lookup in
memory, a local lease with Redis). Which limits apply to an operation is compiled once.

Keys: `ip` is the client address (trusted-proxy aware), `identity` the API key id or the
token subject (the client address for anonymous callers), `operation` the operation: the
route template, never the concrete path, so `/users/1` and `/users/2` share one budget
(slowapi #217 counted per URL).

Answers: a refusal is 429 with `Retry-After` (RFC 6585 4) and the limit's
`RateLimit-Policy` / `RateLimit` (draft-ietf-httpapi-ratelimit-headers: `"name";q=..;w=..`
and `"name";r=..;t=..`); allowed responses carry the tightest limit's headers when
`rate_limiting.headers` is on. A refused request takes nothing from the limit that
refused it (GCRA changes no state on a refusal); with several limits on one operation, a
request refused by a later one has used a token of the earlier ones.

When the shared store cannot answer, `on_store_error` decides: `deny` (default) answers
503, `allow` lets the request through. The outage is logged as one event (`StoreOutage`:
its start, a count every few seconds, its end), not once a request.
"""

from __future__ import annotations

import logging
import math
import time
from calendar import monthrange
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from apishield.config import Quota, RateLimit, RateLimiting
from apishield.contract.loader import Contract
from apishield.exchange import Exchange, Suspend
from apishield.observe.logjson import fields
from apishield.problems import ClientBanned, ServiceUnavailable, TooManyRequests
from apishield.state.counters import Counters, Decision, StoreOutage, StoreUnavailable

if TYPE_CHECKING:
    from apishield.abuse.gate import BanGate

logger = logging.getLogger("apishield")


@dataclass(frozen=True, slots=True)
class _Plan:
    name: str
    key: tuple[str, ...]
    roles: frozenset[str]
    interval: float  # GCRA emission interval; 0 for a quota
    burst: int
    quota: Quota | None
    policy: bytes  # the RateLimit-Policy member

    def applies(self, roles: frozenset[str] | None) -> bool:
        return not self.roles or (roles is not None and bool(self.roles & roles))


def _limit_plan(limit: RateLimit) -> _Plan:
    count, period = limit.rate
    burst = limit.burst or count
    interval = period / count
    window = max(1, math.ceil(burst * interval))
    return _Plan(limit.name, limit.key, frozenset(limit.roles), interval, burst, None,
                 b'"%s";q=%d;w=%d' % (limit.name.encode(), burst, window))


def _quota_plan(quota: Quota) -> _Plan:
    window = 86400 if quota.period == "day" else 31 * 86400
    return _Plan(quota.name, quota.key, frozenset(quota.roles), 0.0, quota.limit, quota,
                 b'"%s";q=%d;w=%d' % (quota.name.encode(), quota.limit, window))


def period_end(period: str, now: float) -> float:
    """The end of the current UTC day or month (quotas reset on calendar boundaries)."""
    moment = datetime.fromtimestamp(now, UTC)
    start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return start.timestamp() + 86400
    days = monthrange(moment.year, moment.month)[1]
    return start.replace(day=1).timestamp() + days * 86400


def headers_for(plan_policy: bytes, name: str, decision: Decision) -> list[tuple[bytes, bytes]]:
    return [
        (b"ratelimit-policy", plan_policy),
        (b"ratelimit", b'"%s";r=%d;t=%d' % (name.encode(), decision.remaining,
                                             math.ceil(decision.reset_after))),
    ]


class RateLimitStep:
    def __init__(self, name: str, settings: RateLimiting, contract: Contract,
                 counters: Counters, *, pre_auth: bool, bans: BanGate | None = None) -> None:
        self.name = name
        self.counters = counters
        self.deny_on_error = settings.on_store_error == "deny"
        # One outage log per store, shared by both instances of the step.
        outage = getattr(counters, "outage", None)
        self.outage: StoreOutage = outage if isinstance(outage, StoreOutage) else StoreOutage()
        self.outage.policy = ("refused with 503 (on_store_error: deny)" if self.deny_on_error
                              else "let through (on_store_error: allow)")
        self.bans = bans  # BanRules: subject bans are checked once the subject is known
        plans: list[tuple[_Plan, frozenset[str]]] = [
            (_limit_plan(limit), frozenset(limit.operations))
            for limit in settings.limits if limit.pre_auth == pre_auth
        ]
        if not pre_auth:
            plans += [(_quota_plan(q), frozenset(q.operations)) for q in settings.quotas]
        known = {op.operation_id for op in contract.operations if op.operation_id}
        for plan, operations in plans:
            unknown = sorted(operations - known)
            if unknown:
                from apishield.config import ConfigError

                raise ConfigError([f"rate_limiting: {plan.name!r} names operations that are "
                                   f"not in the contract: {', '.join(unknown)}"])
        self.plans: dict[str, tuple[_Plan, ...]] = {
            op.pointer: tuple(plan for plan, ops in plans
                              if not ops or op.operation_id in ops)
            for op in contract.operations
        }
        self.policies = {plan.name: plan.policy for plan, _ in plans}
        self.empty = not plans

    def on_head(self, exchange: Exchange) -> None:
        operation = exchange.operation
        if operation is None:
            return
        principal = exchange.principal
        if self.bans is not None and principal is not None:
            ban = self.bans.check(None, principal.subject, time.time())
            if ban is not None:
                from apishield.steps.ip_filter import retry_after

                raise ClientBanned(f"banned:{ban.rule}", headers=retry_after(ban.until))
        plans = self.plans.get(operation.pointer)
        if not plans:
            return
        roles = principal.roles if principal is not None else None
        now = time.time()
        tightest: tuple[str, Decision] | None = None
        start = 0
        waited = exchange.waited_for
        if isinstance(waited, tuple) and waited[0] is self:
            start = waited[2]  # resumed: the plans before this one admitted it already
        for index in range(start, len(plans)):
            plan = plans[index]
            if not plan.applies(roles):
                continue
            key = self._key(plan, exchange)
            decision = self._decide(plan, key, exchange, now, index)
            if decision is None:  # store down, and `allow` was configured
                continue
            if not decision.allowed:
                raise TooManyRequests(
                    f"rate-limit:{plan.name}",
                    headers=[(b"retry-after", b"%d" % max(1, math.ceil(decision.retry_after))),
                             *headers_for(plan.policy, plan.name, decision)],
                )
            # the tightest limit is the one with the smallest share left
            if tightest is None or decision.remaining * tightest[1].limit < \
                    tightest[1].remaining * decision.limit:
                tightest = (plan.name, decision)
        if tightest is not None:
            exchange.rate_limit = tightest

    @staticmethod
    def _key(plan: _Plan, exchange: Exchange) -> str:
        parts = [plan.name]
        for part in plan.key:
            if part == "ip":
                parts.append("ip=" + exchange.client_ip)
            elif part == "operation":
                operation = exchange.operation
                assert operation is not None
                parts.append("op=" + operation.pointer)
            else:
                principal = exchange.principal
                if principal is None:
                    parts.append("anon=" + exchange.client_ip)
                elif principal.key_id is not None:
                    parts.append("key=" + principal.key_id)
                else:
                    parts.append(f"sub={principal.issuer or principal.scheme}:"
                                 f"{principal.subject}")
        return "|".join(parts)

    def _decide(self, plan: _Plan, key: str, exchange: Exchange,
                now: float, index: int) -> Decision | None:
        counters = self.counters
        try:
            if plan.quota is None:
                decision = counters.take(key, plan.interval, plan.burst, now)
            else:
                decision = counters.count(key, plan.burst, period_end(plan.quota.period, now),
                                          now)
        except StoreUnavailable:
            self._store_error(exchange)
            return None
        if decision is not None:
            return decision
        if exchange.waited_for == (self, key, index):  # waited, and still no answer
            self._store_error(exchange)
            return None

        async def wait() -> None:
            try:
                if plan.quota is None:
                    await counters.prepare(key, plan.interval, plan.burst)
                else:
                    await counters.prepare_count(key, plan.burst,
                                                 period_end(plan.quota.period, time.time()))
            except StoreUnavailable:
                pass  # the rerun finds no lease and applies on_store_error
            except Exception:
                logger.exception("rate-limit store failed (request %s)", exchange.id,
                                 extra=fields("error", exchange.id))

        raise Suspend(wait, owner=(self, key, index))

    def _store_error(self, exchange: Exchange) -> None:
        """Count the failed store call; raises when the limit fails closed."""
        self.outage.request()  # counted; logged when the outage starts and every few s
        if self.deny_on_error:
            raise ServiceUnavailable("rate-limit-store-unavailable")


class HeadersStep:
    """`RateLimit-Policy` / `RateLimit` of the tightest limit on allowed responses too, so
    well-behaved clients can pace themselves before they are refused."""

    name = "rate_limit_headers"

    def __init__(self, policies: dict[str, bytes]) -> None:
        self.policies = policies

    def on_response(self, exchange: Exchange, status: int, headers: list[tuple[bytes, bytes]]
                    ) -> list[tuple[bytes, bytes]]:
        state = exchange.rate_limit
        if state is None or status == 429:
            return headers
        name, decision = state
        return [*(item for item in headers
                  if item[0] not in (b"ratelimit-policy", b"ratelimit")),
                *headers_for(self.policies[name], name, decision)]
