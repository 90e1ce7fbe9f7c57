"""Security events (checklist F1): every authentication attempt, authorization refusal and
ban, as `kind: "security"` lines on the `apishield.security` logger (docs/logging.md).

Which attempt gets which line, and why:

- a failure (`authn-failure`): one line each, with its precise reason (the client never
  sees it); an attacker's volume is exactly what an operator must see;
- a success whose credential was verified just now (`authn-success`: a JWT whose
  signature was checked, an introspection answer): one line each; the verification
  itself costs far more than the line;
- every success, cached or not, of every scheme (API keys, cached tokens, client
  certificates): counted, and written as one `authn-success-summary` line per identity
  (scheme, subject, key id, issuer) per `SUMMARY_INTERVAL` (60 s) with the `count`. A line
  per request would cost more than the cache hit it reports; the hot path only
  increments a counter in a dict keyed by the cached `Principal` (hashed by identity);
- `authz-denied`: a verified caller refused by scopes, roles or an ownership rule;
- `upstream-authn-failure`: the upstream answered 401 or 403 at a login operation (see
  `login_refusal` for how one is recognised);
- `ban`: a ban rule banned an address or an account.

Values are the gateway's own (reason codes, ids, addresses); a token or key never
appears (F6).

Subscribers (the alert engine, observe/alerts.py) get each request-bound event's values
as they are logged: `subscribe(callback)`. Nobody subscribed costs one truth test of an
empty list per event; a subscriber runs on the event loop, inline, so it must only count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from apishield.observe.logjson import fields

if TYPE_CHECKING:
    from apishield.auth.principal import AuthFailure, Principal
    from apishield.exchange import Exchange
    from apishield.state.bans import BanRecord

security_log = logging.getLogger("apishield.security")

SUMMARY_INTERVAL = 60.0  # seconds between two summary lines of one identity
MAX_IDENTITIES = 10_000  # counted per interval; past it, successes are counted together

Subscriber = Callable[[dict[str, object]], None]
# called with each event's values (`event`, ...); replaced, never changed in place, so a
# subscriber may unsubscribe while the event it got is being published
subscribers: tuple[Subscriber, ...] = ()


def subscribe(callback: Subscriber) -> None:
    global subscribers
    if callback not in subscribers:
        subscribers = (*subscribers, callback)


def unsubscribe(callback: Subscriber) -> None:
    global subscribers
    subscribers = tuple(s for s in subscribers if s != callback)


def _publish(values: dict[str, object]) -> None:
    """Give an event's values to every subscriber; a failing one is logged, never raised
    into the request."""
    for callback in subscribers:
        try:
            callback(values)
        except Exception:
            logging.getLogger("apishield").exception("an event subscriber failed")


def _event(event: str, exchange: Exchange, scheme: str | None,
           principal: Principal | None = None, subject: str | None = None,
           key_id: str | None = None) -> dict[str, object]:
    """The fields every request-bound security line has, and who, when known."""
    operation = exchange.operation
    values: dict[str, object] = {
        "event": event, "client_ip": exchange.client_ip,
        "operation": operation.operation_id if operation is not None else None,
        "scheme": scheme}
    if principal is not None:
        subject, key_id = principal.subject, principal.key_id
        if principal.issuer is not None:
            values["issuer"] = principal.issuer
    if subject is not None:
        values["subject"] = subject
    if key_id is not None:
        values["key_id"] = key_id
    return values


def authn_failure(exchange: Exchange, scheme: str, failure: AuthFailure) -> None:
    values = _event("authn-failure", exchange, scheme, None, failure.subject, failure.key_id)
    security_log.warning("authentication failed", extra=fields(
        "security", exchange.id, **values, reason=failure.reason))
    if subscribers:
        _publish({**values, "reason": failure.reason})


def authn_success(exchange: Exchange, principal: Principal) -> None:
    """A credential verified just now (not a cache hit)."""
    if not security_log.isEnabledFor(logging.INFO):
        return
    values = _event("authn-success", exchange, principal.scheme, principal)
    security_log.info("credential verified", extra=fields("security", exchange.id, **values))


def authz_denied(exchange: Exchange, reason: str) -> None:
    principal = exchange.principal
    values = _event("authz-denied", exchange, principal.scheme if principal else None,
                    principal)
    security_log.warning("access denied", extra=fields(
        "security", exchange.id, **values, reason=reason))
    if subscribers:
        _publish({**values, "reason": reason})


def ban(exchange: Exchange, record: BanRecord) -> None:
    values = _event("ban", exchange, None)
    security_log.warning("banned", extra=fields(
        "security", exchange.id, **values, target=record.kind, value=record.value,
        rule=record.rule, until=round(record.until, 3), offense=record.offense))
    if subscribers:
        _publish({**values, "target": record.kind, "value": record.value,
                  "rule": record.rule, "offense": record.offense})


def login_refusal(exchange: Exchange, status: int, public: bool) -> None:
    """The upstream answered 401 or 403 (`status`) to a request apishield let through.

    Logged when the operation is a login operation: marked `login: true` (`x-apishield`
    or `operations.<operationId>`), or public (no `security`) and answered 401, because
    an operation apishield does not authenticate has no reason to answer 401 other than
    the credentials in the request (a password form, a token grant) being wrong; a
    `login: false` turns that guess off. A 403 from a public operation is not counted (it
    means many things); mark the operation to count it."""
    operation = exchange.operation
    if operation is None or exchange.problem is not None:
        return
    login = operation.policy.login
    if not (login or (login is None and public and status == 401)):
        return
    values = _event("upstream-authn-failure", exchange, None)
    security_log.warning("login refused by the upstream", extra=fields(
        "security", exchange.id, **values, status=status))
    if subscribers:
        _publish({**values, "status": status})


class _Successes:
    """Successful authentications counted per cached `Principal`, written per identity
    once per interval (and when the pipeline closes)."""

    def __init__(self) -> None:
        self.counts: dict[Principal | None, int] = {}
        self.scheduled = False

    def count(self, principal: Principal) -> None:
        counts = self.counts
        seen = counts.get(principal)
        if seen is not None:
            counts[principal] = seen + 1
            return
        if len(counts) >= MAX_IDENTITIES:  # bounded memory: the rest counted together
            counts[None] = counts.get(None, 0) + 1
        else:
            counts[principal] = 1
        if not self.scheduled:
            try:
                asyncio.get_running_loop().call_later(SUMMARY_INTERVAL, self._due)
            except RuntimeError:  # no loop (a test, a script): written at close
                return
            self.scheduled = True

    def _due(self) -> None:
        self.flush()

    def flush(self) -> None:
        # a timer left on a loop that ended never fires: the next count schedules anew
        self.scheduled = False
        counts, self.counts = self.counts, {}
        if not counts or not security_log.isEnabledFor(logging.INFO):
            return
        by_identity: dict[tuple[str | None, ...], int] = {}
        for principal, count in counts.items():
            key = ((principal.scheme, principal.subject, principal.key_id, principal.issuer)
                   if principal is not None else (None, None, None, None))
            by_identity[key] = by_identity.get(key, 0) + count
        for (scheme, subject, key_id, issuer), count in by_identity.items():
            values: dict[str, object] = {"event": "authn-success-summary", "scheme": scheme,
                                         "subject": subject, "count": count,
                                         "interval_s": SUMMARY_INTERVAL}
            if key_id is not None:
                values["key_id"] = key_id
            if issuer is not None:
                values["issuer"] = issuer
            if subject is None:
                values["overflow"] = True  # more identities than MAX_IDENTITIES
            security_log.info("authentications succeeded", extra=fields("security", None, **values))


_successes = _Successes()
authenticated = _successes.count  # the hot path: one dict increment per request
flush = _successes.flush  # at pipeline close: the last interval's counts
