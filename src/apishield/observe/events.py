"""Security events (checklist F1): one structured JSON line per authentication outcome
worth keeping, on the `apishield.security` logger.

Failures are always logged with their precise reason (which the client never sees). A
success is logged when a credential is verified for the first time (a cache miss), not on
every request: per request, the access log carries the subject and key id already, and a
log line per request would cost more than the cache hit it reports. Values are the
gateway's own (reason codes, ids, addresses); a token or key never appears (F6).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from apishield.auth.principal import AuthFailure, Principal
    from apishield.exchange import Exchange

security_log = logging.getLogger("apishield.security")


def _base(kind: str, exchange: Exchange, scheme: str) -> dict[str, object]:
    operation = exchange.operation
    return {
        "event": kind,
        "ts": round(time.time(), 3),
        "request_id": exchange.id,
        "client_ip": exchange.client_ip,
        "operation": operation.operation_id if operation is not None else None,
        "scheme": scheme,
    }


def authn_failure(exchange: Exchange, scheme: str, failure: AuthFailure) -> None:
    event = _base("authn-failure", exchange, scheme)
    event["reason"] = failure.reason
    if failure.subject is not None:
        event["subject"] = failure.subject
    if failure.key_id is not None:
        event["key_id"] = failure.key_id
    security_log.warning("%s", orjson.dumps(event).decode())


def authn_success(exchange: Exchange, principal: Principal) -> None:
    if not security_log.isEnabledFor(logging.INFO):
        return
    event = _base("authn-success", exchange, principal.scheme)
    event["subject"] = principal.subject
    if principal.key_id is not None:
        event["key_id"] = principal.key_id
    if principal.issuer is not None:
        event["issuer"] = principal.issuer
    security_log.info("%s", orjson.dumps(event).decode())


def authz_denied(exchange: Exchange, reason: str) -> None:
    principal = exchange.principal
    event = _base("authz-denied", exchange, principal.scheme if principal else "")
    event["reason"] = reason
    if principal is not None:
        event["subject"] = principal.subject
        if principal.key_id is not None:
            event["key_id"] = principal.key_id
    security_log.warning("%s", orjson.dumps(event).decode())
