"""Object-level authorization on the response (checklist A6, OWASP API1 BOLA).

Some APIs find an object by something other than its owner (`GET /things/{title}`), so no
request value can be checked: only the answer says whose object it is. With
`owner: {response: body.owner, equals: subject}` the gateway reads the JSON answer before
any byte of it is sent, and
- one object whose owner field is not the caller's identity becomes a 404 (or 403 with
  `on_mismatch: 403`) with nothing of the body: a 404 says nothing of the object's
  existence, exactly what a request-side rule would have answered;
- a list (`body[].owner`, `body.items[].owner`) keeps only the caller's items.
What cannot be checked (not JSON, the field missing, no caller) is refused, not sent:
fail closed. A refusal is an authorization failure in the security events and for bans
(reason `owner-mismatch`); a list cut is `owner-filtered` in the access log.

Only 2xx JSON answers are read: an error carries no object, and a 304 no body.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson

from apishield.contract.loader import Contract
from apishield.exchange import Exchange, Headers, media_type
from apishield.observe import events
from apishield.problems import AccessDenied, NotFound, Problem
from apishield.steps.authorize import identity_for, owned_text
from apishield.steps.validate import is_json

logger = logging.getLogger("apishield")

REASON = "owner-mismatch"


@dataclass(frozen=True, slots=True)
class _Rule:
    path: tuple[str, ...]  # to the owner value, or to the list
    item_path: tuple[str, ...] | None  # inside each item of the list; None: one object
    equals: str
    bypass: frozenset[str]
    status: int  # 404 or 403 on a mismatch


def _walk(value: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


class ResponseOwnership:
    name = "response_owner"

    def __init__(self, contract: Contract) -> None:
        self.rules: dict[str, _Rule] = {}
        for operation in contract.operations:
            owner = operation.policy.owner
            if owner is None or owner.response is None:
                continue
            path, item_path = owner.response_path()
            self.rules[operation.pointer] = _Rule(path, item_path, owner.equals,
                                                  frozenset(owner.bypass_roles),
                                                  owner.on_mismatch)

    def applies(self, exchange: Exchange, status: int, headers: Headers) -> bool:
        """Whether this response's body must be read for its owner."""
        operation = exchange.operation
        if operation is None or operation.pointer not in self.rules:
            return False
        # every 2xx with a body is read: one that is not JSON cannot be checked and is
        # refused by `apply`, never sent unchecked
        return 200 <= status < 300 and status != 204 and exchange.method != "HEAD"

    def apply(self, exchange: Exchange, status: int, body: bytes,
              headers: Headers) -> bytes:
        """The body the caller may see; raises the refusal otherwise."""
        operation = exchange.operation
        assert operation is not None
        rule = self.rules[operation.pointer]
        principal = exchange.principal
        if principal is not None and rule.bypass & principal.roles:
            return body
        expected = identity_for(principal, rule.equals) if principal is not None else None
        content_type = next((value for name, value in headers if name == b"content-type"),
                            b"")
        try:
            if not is_json(media_type(content_type)):
                raise ValueError("not JSON")
            document = orjson.loads(body)
        except ValueError:  # orjson.JSONDecodeError is one
            raise self._refuse(exchange, rule, "owner-unverifiable") from None
        if expected is None:
            raise self._refuse(exchange, rule, REASON)
        if rule.item_path is None:
            if owned_text(_walk(document, rule.path)) != expected:
                raise self._refuse(exchange, rule, REASON)
            return body
        items = _walk(document, rule.path) if rule.path else document
        if not isinstance(items, list):
            raise self._refuse(exchange, rule, "owner-unverifiable")
        item_path = rule.item_path
        kept = [item for item in items if owned_text(_walk(item, item_path)) == expected]
        if len(kept) == len(items):
            return body
        dropped = len(items) - len(kept)
        logger.info("request %s: %d of %d item(s) of another owner dropped from the "
                    "response of %s", exchange.id, dropped, len(items), operation.label)
        exchange.reason = exchange.reason or "owner-filtered"
        if not rule.path:
            return orjson.dumps(kept)
        parent = _walk(document, rule.path[:-1])
        assert isinstance(parent, dict)  # the list was found through it
        parent[rule.path[-1]] = kept
        return orjson.dumps(document)

    @staticmethod
    def _refuse(exchange: Exchange, rule: _Rule, reason: str) -> Problem:
        events.authz_denied(exchange, reason)
        return NotFound(reason) if rule.status == 404 else AccessDenied(reason)
