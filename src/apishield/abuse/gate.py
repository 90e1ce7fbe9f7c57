"""Between the pipeline and the bans: which outcomes count as abuse, and where bans live.

Every finished request is mapped to at most one event kind that `rate_limiting.bans`
rules can count (A9, D5):
- `authn-failure`: a credential was presented and refused (401 from apishield, but not a
  request that sent none), or the upstream itself answered 401 (a failed password login
  behind a public login operation: credential stuffing);
- `authz-denied`: 403 from apishield's authorization or from the upstream;
- `validation`: the contract refused parameters or a body; `injection`: a payload;
- `not-found`: an undeclared path or method (probing);
- `rate-limited`: a rate limit refused the request.
The ban store is opened when the gateway starts (not by `apishield check`), and only when
there is something to read or write: rules are configured, the state is Redis, or the
state file exists. Without rules the gateway creates no file (the demo, a middleware in a
read-only folder); if `apishield bans add` creates the file later, the gateway opens it
at its next housekeeping tick, so operator bans work without rules too.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from apishield import problems
from apishield.config import Config
from apishield.observe import events

if TYPE_CHECKING:
    from apishield.abuse.bans import BanRules
    from apishield.exchange import Exchange
    from apishield.state.bans import BanRecord, BanStore

_EVENTS: tuple[tuple[type[problems.Problem], str], ...] = (
    (problems.Unauthorized, "authn-failure"),
    (problems.AccessDenied, "authz-denied"),
    (problems.InjectionSuspected, "injection"),
    (problems.InvalidParameters, "validation"),
    (problems.InvalidBody, "validation"),
    (problems.NotFound, "not-found"),
    (problems.MethodNotAllowed, "not-found"),
    (problems.TooManyRequests, "rate-limited"),
)


def event_of(exchange: Exchange, status: int) -> str | None:
    problem = exchange.problem
    if problem is None:
        if status == 401 or (status == 403 and exchange.delegated is not None):
            return "authn-failure"  # the upstream refused a credential (auth/delegate.py)
        if status == 403:
            return "authz-denied"
        return None
    if isinstance(problem, problems.Unauthorized) and problem.reason == "credentials-missing":
        return None  # a first request without credentials is how clients learn the scheme
    if problem.reason in ("owner-mismatch", "owner-unverifiable"):
        return "authz-denied"  # a response-side ownership refusal (a 404 or a 403)
    for kind, event in _EVENTS:
        if isinstance(problem, kind):
            return event
    if isinstance(problem, problems.BadRequest) and problem.contract_rule:
        return "validation"
    return None


class BanGate:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.rules_config = config.rate_limiting.bans.rules
        self.watching = bool(self.rules_config)
        self.listened = {event for rule in self.rules_config for event in rule.on}
        self.rules: BanRules | None = None  # once started
        self.store: BanStore | None = None
        self._started = False

    async def start(self) -> None:
        from apishield.state.open import state_exists

        self._started = True
        if self.rules_config or state_exists(self.config):
            self._open()

    def _open(self) -> None:
        from apishield.abuse.bans import BanRules
        from apishield.state.open import open_ban_store

        self.store = open_ban_store(self.config)
        self.rules = BanRules(self.rules_config, self.store)

    def check(self, ip: str | None, subject: str | None, now: float) -> BanRecord | None:
        rules = self.rules
        return None if rules is None else rules.check(ip, subject, now)

    def observe(self, exchange: Exchange, status: int) -> None:
        rules = self.rules
        if rules is None:
            return
        event = event_of(exchange, status)
        if event is None or event not in self.listened:
            return
        principal = exchange.principal
        if principal is not None:
            subject: str | None = principal.subject
        else:  # e.g. an expired but well-signed token: the account is known
            subject = getattr(exchange.problem, "subject", None)
        for ban in rules.observe_all(event, exchange.client_ip, subject, time.time()):
            events.ban(exchange, ban)

    def active(self) -> int:
        """Bans in force now (a metric, read at scrape time)."""
        if self.store is None:
            return 0
        return len(self.store.list(time.time()))

    def refresh(self) -> None:
        if self.store is not None:
            self.store.refresh()
            return
        from apishield.state.open import state_exists

        if self._started and state_exists(self.config):
            self._open()  # `apishield bans add` created the state file

    def sweep(self, now: float) -> None:
        if self.rules is not None:
            self.rules.sweep(now)

    async def close(self) -> None:
        self._started = False
        if self.store is not None:
            self.store.close()
            self.store = None
            self.rules = None
