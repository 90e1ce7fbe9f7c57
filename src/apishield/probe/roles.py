"""Roles (OWASP API5, checklist A5): each identity calls each operation its roles should
not reach.

An operation's policy `require`s roles (any of them) or permissions (all of them, granted
by the roles through `auth.roles`, or directly by a token's scopes). The probe must know
what an identity holds: a JWT's roles are read from the claims its issuer's
`role_claims` name (and its scopes from `scope_claims`); an API key's or a Basic user's
live in the server's store, which the probe can not read, so they are given on the
command line: `--identity name:role1,role2=CREDENTIAL` (`name:=CREDENTIAL` for none). An
identity whose roles are unknown makes no role attempts (a plan note says so), because
a guess would report holes that are not there. Written roles win over a token's claims.

Expected: 403 (`access-denied`). A 401 means the identity was not even authenticated:
the attempt is "inconclusive", not a refusal (it proves nothing about roles).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from apishield.auth.jws import roles_from, scopes_from
from apishield.config import Config
from apishield.probe.plan import Attempt, Identity
from apishield.probe.sender import Answer
from apishield.probe.tokens import decode_jwt
from apishield.probe.verdict import Outcome, SentRequest, judge

if TYPE_CHECKING:
    from apishield.probe.multistep import Send
    from apishield.probe.plan import _Planner

RULE = "probe-role-escalation"
_ROLE = re.compile(r"[^\s,:=\x00-\x1f\x7f]+")  # what `keys create --role` accepts, minus , : =


def split_roles(spec: str) -> tuple[str, frozenset[str] | None]:
    """`name` or `name:role1,role2` (the part of `--identity` before `=`) -> (name, roles,
    None when not given). Raises ValueError with a message for people."""
    name, sep, listed = spec.partition(":")
    if not sep:
        return name, None
    if not name:
        raise ValueError(f"--identity {spec!r}: write NAME:ROLE,...=CREDENTIAL")
    roles = [role.strip() for role in listed.split(",")] if listed else []
    bad = [role for role in roles if not _ROLE.fullmatch(role)]
    if bad:
        raise ValueError(f"--identity {name}: role {bad[0]!r} is not a role name; write "
                         f"{name}:ROLE1,ROLE2=CREDENTIAL (or {name}:=CREDENTIAL for none)")
    return name, frozenset(roles)


def held(identity: Identity, config: Config) -> tuple[frozenset[str], frozenset[str]] | None:
    """(roles, scopes) the identity holds, or None when the probe can not know."""
    decoded = decode_jwt(identity.credential)
    claims = decoded[1] if decoded is not None else None
    issuers = list(config.auth.issuers.values())
    issuer = next((i for i in issuers if claims is not None and i.issuer is not None
                   and claims.get("iss") == i.issuer), issuers[0] if issuers else None)
    scopes: frozenset[str] = frozenset()
    if claims is not None and issuer is not None:
        scopes = scopes_from(claims, issuer.scope_claims)
    if identity.roles is not None:
        return identity.roles, scopes
    if claims is not None and issuer is not None:
        return roles_from(claims, issuer.role_claims), scopes
    return None


def _grants(granted: frozenset[str], permission: str) -> bool:
    """`*` grants all, `orders:*` every `orders:...` (as the authorize step reads them)."""
    return permission in granted or "*" in granted or \
        f"{permission.split(':', 1)[0]}:*" in granted


def missing(operation_roles: frozenset[str], permissions: frozenset[str], roles: frozenset[str],
            scopes: frozenset[str], config: Config) -> str | None:
    """What the identity lacks for the operation, in words (None: it may call it)."""
    if operation_roles and not operation_roles & roles:
        return f"one of the roles {', '.join(sorted(operation_roles))}"
    granted = set(scopes)
    for role in roles:
        granted.update(config.auth.roles.get(role, ()))
    lacking = sorted(p for p in permissions if not _grants(frozenset(granted), p))
    if lacking:
        return f"the permission(s) {', '.join(lacking)}"
    return None


@dataclass(frozen=True)
class RoleCall:
    """One request as an identity that lacks what the operation requires."""

    identity: str
    lacks: str

    @property
    def cost(self) -> int:
        return 1

    def run(self, attempt: Attempt, send: Send) -> Outcome:
        answer = send(attempt.request, True)
        sent = (SentRequest(self.identity, attempt.request.method, attempt.request.shown,
                            answer.status if isinstance(answer, Answer) else None, "call"),)
        outcome = replace(judge(attempt, answer), requests=sent)
        if not isinstance(answer, Answer):
            return outcome
        if outcome.verdict == "refused" and answer.status == 401:
            return replace(outcome, verdict="inconclusive", detail=(
                f"identity {self.identity} was not authenticated (401 "
                f"{outcome.problem_type}): check its credential; this proves nothing about "
                "its roles"))
        if outcome.verdict == "refused":
            return replace(outcome, detail=f"{outcome.detail}: identity {self.identity} "
                           f"lacks {self.lacks}")
        if outcome.verdict == "got-through":
            return replace(outcome, detail=f"identity {self.identity}, which lacks "
                           f"{self.lacks}, was {outcome.detail}")
        return outcome


def calls(planner: _Planner) -> Iterator[Attempt]:
    """Per identity, per operation it lacks the roles or permissions for: one call."""
    if RULE not in planner.rules:
        return
    operations = [op for op in planner.contract.operations
                  if op.policy.require is not None and (op.policy.require.roles or
                                                        op.policy.require.permissions)
                  and planner._scheme(op) is not None]
    if not operations:
        return
    if not planner.identities:
        planner.notes.append(f"no --identity: no role attempts on the {len(operations)} "
                             "operation(s) that require roles or permissions")
        return
    for identity in planner.identities:
        holds = held(identity, planner.config)
        if holds is None:
            planner.notes.append(
                f"identity {identity.name}: its roles are unknown (an API key or a password "
                f"is not a token the probe can read): no role attempts; write "
                f"--identity {identity.name}:ROLE,...=CREDENTIAL (or {identity.name}:=... "
                "for none)")
            continue
        roles, scopes = holds
        for operation in operations:
            require = operation.policy.require
            assert require is not None
            lacks = missing(frozenset(require.roles), frozenset(require.permissions), roles,
                            scopes, planner.config)
            if lacks is None:
                continue
            shown_roles = ", ".join(sorted(roles)) or "none"
            yield Attempt(RULE, operation.label, operation.pointer,
                          f"identity {identity.name} (roles: {shown_roles}) calls "
                          f"{operation.label}, which requires {lacks}",
                          planner.request_as(operation, identity),
                          steps=RoleCall(identity.name, lacks))
