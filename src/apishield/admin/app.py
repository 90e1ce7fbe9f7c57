"""The admin API itself, served by both front ends (see the package docstring).

    GET  /healthz   200 while the process runs (no token needed: it tells nothing)
    GET  /readyz    200 when the contract is compiled, the upstream was reached at least once
                    and the state store answers; else 503 naming each failing part
    GET  /metrics   Prometheus text format (OpenMetrics when the scraper asks for it)
    GET  /config    the effective config, secrets masked
    POST /reload    re-read config and contract now (the same as SIGHUP)
    GET  /usage     requests and refusals per identity and operation in the last hours
                    (`?top=N`); with `?since=7d&identity=..&operation=..&by=day|month`
                    the persisted daily counts, bytes included (docs/usage.md)
    GET  /policy    the effective policy per operation, as enforced (`?operation=ID`)
    GET  /dashboard the live dashboard (page and assets: no token; its data: the token),
                    see admin/dashboard.py

Errors are RFC 9457 problem documents. With a token configured every path but `/healthz`
and the dashboard's static page and assets (they carry no data) needs `Authorization:
Bearer <token>`, compared in constant time; a failed attempt is a security event.
Every call is logged (who, what, the status); every call but the probes, the dashboard's
polls and its assets is also recorded in the audit trail when the front end has one
(docs/audit-trail.md).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson
from prometheus_client.exposition import choose_encoder

from apishield.admin.dashboard import ASSETS, PAGE_HEADERS, asset, snapshot
from apishield.config import Config, ConfigError
from apishield.observe.figures import View, local
from apishield.observe.history import HISTORY, History
from apishield.observe.logjson import fields
from apishield.observe.metrics import Gauges, registry

if TYPE_CHECKING:
    from apishield.observe.audit_trail import BackgroundAuditTrail
    from apishield.pipeline import Pipeline

logger = logging.getLogger("apishield.admin")
security_log = logging.getLogger("apishield.security")

JSON = b"application/json"
PROBLEM = b"application/problem+json"
Headers = list[tuple[bytes, bytes]]
PERSISTED_PARAMETERS = frozenset({"since", "identity", "operation", "by"})
# probes and the dashboard's polls: logged only when failing
_QUIET = frozenset({"/healthz", "/readyz", "/metrics", "/dashboard/data"})
_OPEN = frozenset({"/healthz", *ASSETS})  # answered without the token: they tell nothing


@dataclass
class AdminResponse:
    status: int
    body: bytes
    content_type: bytes = JSON
    headers: Headers = field(default_factory=list)


@dataclass
class ReloadReport:
    """What a reload did, as `POST /reload` answers it: `outcome` is succeeded, unchanged
    or failed (then `problems` says why, each with its location)."""

    outcome: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Call:
    """What a handler may read of the request (no endpoint takes a body)."""

    accept: bytes
    query: str
    path: str = ""


Reload = Callable[[str], Awaitable[ReloadReport]]
Readiness = Callable[[], Awaitable[list[str]]]
Figures = Callable[[], Awaitable[View]]


def _problem(status: int, slug: str, title: str, detail: str,
             headers: Headers | None = None) -> AdminResponse:
    # a URN like the gateway's refusals (problems.py): the project publishes no site a
    # URL could point at; `admin-` keeps them apart from the API's own types
    body = orjson.dumps({"type": f"urn:apishield:problem:admin-{slug}", "title": title,
                         "status": status, "detail": detail})
    return AdminResponse(status, body, PROBLEM, headers or [])


class AdminApp:
    def __init__(
        self,
        *,
        config: Callable[[], Config],
        readiness: Readiness,
        gauges: Gauges,
        reload: Reload | None,
        token: bytes | None,
        pipeline: Callable[[], Pipeline] | None = None,
        audit: BackgroundAuditTrail | None = None,
        figures: Figures | None = None,
        history: History = HISTORY,
    ) -> None:
        """`config`: the config now in force (it changes on reload); `readiness`: the
        failing parts, none when ready; `gauges`: values read at scrape time; `reload`:
        None where the front end cannot reload; `token`: the bearer token, or None on a
        loopback listener without one; `pipeline`: the pipeline in force (`GET /policy`
        reads its compiled plans), None where the front end has none to show; `audit`:
        where every call but the probes is recorded (docs/audit-trail.md), None for none;
        `figures`: what `/metrics`, `/usage` and the dashboard read, when they are not this
        process's own (worker 0 of `serve --workers N`: every worker's, added up);
        `history`: the dashboard's past of those figures."""
        self._config = config
        self._readiness = readiness
        self._reload = reload
        self._token = token
        self._pipeline = pipeline
        self._audit = audit
        self._gauges = gauges
        self._figures = figures
        self.history = history
        self._registry = registry(gauges=gauges)
        self._routes: dict[str, dict[str, Callable[[Call], Awaitable[AdminResponse]]]] = {
            "/healthz": {"GET": self._healthz},
            "/readyz": {"GET": self._readyz},
            "/metrics": {"GET": self._metrics},
            "/config": {"GET": self._config_view},
            "/reload": {"POST": self._reload_now},
            "/usage": {"GET": self._usage},
            "/policy": {"GET": self._policy},
            "/dashboard/data": {"GET": self._dashboard_data},
        }
        for path in ASSETS:
            self._routes[path] = {"GET": self._dashboard_asset}

    async def handle(self, method: str, path: str, authorization: bytes | None,
                     accept: bytes, client: str, query: str = "") -> AdminResponse:
        """Answer one admin request; `path` is relative to where the app is mounted."""
        response = await self._answer(method, path, authorization, accept, client, query)
        if path not in _QUIET or response.status >= 400:
            # scrapes and probes every few seconds would drown everything else
            logger.info("admin %s %s from %s: %d", method, path, client, response.status)
        if self._audit is not None and path not in _QUIET and path not in _OPEN:
            # refused calls too: an attempt on the admin API is what an auditor looks for
            self._audit.submit("admin-call", client, method=method[:16], path=path[:200],
                               status=response.status)
        return response

    async def _answer(self, method: str, path: str, authorization: bytes | None,
                      accept: bytes, client: str, query: str) -> AdminResponse:
        routes = self._routes.get(path)
        if path not in _OPEN and not self._authorized(authorization):
            why = "bad-token" if authorization else "no-token"
            security_log.warning("admin API: %s from %s on %s", why.replace("-", " "), client,
                                 path, extra=fields("security", event="admin-unauthorized",
                                                    client_ip=client, reason=why, path=path))
            return _problem(401, "unauthorized", "Unauthorized",
                            "The admin API needs Authorization: Bearer <token>.",
                            [(b"www-authenticate", b'Bearer realm="apishield-admin"')])
        if routes is None:
            return _problem(404, "not-found", "Not Found", f"No admin endpoint {path}; "
                            "there are /healthz, /readyz, /metrics, /config, /reload, "
                            "/usage, /policy and /dashboard.")
        handler = routes.get(method) or (routes.get("GET") if method == "HEAD" else None)
        if handler is None:
            return _problem(405, "method-not-allowed", "Method Not Allowed",
                            f"{path} answers {', '.join(routes)} only.",
                            [(b"allow", ", ".join(routes).encode())])
        return await handler(Call(accept, query, path))

    def _authorized(self, authorization: bytes | None) -> bool:
        if self._token is None:
            return True
        if authorization is None:
            return False
        scheme, _, credential = authorization.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(),
                                                                   self._token)

    async def _healthz(self, call: Call) -> AdminResponse:
        return AdminResponse(200, b'{"status":"alive"}')

    async def _readyz(self, call: Call) -> AdminResponse:
        failing = await self._readiness()
        if failing:
            return AdminResponse(503, orjson.dumps({"status": "not-ready",
                                                    "failing": failing}))
        return AdminResponse(200, b'{"status":"ready"}')

    async def figures(self) -> View:
        """The figures to show now: this process's, or every worker's added up."""
        return local() if self._figures is None else await self._figures()

    async def sample(self) -> None:
        """One sample of the dashboard's past (the admin listener's task, every 2 s)."""
        if self._figures is not None:
            self.history.metrics = (await self._figures()).metrics
        self.history.tick()

    async def _metrics(self, call: Call) -> AdminResponse:
        encoder, content_type = choose_encoder(call.accept.decode("latin-1"))
        metrics = self._registry
        if self._figures is not None:  # a registry over this answer's sum of the workers
            metrics = registry((await self._figures()).metrics, self._gauges)
        return AdminResponse(200, encoder(metrics), content_type.encode())

    async def _config_view(self, call: Call) -> AdminResponse:
        from apishield.admin.masking import masked_config

        return AdminResponse(200, orjson.dumps(masked_config(self._config()),
                                               option=orjson.OPT_INDENT_2))

    async def _reload_now(self, call: Call) -> AdminResponse:
        if self._reload is None:
            return _problem(501, "reload-unsupported", "Not Implemented",
                            "This front end cannot reload its config: restart it.")
        report = await self._reload("admin")
        status = 422 if report.outcome == "failed" else 200
        return AdminResponse(status, orjson.dumps({**report.details,
                                                   "outcome": report.outcome}))

    async def _usage(self, call: Call) -> AdminResponse:
        top = 100
        persisted: dict[str, str] = {}
        for name, value in parse_qsl(call.query):
            if name == "top":
                if not value.isdigit() or not 1 <= int(value) <= 10_000:
                    return _problem(400, "bad-parameter", "Bad Request",
                                    "top must be a whole number from 1 to 10000.")
                top = int(value)
            elif name in PERSISTED_PARAMETERS:
                persisted[name] = value
        if persisted:
            return await self._persisted_usage(persisted)
        return AdminResponse(200, orjson.dumps((await self.figures()).usage.report(top)))

    async def _persisted_usage(self, query: dict[str, str]) -> AdminResponse:
        """`GET /usage?since=7d&identity=...&operation=...&by=day|month`: the counts the
        gateways wrote to the state store (F4), as `apishield usage --format json`."""
        from apishield.config.units import parse_duration
        from apishield.state.usage import (
            MAX_SINCE,
            PERIODS,
            UsageStoreError,
            first_day,
            report,
            since_days,
        )

        by = query.get("by", "day")
        if by not in PERIODS:
            return _problem(400, "bad-parameter", "Bad Request", "by must be day or month.")
        try:
            seconds = float(parse_duration(query.get("since", "30d")))
        except (ValueError, TypeError):
            seconds = 0.0
        if not 0 < seconds <= MAX_SINCE:
            return _problem(400, "bad-parameter", "Bad Request",
                            "since must be a duration from 1s to 3660d, e.g. 7d or 12h.")
        pipeline = self._pipeline() if self._pipeline is not None else None
        since_day = first_day(time.time(), since_days(seconds))
        try:
            rows = (None if pipeline is None else await pipeline.usage_rows(
                since_day, query.get("identity"), query.get("operation")))
        except (UsageStoreError, ConfigError) as exc:
            logger.warning("admin /usage: the usage store failed: %s", exc)
            return _problem(503, "usage-store-unavailable", "Service Unavailable",
                            "The usage store could not be read; see the gateway's log.")
        if rows is None:
            return _problem(501, "usage-unavailable", "Not Implemented",
                            "Usage is not persisted here (usage.enabled is false, or the "
                            "front end is not running).")
        return AdminResponse(200, orjson.dumps(report(rows, by, since_day)))

    async def _policy(self, call: Call) -> AdminResponse:
        if self._pipeline is None:
            return _problem(501, "policy-unavailable", "Not Implemented",
                            "This front end does not expose its policy.")
        from apishield.admin.policy import effective_policy

        wanted = None
        for name, value in parse_qsl(call.query):
            if name == "operation":
                wanted = value
        policy = effective_policy(self._pipeline(), wanted)
        if wanted is not None and not policy["operations"]:
            return _problem(404, "no-such-operation", "Not Found",
                            "No operation with this operationId (or METHOD /path) in the "
                            "contract.")
        return AdminResponse(200, orjson.dumps(policy))


    async def _dashboard_asset(self, call: Call) -> AdminResponse:
        _, content_type = ASSETS[call.path]
        return AdminResponse(200, asset(call.path), content_type, list(PAGE_HEADERS))

    async def _dashboard_data(self, call: Call) -> AdminResponse:
        pipeline = self._pipeline() if self._pipeline is not None else None
        figures = await self.figures()
        self.history.metrics = figures.metrics  # the same object when this process's own
        return AdminResponse(200, orjson.dumps(snapshot(pipeline, self.history, view=figures)),
                             JSON, list(PAGE_HEADERS))


def read_token(config: Config) -> bytes | None:
    """The admin bearer token from `admin.token_env` / `admin.token_file` (None when
    neither is set); a missing variable or unreadable or empty file is a ConfigError."""
    admin = config.admin
    if admin is None or not admin.protected:
        return None
    if admin.token_env is not None:
        value = os.environ.get(admin.token_env, "")
        where = f"admin.token_env: environment variable {admin.token_env}"
    else:
        assert admin.token_file is not None
        path = config.resolve(admin.token_file)
        where = f"admin.token_file: {path}"
        try:
            value = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"{where} cannot be read ({exc.strerror})"]) from None
    token = value.strip()
    if not token:
        raise ConfigError([f"{where} is empty or unset: put the admin bearer token there"])
    if len(token) < 16:
        raise ConfigError([f"{where} holds a token of {len(token)} characters: use at least "
                           "16 random ones (e.g. `python -c 'import secrets; "
                           "print(secrets.token_urlsafe(32))'`)"])
    return token.encode()
