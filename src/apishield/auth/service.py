"""Compile the contract's security schemes and the `auth` config into authenticators and
per-operation plans, once; run their background work (JWKS refresh, key revocation poll).

Everything a request needs is looked up here by operation: `plans[operation.pointer]` is
either PUBLIC, NOT_PUBLIC (A7: no security declared and not marked public -> refused) or
the operation's `security` list compiled as OR of AND-sets of (authenticator, scopes).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apishield.auth.authenticators import (
    ApiKeyAuthenticator,
    Authenticator,
    BasicAuthenticator,
    BearerAuthenticator,
    DelegatedAuthenticator,
    MutualTlsAuthenticator,
    RefusedAuthenticator,
)
from apishield.config import Config, ConfigError, Issuer

if TYPE_CHECKING:
    from apishield.auth.apikey_verifier import ApiKeyVerifier
    from apishield.auth.authenticators import IssuerEntry
    from apishield.auth.basic import BasicVerifier, PasswordPool
    from apishield.auth.introspection import Introspector
    from apishield.auth.jwks import KeySource
    from apishield.auth.jws import KeyProvider
    from apishield.auth.token_cache import TokenCache
    from apishield.contract.loader import Contract, Operation
    from apishield.state.keys import KeyStore
    from apishield.state.users import UserStore

logger = logging.getLogger("apishield")

_BEARER_TYPES = ("oauth2", "openIdConnect")
POLL_EVERY = 1.0  # seconds between key-store change checks (revocation from the CLI)


@dataclass(frozen=True, slots=True)
class Plan:
    """An operation's compiled `security`: any alternative that fully passes admits the
    request; `anonymous` when the list holds an empty requirement `{}` (optional auth)."""

    alternatives: tuple[tuple[tuple[Authenticator, frozenset[str]], ...], ...]
    anonymous: bool
    challenges: tuple[str, ...]  # WWW-Authenticate challenges of every scheme it accepts


PUBLIC = "public"
NOT_PUBLIC = "not-public"


def _is_bearer(scheme: dict[str, Any]) -> bool:
    kind = scheme.get("type")
    if kind in _BEARER_TYPES:
        return True
    return kind == "http" and str(scheme.get("scheme", "")).lower() == "bearer"


def used_schemes(contract: Contract) -> dict[str, list[str]]:
    """Scheme name -> the operations (pointers) whose requirements name it."""
    used: dict[str, list[str]] = {}
    for operation in contract.operations:
        if operation.public or not operation.security:
            continue
        for requirement in operation.security:
            for name in requirement:
                used.setdefault(name, []).append(operation.pointer)
    return used


def _client_certificates(config: Config) -> bool:
    return config.tls is not None and config.tls.client_cert != "none"


class AuthService:
    def __init__(self, config: Config, contract: Contract, *,
                 previous: AuthService | None = None) -> None:
        """`previous` (a live reload, when `previous.serves(config, contract)`): take over
        its authenticators with their JWKS key sets, token caches and API-key store, and
        compile only the per-operation plans again. The service that built them (the
        `_owner`) keeps running their background work; whoever holds them last closes."""
        self.config = config
        self.contract = contract
        self.source_dir = Path(config.source_dir)
        self.key_sources: list[KeySource] = []  # remote JWKS sources with background refresh
        self.introspectors: list[Introspector] = []
        self.caches: list[TokenCache] = []
        self._api_key_verifiers: dict[str, ApiKeyVerifier] = {}
        self._store: KeyStore | None = None
        self._user_store: UserStore | None = None
        self._pool: PasswordPool | None = None
        self._basic_verifiers: dict[str, BasicVerifier] = {}
        self._pepper = b""
        self._tasks: list[asyncio.Task[None]] = []
        self.started = False
        # issuer -> why its shared secret is weak (loaded with allow_weak_secret: true)
        self.weak_secrets: dict[str, str] = {}
        self._owner: AuthService = self
        self.authenticators: dict[str, Authenticator]
        problems: list[str] = []
        if previous is not None:
            owner = self._owner = previous._owner
            self.key_sources, self.introspectors = owner.key_sources, owner.introspectors
            self.caches = owner.caches
            self.authenticators = previous.authenticators
            self.weak_secrets = previous.weak_secrets
        else:
            self.authenticators = self._build_authenticators(problems)
        self.plans: dict[str, Plan | str] = {
            operation.pointer: self._plan(operation, problems)
            for operation in contract.operations
        }
        if problems:
            raise ConfigError(problems)

    def serves(self, config: Config, contract: Contract) -> bool:
        """Whether the authenticators built here are exactly those `config` and `contract`
        would build (then a reload keeps them, with their caches and key sets)."""
        old = self.config
        return (old.auth == config.auth and old.state == config.state
                and old.state_password == config.state_password
                and old.source_dir == config.source_dir
                and _client_certificates(old) == _client_certificates(config)
                and self.contract.security_schemes == contract.security_schemes
                and used_schemes(self.contract).keys() == used_schemes(contract).keys())

    # -- compile ------------------------------------------------------------------------

    def _build_authenticators(self, problems: list[str]) -> dict[str, Authenticator]:
        auth = self.config.auth
        schemes = self.contract.security_schemes
        used = used_schemes(self.contract)
        delegated = {name for name, settings in auth.schemes.items()
                     if settings.mode == "delegate"}
        refused = {name for name, settings in auth.schemes.items()
                   if settings.mode == "refuse"}
        problems.extend(
            f"auth.schemes.{scheme_name}: the contract's components.securitySchemes "
            f"declares no scheme named {scheme_name!r} (it declares: "
            f"{', '.join(sorted(schemes)) or 'none'})"
            for scheme_name in auth.schemes if scheme_name not in schemes)
        for issuer_name, issuer in auth.issuers.items():
            for scheme_name in issuer.schemes:
                scheme = schemes.get(scheme_name)
                if scheme is None or not _is_bearer(scheme):
                    problems.append(
                        f"auth.issuers.{issuer_name}.schemes: {scheme_name!r} is not a bearer, "
                        "oauth2 or openIdConnect scheme of the contract's "
                        "components.securitySchemes")
                elif scheme_name in delegated:
                    problems.append(
                        f"auth.issuers.{issuer_name}.schemes: {scheme_name!r} is delegated "
                        f"(auth.schemes.{scheme_name}.mode: delegate), so no issuer verifies "
                        "it here; remove it from one of the two")
                elif scheme_name in refused:
                    problems.append(
                        f"auth.issuers.{issuer_name}.schemes: {scheme_name!r} is refused "
                        f"(auth.schemes.{scheme_name}.mode: refuse), so this issuer would "
                        f"never verify it; remove the mode: refuse line to verify it here")
        built: dict[str, Authenticator] = {}
        for name, scheme in schemes.items():
            where = f"components.securitySchemes.{name}"
            kind = scheme.get("type")
            count = len(used.get(name, ()))
            try:
                if name in refused:
                    built[name] = RefusedAuthenticator(name, scheme, auth.realm)
                elif name in delegated:
                    if kind == "mutualTLS":
                        problems.append(
                            f"auth.schemes.{name}.mode: a mutualTLS scheme cannot be delegated: "
                            "the TLS connection ends at apishield, so the upstream never sees "
                            "the client certificate; verify it here (tls.client_ca)")
                        continue
                    built[name] = DelegatedAuthenticator(name, scheme, auth.realm)
                elif _is_bearer(scheme):
                    issuers = {key: value for key, value in auth.issuers.items()
                               if not value.schemes or name in value.schemes}
                    if not issuers:
                        if count:
                            problems.append(
                                f"{where}: used by {count} operation(s) but no issuer in "
                                "auth.issuers serves it; add one (with `schemes: "
                                f"[{name}]` if several issuers are configured), or let the "
                                f"upstream verify it: auth.schemes.{name}: "
                                "{mode: delegate}")
                        continue
                    built[name] = self._bearer(name, scheme, issuers)
                elif kind == "apiKey":
                    built[name] = ApiKeyAuthenticator(
                        name, auth.realm, scheme["in"], scheme["name"],
                        functools.partial(self._api_keys, name))
                elif kind == "mutualTLS":
                    tls = self.config.tls
                    if count and (tls is None or tls.client_cert == "none"):
                        problems.append(
                            f"{where}: mutualTLS needs client certificates: set "
                            "tls.client_ca and tls.client_cert (optional or required)")
                        continue
                    built[name] = MutualTlsAuthenticator(name)
                elif kind == "http" and str(scheme.get("scheme", "")).lower() == "basic":
                    built[name] = BasicAuthenticator(
                        name, auth.realm, functools.partial(self._basic, name))
                elif count:
                    problems.append(
                        f"{where}: apishield cannot verify the {kind} scheme "
                        f"{scheme.get('scheme')!r} (it verifies bearer tokens, API keys, HTTP "
                        "basic and client certificates) and it is used by "
                        f"{count} operation(s). To let the upstream verify it, write "
                        f"auth.schemes.{name}: {{mode: delegate}}: apishield then only "
                        "checks that the credential is present and passes it on")
            except ConfigError as exc:  # located already (auth.issuers.<name>...)
                problems.extend(p for p in exc.problems if p not in problems)
            except (ValueError, OSError) as exc:
                problems.append(f"{where}: {exc}")
        return built

    def _bearer(self, name: str, scheme: dict[str, Any],
                issuers: dict[str, Issuer]) -> BearerAuthenticator:
        from apishield.auth.introspection import Introspector
        from apishield.auth.jwks import KeySource, StaticKeys
        from apishield.auth.jws import TokenVerifier
        from apishield.auth.token_cache import TokenCache

        cache = TokenCache()
        self.caches.append(cache)
        verifiers: dict[str | None, IssuerEntry] = {}
        introspectors = []
        for issuer_name, issuer in issuers.items():
            if issuer.algorithms:
                refresh = None
                keys: KeyProvider | None
                if issuer.keys:
                    keys = StaticKeys(issuer, self.source_dir, name=issuer_name)
                elif issuer.shared_secret is not None:
                    keys = None
                else:
                    discovery = scheme.get("openIdConnectUrl") if issuer.discovery else None
                    keys = KeySource(issuer, discovery_url=discovery,
                                     on_removed=self._evict(issuer_name), name=issuer_name)
                    self.key_sources.append(keys)
                    refresh = keys.refresh_for_unknown
                verifier = TokenVerifier(issuer_name, issuer, keys, name,
                                         source_dir=self.source_dir)
                if issuer.issuer in verifiers:
                    same = (f"issuer {issuer.issuer!r}" if issuer.issuer is not None
                            else "check_issuer: false")
                    raise ValueError(
                        f"issuers {verifiers[issuer.issuer][0]!r} and {issuer_name!r} both "
                        f"have {same}, so a token could not say which one signed it; tell "
                        f"them apart, or give one `schemes` without {name}")
                verifiers[issuer.issuer] = (issuer_name, verifier, refresh)
                weak = getattr(verifier.keys, "weak", None)  # StaticKeys of a shared secret
                if weak is not None:
                    self.weak_secrets[issuer_name] = weak
            if issuer.introspection is not None:
                introspector = Introspector(issuer_name, issuer, name, self.source_dir)
                introspectors.append(introspector)
                self.introspectors.append(introspector)
        return BearerAuthenticator(name, self.config.auth.realm, verifiers, introspectors,
                                   cache)

    def _evict(self, issuer_name: str) -> Callable[[set[str]], None]:
        def evict(kids: set[str]) -> None:
            for cache in self.caches:
                cache.evict_kids(issuer_name, kids)
        return evict

    def _plan(self, operation: Operation, problems: list[str]) -> Plan | str:
        if operation.public:
            return PUBLIC
        if operation.security is None:
            return NOT_PUBLIC
        policy = operation.policy
        delegated_only = bool(operation.security) and all(
            requirement and all(isinstance(self.authenticators.get(name),
                                           DelegatedAuthenticator) for name in requirement)
            for requirement in operation.security)
        if (policy.require is not None or policy.owner is not None) and delegated_only:
            rules = " and ".join(name for name, rule in (("require", policy.require),
                                                         ("owner", policy.owner)) if rule)
            names = sorted({name for requirement in operation.security for name in requirement})
            problems.append(
                f"{self.contract.source.name}#{operation.pointer}: sets {rules}, which needs a "
                f"verified caller, but every scheme it accepts is delegated "
                f"({', '.join(names)}: the upstream verifies them, so apishield never knows "
                f"who calls); remove {rules}, or accept a scheme apishield verifies")
        alternatives = []
        anonymous = False
        challenges: list[str] = []
        for requirement in operation.security:
            if not requirement:
                anonymous = True
                continue
            alternative = []
            for name, scopes in requirement.items():
                authenticator = self.authenticators.get(name)
                if authenticator is None:
                    break  # reported by _build_authenticators
                alternative.append((authenticator, frozenset(scopes)))
                if authenticator.challenge and authenticator.challenge not in challenges:
                    challenges.append(authenticator.challenge)
            else:
                alternatives.append(tuple(alternative))
        return Plan(tuple(alternatives), anonymous, tuple(challenges))

    # -- API keys: the store is opened on first use, so `apishield check` creates nothing

    def _api_keys(self, scheme: str) -> ApiKeyVerifier:
        verifier = self._api_key_verifiers.get(scheme)
        if verifier is None:
            from apishield.auth.apikey_verifier import ApiKeyVerifier
            from apishield.auth.apikeys import load_pepper
            from apishield.state.open import open_key_store

            store = self._store
            if store is None:
                store = self._store = open_key_store(self.config)  # SQLite file or Redis
                self._pepper = load_pepper(self.config, store)
            verifier = ApiKeyVerifier(store, self._pepper,
                                      self.config.auth.api_keys.cache_ttl, scheme)
            self._api_key_verifiers[scheme] = verifier
        return verifier

    # -- Basic users: the store and the thread pool are opened on first use too

    def _basic(self, scheme: str) -> BasicVerifier:
        verifier = self._basic_verifiers.get(scheme)
        if verifier is None:
            from apishield.auth.basic import BasicVerifier, PasswordPool
            from apishield.state.open import open_user_store

            if self._user_store is None:
                self._user_store = open_user_store(self.config)  # SQLite file or Redis
            if self._pool is None:
                self._pool = PasswordPool(self.config.auth.basic)
            verifier = BasicVerifier(self._user_store, self._pool, self.config.auth.basic,
                                     scheme)
            self._basic_verifiers[scheme] = verifier
        return verifier

    def mode_warnings(self) -> list[str]:
        """For `apishield check` and `serve`: each scheme an operation uses that apishield
        does not verify itself (`auth.schemes.<name>.mode` delegate or refuse)."""
        used = used_schemes(self.contract)
        found = []
        for name, authenticator in self.authenticators.items():
            if name not in used:
                continue
            where = f"components.securitySchemes.{name}"
            count = f"{len(used[name])} operation(s)"
            if isinstance(authenticator, DelegatedAuthenticator):
                found.append(f"{where}: delegated (auth.schemes.{name}.mode: delegate): the "
                             f"upstream verifies it; apishield only checks it is present "
                             f"({count})")
            elif isinstance(authenticator, RefusedAuthenticator):
                found.append(f"{where}: refused (auth.schemes.{name}.mode: refuse): every "
                             f"credential of it is answered 401 ({count}); configure it (an "
                             "issuer, or mode: delegate) and remove the line")
        return found

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Fetch remote keys and start the background refresh and revocation poll."""
        if self._owner is not self:
            await self._owner.start()  # started already when it ran before the reload
            return
        if self.started:
            return
        self.started = True
        # concurrently: an issuer that is down costs its fetch timeout once, not per issuer
        await asyncio.gather(*(source.start() for source in self.key_sources))
        key_schemes = [name for name, a in self.authenticators.items()
                       if isinstance(a, ApiKeyAuthenticator)]
        for name in key_schemes:
            self._api_keys(name)  # open the store now: a bad pepper or file stops the start
        basic_schemes = [name for name, a in self.authenticators.items()
                         if isinstance(a, BasicAuthenticator)]
        for name in basic_schemes:
            self._basic(name)
        if key_schemes or basic_schemes:
            self._tasks.append(asyncio.create_task(self._poll_keys()))

    async def _poll_keys(self) -> None:
        while True:
            await asyncio.sleep(POLL_EVERY)
            for store, verifiers, what in (
                    (self._store, self._api_key_verifiers, "API key"),
                    (self._user_store, self._basic_verifiers, "user")):
                if store is None:
                    continue
                try:
                    changed = store.changed()  # one read for every scheme sharing the store
                except Exception:
                    changed = True  # cannot tell: forget what was verified (fail closed)
                    logger.exception("%s store poll failed", what)
                if changed:
                    for verifier in verifiers.values():
                        verifier.clear()

    async def close(self) -> None:
        if self._owner is not self:
            await self._owner.close()
            return
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for source in self.key_sources:
            await source.close()
        if self._store is not None:
            self._store.close()
            self._store = None
            self._api_key_verifiers.clear()
        if self._user_store is not None:
            self._user_store.close()
            self._user_store = None
            self._basic_verifiers.clear()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
