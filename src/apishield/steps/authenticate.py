"""Authentication (checklist A1-A4, A7): the operation's `security` requirements, as
written in the contract, OR of AND-sets.

The first alternative whose every scheme authenticates and holds the required scopes
admits the request and sets `exchange.principal`. Otherwise the answer is, in this order:
- 403 `access-denied` when some alternative authenticated but lacked a scope (the caller
  is known, asking again with the same credential cannot help; RFC 6750 3.1
  `insufficient_scope`);
- 401 `unauthorized` when a credential was presented and is not valid, or none was
  presented, with one WWW-Authenticate challenge per accepted scheme (RFC 7235 3.1).
An optional requirement (`{}` in the list) admits anonymous callers, but a credential that
is presented and invalid is still refused: a caller who meant to authenticate must learn
that it did not work, and a probe with stolen tokens must not look like success.
Operations with no `security` that are not marked public are refused (fail safe, A7).

A delegated scheme (`auth.schemes.<name>.mode: delegate`) passes when its credential is
present and well formed; its scopes are the upstream's to check. An alternative made only
of delegated schemes admits the request without a principal, and `exchange.delegated`
names the schemes, so the upstream's 401/403 count as authentication failures.
"""

from __future__ import annotations

from apishield.auth.authenticators import DelegatedAuthenticator
from apishield.auth.principal import AuthFailure, Principal
from apishield.auth.service import NOT_PUBLIC, PUBLIC, AuthService, Plan
from apishield.exchange import Exchange
from apishield.observe import events
from apishield.observe.metrics import METRICS
from apishield.problems import AccessDenied, NotPublic, Unauthorized


def _merge(principals: list[Principal]) -> Principal:
    """An AND-set (e.g. a client certificate and a token): the first scheme names the
    subject; scopes and roles are the union of what each credential grants."""
    if len(principals) == 1:
        return principals[0]
    first = principals[0]
    key_id = next((p.key_id for p in principals if p.key_id is not None), None)
    return Principal(
        scheme="+".join(p.scheme for p in principals),
        subject=first.subject,
        scopes=frozenset().union(*(p.scopes for p in principals)),
        roles=frozenset().union(*(p.roles for p in principals)),
        key_id=key_id,
        issuer=next((p.issuer for p in principals if p.issuer is not None), None),
        claims=first.claims,
        expires_at=min((p.expires_at for p in principals if p.expires_at is not None),
                       default=None),
    )


class AuthenticateStep:
    name = "authenticate"

    def __init__(self, service: AuthService) -> None:
        self.plans = service.plans
        realm = service.config.auth.realm
        self._invalid_suffix = ', error="invalid_token"'
        self._realm = realm

    def on_head(self, exchange: Exchange) -> None:
        operation = exchange.operation
        if operation is None:
            return
        plan = self.plans.get(operation.pointer)
        if plan is PUBLIC:
            return
        if plan is NOT_PUBLIC or plan is None:
            raise NotPublic("no-security-declared")
        assert isinstance(plan, Plan)
        request = exchange
        failure: tuple[str, AuthFailure] | None = None
        denied: tuple[Principal, frozenset[str]] | None = None
        for alternative in plan.alternatives:
            principals: list[Principal] = []
            delegated: list[str] = []
            for authenticator, scopes in alternative:
                try:
                    credential = authenticator.credential(request)
                    if credential is None:
                        break
                    if isinstance(authenticator, DelegatedAuthenticator):
                        delegated.append(authenticator.name)
                        continue
                    principal = authenticator.authenticate(credential, exchange)
                except AuthFailure as error:
                    if failure is None:
                        failure = (authenticator.name, error)
                    break
                if scopes and not scopes <= principal.scopes:
                    if denied is None:
                        denied = (principal, scopes)
                    break
                principals.append(principal)
            else:
                if delegated:
                    exchange.delegated = "+".join(delegated)
                if principals:
                    exchange.principal = principal = _merge(principals)
                    events.authenticated(principal)  # counted; summarised per identity (F1)
                METRICS.auth_attempt(alternative[0][0].name if len(alternative) == 1 else
                                     "+".join(a.name for a, _ in alternative), "success",
                                     "ok" if principals else "delegated")
                return
        if denied is not None:
            principal, scopes = denied
            exchange.principal = principal  # for the event and the access log
            events.authz_denied(exchange, "scope-missing")
            scope = " ".join(sorted(scopes))
            raise AccessDenied("scope-missing", headers=[(
                b"www-authenticate",
                f'Bearer realm="{self._realm}", error="insufficient_scope", '
                f'scope="{scope}"'.encode(),
            )])
        if failure is not None:
            scheme, first = failure
            events.authn_failure(exchange, scheme, first)
            METRICS.auth_attempt(scheme, "failure", first.reason)
            refusal = Unauthorized(first.reason, headers=self._challenges(plan, invalid=True))
            refusal.subject = first.subject  # the account tried, when known (ban rules)
            raise refusal
        if plan.anonymous:
            return
        METRICS.auth_attempt("none", "failure", "credentials-missing")
        raise Unauthorized("credentials-missing", headers=self._challenges(plan, invalid=False))

    def _challenges(self, plan: Plan, *, invalid: bool) -> list[tuple[bytes, bytes]]:
        """RFC 6750 3: `error="invalid_token"` when a token was sent and refused; no
        error code when none was sent (3.1: the client may not know it needs one)."""
        out = []
        for challenge in plan.challenges:
            if invalid and challenge.startswith("Bearer "):
                challenge += self._invalid_suffix
            out.append((b"www-authenticate", challenge.encode()))
        return out
