"""The upstream's verdict on a delegated credential (`auth.schemes.<name>.mode: delegate`).

When apishield delegates a scheme, the upstream is the one that verifies the credential,
so its 401 is an authentication failure like apishield's own. Its 403 is counted as one
too: many APIs answer 403 to a wrong API key or password (AWS API Gateway, Spring
Security's defaults), and apishield cannot tell which meaning the upstream chose. Both
become an `authn-failure` security event (reason `upstream-401` / `upstream-403`), an
`apishield_auth_attempts_total` failure, and an `authn-failure` ban event (abuse/gate.py),
so the ban rules that stop password guessing at apishield stop it behind it too.
"""

from __future__ import annotations

from apishield.auth.principal import AuthFailure
from apishield.exchange import Exchange
from apishield.observe import events
from apishield.observe.metrics import METRICS

REFUSALS = (401, 403)


def upstream_refused(exchange: Exchange, status: int) -> None:
    """Call once per finished request: records the upstream's refusal of a delegated
    credential (a no-op for everything else)."""
    scheme = exchange.delegated
    if scheme is None or status not in REFUSALS or exchange.problem is not None:
        return
    reason = f"upstream-{status}"
    events.authn_failure(exchange, scheme, AuthFailure(reason))
    METRICS.auth_attempt(scheme, "failure", reason)
