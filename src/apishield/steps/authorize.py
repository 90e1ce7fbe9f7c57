"""Authorization beyond scopes (checklist A5, A6): roles and permissions an operation
requires, and object-level ownership rules (OWASP API1, BOLA/IDOR).

Least privilege: a caller holds only the roles its token claims or its API key record
lists, and only the permissions the policy's `auth.roles` maps those roles to, plus its
scopes (a scope is a permission the token grants); nothing is implied. A permission
`orders:*` in a role grants every `orders:...` permission; `*` grants all.

Ownership: `owner: {param: path.user_id, equals: subject}` refuses a request whose value
differs from the caller's identity, unless the caller holds a bypass role. A missing value
is refused too (fail safe). Values compare as strings: `42` in a path equals a numeric
`sub` claim 42. Body fields are read after the body passed validation (body phase).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

import orjson

from apishield.auth.principal import Principal
from apishield.config import Config, Owner, Require
from apishield.contract.loader import Contract
from apishield.exchange import Exchange, media_type
from apishield.observe import events
from apishield.problems import AccessDenied, Unauthorized


@dataclass(frozen=True, slots=True)
class _Rule:
    roles: frozenset[str]  # any of
    permissions: frozenset[str]  # all of
    owner: Owner | None
    owner_source: str  # path | query | header | body
    owner_path: tuple[str, ...]  # the name (or the body field path)
    bypass: frozenset[str]


def _has(granted: frozenset[str], permission: str) -> bool:
    if permission in granted or "*" in granted:
        return True
    prefix = permission.split(":", 1)[0]
    return f"{prefix}:*" in granted


def _claim(principal: Principal, dotted: str) -> Any:
    value: Any = principal.claims
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def owned_text(value: Any) -> str | None:
    """A scalar as the string a URL or header would carry; objects never match."""
    if isinstance(value, bool) or value is None or isinstance(value, dict | list):
        return None
    return str(value)


def identity_for(principal: Principal, equals: str) -> str | None:
    """What an ownership rule compares a value with: `subject`, `key_id` or
    `claim.<dotted path>` of the caller, as text."""
    if equals == "subject":
        return principal.subject
    if equals == "key_id":
        return principal.key_id
    return owned_text(_claim(principal, equals[len("claim."):]))


class AuthorizeStep:
    name = "authorize"

    def __init__(self, config: Config, contract: Contract) -> None:
        self.role_permissions = {role: frozenset(perms) for role, perms in
                                 config.auth.roles.items()}
        self.rules: dict[str, _Rule] = {}
        for operation in contract.operations:
            require: Require | None = operation.policy.require
            owner: Owner | None = operation.policy.owner
            if owner is not None and owner.param is None:
                owner = None  # the response side: steps/response_owner.py
            if require is None and owner is None:
                continue
            source = ""
            path: tuple[str, ...] = ()
            if owner is not None and owner.param is not None:
                source, _, rest = owner.param.partition(".")
                path = tuple(rest.split(".")) if source == "body" else (rest,)
            self.rules[operation.pointer] = _Rule(
                roles=frozenset(require.roles) if require else frozenset(),
                permissions=frozenset(require.permissions) if require else frozenset(),
                owner=owner,
                owner_source=source,
                owner_path=path,
                bypass=frozenset(owner.bypass_roles) if owner else frozenset(),
            )
        self.body_rules = {pointer for pointer, rule in self.rules.items()
                           if rule.owner_source == "body"}
        self._granted = lru_cache(maxsize=1024)(self._permissions)

    def _permissions(self, roles: frozenset[str], scopes: frozenset[str]) -> frozenset[str]:
        granted = set(scopes)
        for role in roles:
            granted |= self.role_permissions.get(role, frozenset())
        return frozenset(granted)

    def needs_body(self, exchange: Exchange) -> bool:
        operation = exchange.operation
        return operation is not None and operation.pointer in self.body_rules

    def on_head(self, exchange: Exchange) -> None:
        operation = exchange.operation
        if operation is None:
            return
        rule = self.rules.get(operation.pointer)
        if rule is None:
            return
        principal = exchange.principal
        if principal is None:  # anonymous (`{}` requirement) on an operation with rules
            raise Unauthorized("credentials-missing")
        if rule.roles and not (rule.roles & principal.roles):
            self._deny(exchange, "role-missing")
        if rule.permissions:
            granted = self._granted(principal.roles, principal.scopes)
            for permission in rule.permissions:
                if not _has(granted, permission):
                    self._deny(exchange, "permission-missing")
        if rule.owner is not None and rule.owner_source != "body":
            self._check_owner(exchange, rule, principal, self._head_value(exchange, rule))

    def on_body(self, exchange: Exchange) -> None:
        operation = exchange.operation
        if operation is None or operation.pointer not in self.body_rules:
            return
        rule = self.rules[operation.pointer]
        principal = exchange.principal
        if principal is None:
            raise Unauthorized("credentials-missing")
        value: Any = None
        request = exchange
        content_type = request.header(b"content-type") or b""
        if request.body and media_type(content_type).endswith("json"):
            try:
                value = orjson.loads(request.body)
            except orjson.JSONDecodeError:
                value = None
            for part in rule.owner_path:
                value = value.get(part) if isinstance(value, dict) else None
        self._check_owner(exchange, rule, principal, owned_text(value))

    def _head_value(self, exchange: Exchange, rule: _Rule) -> str | None:
        name = rule.owner_path[0]
        request = exchange
        if rule.owner_source == "path":
            return exchange.path_params.get(name)  # decoded once by the route step
        if rule.owner_source == "header":
            found = [v for k, v in request.headers if k == name.lower().encode("latin-1")]
            return found[0].decode("latin-1").strip() if len(found) == 1 else None
        found_q = []
        for pair in request.query.split(b"&"):
            key, _, raw = pair.partition(b"=")
            if unquote(key.decode("latin-1")) == name:
                found_q.append(unquote(raw.decode("latin-1").replace("+", " ")))
        return found_q[0] if len(found_q) == 1 else None  # repeated: ambiguous, refused

    def _check_owner(self, exchange: Exchange, rule: _Rule, principal: Principal,
                     value: str | None) -> None:
        if rule.bypass & principal.roles:
            return
        owner = rule.owner
        assert owner is not None
        expected = identity_for(principal, owner.equals)
        if value is None or expected is None or value != expected:
            self._deny(exchange, "not-owner")

    @staticmethod
    def _deny(exchange: Exchange, reason: str) -> None:
        events.authz_denied(exchange, reason)
        raise AccessDenied(reason)
