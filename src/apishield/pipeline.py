"""The pipeline both front ends run: compiled once from config + contract.

Order is fixed and documented (no priority numbers; ARCHITECTURE.md):

    head phase (request line + headers, before any body is read; synchronous):
        client_ip -> ip_filter -> cors -> route -> operation_ip -> limits ->
        pre_auth_limit -> authenticate -> authorize -> rate_limit -> concurrency ->
        validate_parameters
    body phase (the whole body is in; synchronous):
        validate_body -> authorize
    request phase (only when a step suspended for I/O: its rerun, then the rest)
    forward (the front end's job: upstream pool or the wrapped ASGI app)
    response phase (on the response head, before any body byte is sent):
        cors -> rate_limit_headers -> security_headers

Why the pipeline does not call `forward` itself: the two front ends stream bodies in very
different ways (raw transports vs ASGI messages), and the response steps need only the
head. So the pipeline exposes its phases and each front end drives them around its own
forwarding; a test asserts the order. A step that must see a whole body declares it
(`needs_body`), and the front ends buffer only then.

Steps are synchronous: per request they do lookups and run precompiled checks. A step that
needs I/O first (authentication on a JWKS cache miss or an introspection call) raises
`Suspend`; `_run` keeps its place on the exchange, the front end takes its async path and
calls `on_request`, which awaits the I/O and resumes there (the body phase, deferred, runs
after). Nothing on the fast path pays for the possibility.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Protocol, TypeVar

from apishield import problems
from apishield.abuse.gate import BanGate
from apishield.auth.delegate import upstream_refused
from apishield.auth.service import PUBLIC, AuthService
from apishield.config import Config, ConfigError
from apishield.contract.loader import Contract
from apishield.contract.router import Router
from apishield.contract.schema import SchemaError, schema_depth_guard
from apishield.exchange import Exchange, Headers, Suspend
from apishield.observe import events, redact
from apishield.observe.accesslog import FLUSH_EVERY, AccessLog
from apishield.observe.alerts import AlertEngine
from apishield.observe.logjson import fields
from apishield.observe.metrics import METRICS, UNMATCHED
from apishield.observe.redact import MAX_LOGGED, SCANNED
from apishield.observe.refusers import REFUSERS
from apishield.observe.usage import DAILY, USAGE
from apishield.observe.usage_flush import UsageFlusher
from apishield.problems import Problem, ProblemRenderer
from apishield.state.counters import Counters
from apishield.state.open import open_counters, open_usage_store
from apishield.state.usage import UsageRow
from apishield.steps import (
    authenticate,
    authorize,
    client_ip,
    concurrency,
    cors,
    ip_filter,
    limits,
    rate_limit,
    response_filter,
    response_owner,
    route,
    security_headers,
    validate,
)

logger = logging.getLogger("apishield")

REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


class Step(Protocol):
    @property
    def name(self) -> str: ...


class HeadStep(Step, Protocol):
    def on_head(self, exchange: Exchange) -> None: ...


class BodyStep(Step, Protocol):
    def on_body(self, exchange: Exchange) -> None: ...


class ResponseStep(Step, Protocol):
    def on_response(self, exchange: Exchange, status: int, headers: Headers) -> Headers: ...


_Step = TypeVar("_Step", bound=Step)
# (name, step or None): one phase of the pipeline, in order
Phase = list[tuple[str, _Step | None]]


def _enabled(plan: Phase[_Step]) -> list[_Step]:
    """The steps of `plan` that are on; each must carry the name the plan gives it."""
    steps = [step for _, step in plan if step is not None]
    for name, step in plan:
        if step is not None and step.name != name:
            raise AssertionError(f"step {step.name!r} is planned as {name!r}")
    return steps


class Pipeline:
    def __init__(self, config: Config, contract: Contract, *, tls: bool = False,
                 previous: Pipeline | None = None) -> None:
        """`previous`: the running pipeline this one replaces (a live reload); its stateful
        parts whose config is unchanged are carried over (`kept`, see `carried_over`)."""
        self.config = config
        self.contract = contract
        # what this pipeline took over from `previous`, and what it gave to a successor
        self.kept = carried_over(previous, config, contract)
        self._given: frozenset[str] = frozenset()
        self.in_flight = 0  # requests the gateway runs on this pipeline (drained at reload)
        self.router = Router(contract.operations, contract.base_path)
        try:
            with schema_depth_guard():  # a long `$ref` chain: a located error
                parameters, body = validate.build(contract, config.validation)
                self.response_filter = response_filter.ResponseFilter(contract,
                                                                      config.responses)
                self.response_owner = response_owner.ResponseOwnership(contract)
        except SchemaError as exc:
            raise ConfigError([f"{contract.source.name}: {exc}"]) from None
        self.cors = cors.build(config.cors, self.router)
        kept = self.kept
        self.auth: AuthService = AuthService(config, contract, previous=previous.auth
                                if previous is not None and "auth" in kept else None)
        self.authorize = authorize.AuthorizeStep(config, contract)
        limiting = config.rate_limiting
        self.counters: Counters = (previous.counters if previous is not None and "counters" in kept
                         else open_counters(config))
        self.bans: BanGate = (previous.bans if previous is not None and "bans" in kept
                     else BanGate(config))
        pre_auth = rate_limit.RateLimitStep("pre_auth_limit", limiting, contract,
                                            self.counters, pre_auth=True)
        post_auth = rate_limit.RateLimitStep("rate_limit", limiting, contract, self.counters,
                                             pre_auth=False, bans=self.bans)
        operation_ip = ip_filter.OperationIpStep(contract)
        self.concurrency: concurrency.ConcurrencyStep | None = (
            previous.concurrency if previous is not None and "concurrency" in kept
            else concurrency.build(limiting.concurrency))
        # The order of the steps is written here only: each phase is a list of
        # (name, step or None when off); `order` and the docs test derive from it.
        head: Phase[HeadStep] = [
            ("client_ip", client_ip.build(config.trusted_proxies)),
            ("ip_filter", ip_filter.IpFilterStep(limiting.ip, self.bans)),
            ("cors", self.cors),
            ("route", route.RouteStep(self.router)),
            ("operation_ip", operation_ip if operation_ip.lists else None),
            ("limits", limits.LimitsStep(config.limits, contract.operations)),
            ("pre_auth_limit", pre_auth if not pre_auth.empty else None),
            ("authenticate", authenticate.AuthenticateStep(self.auth)),
            ("authorize", self.authorize if self.authorize.rules else None),
            ("rate_limit", post_auth),  # always: it also checks subject bans
            ("concurrency", self.concurrency),
            ("validate_parameters", parameters),
        ]
        body_plan: Phase[BodyStep] = [
            ("validate_body", body),
            ("authorize", self.authorize if self.authorize.body_rules else None),
        ]
        response: Phase[ResponseStep] = [
            ("cors", self.cors),
            ("rate_limit_headers",
             rate_limit.HeadersStep({**pre_auth.policies, **post_auth.policies})
             if limiting.headers and not (pre_auth.empty and post_auth.empty) else None),
            ("security_headers", security_headers.SecurityHeadersStep(config.headers, tls=tls)),
        ]
        self.order = tuple(tuple(name for name, _ in phase) for phase in (head, body_plan,
                                                                           response))
        self.head_steps = _enabled(head)
        self._head_calls: list[Callable[[Exchange], None]] = [s.on_head for s in self.head_steps]
        self.body_steps = _enabled(body_plan)
        self._body_calls: list[Callable[[Exchange], None]] = [s.on_body for s in self.body_steps]
        self._body_step = body
        self.response_steps = _enabled(response)
        self._response_calls = [s.on_response for s in self.response_steps]
        # `response_head`: the steps before the security headers, which always run last
        last = self.response_steps[-1]
        assert isinstance(last, security_headers.SecurityHeadersStep)
        self._security_headers = last
        self._response_lead = self._response_calls[:-1]
        self.access_log: AccessLog | None = (
            previous.access_log if previous is not None and "access_log" in kept
            else AccessLog(config.access_log.path) if config.access_log.enabled else None)
        self.metrics = METRICS if config.metrics.enabled else None
        self.usage = config.usage if config.usage.enabled else None  # persisted counts (F4)
        self.usage_flusher: UsageFlusher | None = None  # started by start()
        # alert rules (F3): None when none is configured, so `record` pays one test
        self.alerts: AlertEngine | None = (
            previous.alerts if previous is not None and "alerts" in kept
            else AlertEngine(config.alerts, config.source_dir, METRICS)
            if config.alerts.rules else None)
        redact.protect(config.redact.fields)  # compiled once, here (F6)
        self.mask_errors = config.responses.mask_errors
        self._render_problem = ProblemRenderer(config.responses.problem_docs).render
        self.max_filter_bytes = config.responses.max_filter_bytes
        self.global_log_only = config.mode == "log-only"
        self._tasks: list[asyncio.Task[None]] = []

    def plain_http_headers(self) -> Callable[[Exchange, int, Headers], Headers]:
        """What adds the security headers to the plain-HTTP listener's answers: the
        gateway's, minus HSTS whatever `headers.hsts` says (`always` is for TLS terminated
        in front; RFC 6797 7.2 forbids HSTS over plain HTTP)."""
        step = security_headers.SecurityHeadersStep(
            self.config.headers.model_copy(update={"hsts": "off"}), tls=False)
        return step.on_response

    def step_names(self) -> list[str]:
        return [s.name for s in (*self.head_steps, *self.body_steps, *self.response_steps)]

    def needs_body(self, exchange: Exchange) -> bool:
        """Whether a step must see this request's whole body (then it is not streamed)."""
        return self._body_step.needs_body(exchange) or self.authorize.needs_body(exchange)

    def log_only(self, exchange: Exchange) -> bool:
        """Shadow mode for this request: contract refusals are logged, not enforced."""
        operation = exchange.operation
        if operation is not None and operation.policy.mode is not None:
            return operation.policy.mode == "log-only"
        return self.global_log_only

    def _shadow(self, exchange: Exchange, problem: Problem) -> bool:
        """In log-only mode, note a contract refusal and let the request go on."""
        if not (problem.contract_rule and self.log_only(exchange)):
            return False
        exchange.shadowed = True
        exchange.reason = (exchange.reason + "," if exchange.reason else "") + problem.reason
        return True

    def on_head(self, exchange: Exchange) -> None:
        """Run the head steps; a refusal is stored on the exchange, not raised."""
        self._run(self._head_calls, exchange)

    def on_body(self, exchange: Exchange) -> None:
        """Run the body steps on a complete body; a refusal is stored, not raised.
        Deferred to `on_request` while a head step is suspended (the order holds)."""
        if exchange.suspended is None:
            self._run(self._body_calls, exchange)

    def _run(self, calls: list[Callable[[Exchange], None]], exchange: Exchange,
             start: int = 0) -> None:
        for call in calls if start == 0 else calls[start:]:
            try:
                call(exchange)
            except Suspend as suspend:
                exchange.suspended = (suspend.wait, calls, calls.index(call))
                exchange.waited_for = suspend.owner
                return
            except Problem as problem:
                if not self._shadow(exchange, problem):
                    # no traceback kept: its frames point back at the exchange, a cycle
                    # per refusal for the cyclic GC (14 ms pauses under a flood of 429s)
                    exchange.problem = problem.with_traceback(None)
                    return
                if exchange.operation is None:
                    # shadowed, but no operation matched: what follows is per operation;
                    # the global body limit still holds
                    exchange.body_limit = self.config.limits.max_body_bytes
                    return

    async def on_request(self, exchange: Exchange) -> None:
        """Finish a request whose steps suspended for I/O: await it, rerun the step, run
        what follows it, then the deferred body phase. A no-op for everything else."""
        while exchange.suspended is not None:
            wait, calls, index = exchange.suspended
            exchange.suspended = None
            exchange.resumes += 1
            await wait()
            self._run(calls, exchange, index)
            if (exchange.problem is None and exchange.suspended is None
                    and calls is self._head_calls):
                self._run(self._body_calls, exchange)

    async def start(self) -> None:
        """Background work that needs the event loop (JWKS fetch and refresh, key-store
        revocation poll); called once the loop runs."""
        await self.auth.start()  # a carried-over service is started already: a no-op
        if "bans" not in self.kept:
            await self.bans.start()
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        if self.usage is not None:
            config = self.config
            self.usage_flusher = UsageFlusher(lambda: open_usage_store(config), self.usage)
            self.usage_flusher.start()
        if self.alerts is not None:
            await self.alerts.start()  # carried over: already started, a no-op

    async def _housekeeping(self) -> None:
        """Once a second: bans added elsewhere (CLI, other gateways); every 30 s: forget
        counters and ban windows that no longer matter (bounded memory)."""
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            tick += 1
            try:
                self.bans.refresh()
                if tick % 30 == 0:
                    now = time.time()
                    self.counters.sweep(now)
                    self.bans.sweep(now)
            except Exception:
                logger.exception("state housekeeping failed")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.usage_flusher is not None:  # the last counts go to the store
            await self.usage_flusher.stop()
            self.usage_flusher = None
        given = self._given  # what a successor runs on now is closed by that successor
        if "auth" not in given:
            await self.auth.close()
        if "bans" not in given:
            await self.bans.close()
        if "counters" not in given:
            await self.counters.close()
        if self.alerts is not None and "alerts" not in given:
            await self.alerts.stop()  # queued alerts flushed (briefly), workers cancelled

    def hand_over(self, successor: Pipeline) -> None:
        """`successor` replaced this pipeline: what it carried over is its own now, so
        `stop()` and `close()` leave it open."""
        self._given = self._given | successor.kept
        if self.alerts is not None and "alerts" not in successor.kept:
            self.alerts.unsubscribe()  # the successor's engine counts events from now on

    def abandon(self) -> None:
        """This pipeline never ran (its reload failed): `stop()` and `close()` must close
        only what it opened, not what it borrowed from the running one."""
        self._given = self._given | self.kept

    def on_response(self, exchange: Exchange, status: int, headers: Headers) -> Headers:
        if status == 401 or status == 403:  # the upstream's (or a refusal: ignored there)
            operation = exchange.operation
            events.login_refusal(exchange, status, operation is not None
                                 and self.auth.plans.get(operation.pointer) is PUBLIC)
        for call in self._response_calls:
            headers = call(exchange, status, headers)
        return headers

    def response_head(self, exchange: Exchange, status: int, headers: Headers) -> bytes:
        """`on_response` serialized as head lines (`name: value\\r\\n` each): the same
        fields in the same order, for a front end that writes bytes (the gateway)."""
        if status == 401 or status == 403:
            operation = exchange.operation
            events.login_refusal(exchange, status, operation is not None
                                 and self.auth.plans.get(operation.pointer) is PUBLIC)
        for call in self._response_lead:
            headers = call(exchange, status, headers)
        return self._security_headers.serialize(exchange, status, headers)

    def problem_response(self, exchange: Exchange, problem: Problem) -> tuple[int, Headers, bytes]:
        """The only way a refusal becomes a response (masked, with the request id)."""
        exchange.problem = problem.with_traceback(None)  # see _run: no frame cycles
        exchange.reason = problem.reason
        if isinstance(problem, problems.PreflightAccepted):
            return problem.status, self.on_response(exchange, problem.status,
                                                    list(problem.headers)), b""
        body = self._render_problem(problem, exchange.id)
        headers: Headers = [
            (b"content-type", problems.PROBLEM_CONTENT_TYPE),
            (b"content-length", str(len(body)).encode()),
            *problem.headers,
        ]
        if exchange.method == "HEAD":
            body = b""
        return problem.status, self.on_response(exchange, problem.status, headers), body

    def filter_shape(
        self, exchange: Exchange, status: int, headers: Headers
    ) -> response_filter.Plan | None:
        """What must happen to this response's body before it is sent (cut to its shape,
        checked against its schema, or refused), or None: pass it as it is. The front
        ends hold the body whole only for a plan. An undeclared status is logged here."""
        plan = self.response_filter.plan_for(exchange, status, headers)
        if self.response_owner.rules and self.response_owner.applies(exchange, status,
                                                                     headers):
            if plan is None:
                plan = response_filter.Plan(status)
            plan.owner = True
            plan.headers = headers
        return plan

    def filter_body(self, exchange: Exchange, plan: response_filter.Plan, body: bytes,
                    precut: tuple[bytes | None] | None = None) -> bytes:
        """The body as `plan` says; one that must not be sent (cannot be checked, breaks
        its schema, undeclared status in validate mode) is a 502. In log-only mode the
        body always passes untouched and the access log says what would have happened.
        `precut`: the cut already computed elsewhere (`response_filter.cut_json`)."""
        if plan.owner and plan.refuse is None:
            try:
                body = self.response_owner.apply(exchange, plan.status, body,
                                                 plan.headers or [])
            except Problem as problem:
                if not self._shadow(exchange, problem):
                    raise
        try:
            result = self.response_filter.apply(exchange, plan, body, precut)
        except problems.BadGateway as problem:
            if not self.log_only(exchange):
                raise
            exchange.shadowed = True
            exchange.reason = exchange.reason or problem.reason
            return body
        if result is not body and self.log_only(exchange):  # it would have been cut
            exchange.shadowed = True
            exchange.reason = exchange.reason or "response-filtered"
            return body
        return result

    def filters_operation(self, exchange: Exchange) -> bool:
        """Whether this operation's JSON responses are read (filtered or validated): the
        gateway then asks the upstream for them unencoded."""
        operation = exchange.operation
        return operation is not None and (operation.pointer in self.response_filter.reads_bodies
                                          or operation.pointer in self.response_owner.rules)

    def mask_upstream_error(
        self, exchange: Exchange, status: int, sample: bytes
    ) -> tuple[int, Headers, bytes]:
        """An upstream 5xx: keep the status, log the body redacted, send a problem (E3)."""
        logger.warning(
            "upstream answered %d to request %s; body masked: %s", status, exchange.id,
            # all redact() scans: a secret cut short at a shorter sample's end could be too
            # short for its pattern and then be logged once masking shortened the text
            redact.redact(sample[:MAX_LOGGED * SCANNED].decode("utf-8", "replace")),
            extra=fields("error", exchange.id, status=status),
        )
        problem = problems.UpstreamFailure("upstream-5xx-masked")
        problem.status = status
        return self.problem_response(exchange, problem)

    def internal_error(self, exchange: Exchange, exc: BaseException) -> tuple[int, Headers, bytes]:
        """A bug or an unexpected failure: traceback to the log with the id, generic 500 out."""
        logger.error("internal error in request %s", exchange.id, exc_info=exc,
                     extra=fields("error", exchange.id))
        problem = problems.InternalError(f"exception:{type(exc).__name__}")
        return self.problem_response(exchange, problem)

    def record(self, exchange: Exchange, status: int) -> None:
        """The end of every request, refused, failed or complete (each front end calls it
        once): give back concurrency slots, feed the ban rules, count metrics and usage,
        write the access log.

        Run once per request, so kept flat (issue 18): the outcome is worked out inline,
        and the access-log entry goes straight onto the log's pending list (the log is
        woken only when that list starts a batch or fills one)."""
        if exchange.held and self.concurrency is not None:
            self.concurrency.release(exchange)
        if exchange.delegated is not None:  # the upstream verified the credential
            upstream_refused(exchange, status)
        if self.bans.watching:
            self.bans.observe(exchange, status)
        alerts = self.alerts
        access_log = self.access_log
        metrics = self.metrics
        usage = self.usage
        if access_log is None and metrics is None and usage is None and alerts is None:
            return
        operation = exchange.operation
        problem = exchange.problem
        if problem is not None and problem.status >= 300:  # the outcome, for every reader
            outcome = "error" if problem.status >= 500 else "refused"
        elif exchange.shadowed:
            outcome = "shadowed"
        else:
            outcome = "allowed"
        reason = exchange.reason or None
        principal = exchange.principal
        if alerts is not None:
            identity = None if principal is None else principal.key_id or principal.subject
            alerts.request(status, outcome, reason, exchange.client_ip, identity,
                           None if operation is None else operation.operation_id)
            if access_log is None and metrics is None and usage is None:
                return
        seconds = time.perf_counter() - exchange.started
        now = time.time()  # one clock read for the usage count and the access log
        if metrics is not None or usage is not None:
            identity = None if principal is None else principal.key_id or principal.subject
            label = UNMATCHED if operation is None else operation.label
            refused = outcome == "refused"
            if metrics is not None:
                metrics.request(label, exchange.method, status, outcome, seconds, reason)
                USAGE.count(identity, label, refused, now)
                if refused:  # the dashboard's top refused clients (refusals only)
                    REFUSERS.count(exchange.client_ip, reason, now)
            if usage is not None:
                DAILY.count(identity, label, refused, exchange.bytes_in or len(exchange.body),
                            exchange.bytes_out, now)
        if access_log is None:
            return
        entry = exchange.entry
        pending = access_log.pending
        pending.append((
            exchange.id,
            exchange.method,
            None if entry is None else entry.template,
            None if operation is None else operation.operation_id,
            status,
            seconds * 1000,
            exchange.client_ip,
            outcome,
            reason,
            now,
            principal,
        ))
        if len(pending) == 1 or len(pending) >= FLUSH_EVERY:
            access_log.wake()

    async def usage_rows(self, since_day: str, identity: str | None = None,
                         operation: str | None = None) -> list[UsageRow] | None:
        """The persisted usage counts (`GET /usage?since=...`), read in a worker thread;
        None when usage is off or this pipeline is not running."""
        flusher = self.usage_flusher
        if flusher is None:
            return None

        def read() -> list[UsageRow]:
            return flusher.store().query(since_day, identity, operation)

        return await asyncio.to_thread(read)

    def state_problems(self) -> list[str]:
        """The shared state store, when it is down (`GET /readyz`). Only Redis-backed
        counters keep an outage (memory and SQLite cannot be unreachable)."""
        outage = getattr(self.counters, "outage", None)
        if outage is not None and outage.ongoing:
            return [f"state: {outage.where} is unavailable ({outage.reason})"]
        return []

    def close(self) -> None:
        events.flush()  # the successes counted since the last summary line
        if self.access_log is not None and "access_log" not in self._given:
            self.access_log.close()
        if self.alerts is not None and "alerts" not in self._given:
            self.alerts.close()



# What `carried_over` may keep, in the order the reload log line lists them.
CARRIED_PARTS = ("counters", "bans", "auth", "concurrency", "access_log", "alerts")


def carried_over(previous: Pipeline | None, config: Config, contract: Contract) -> frozenset[str]:
    """The stateful parts of `previous` a pipeline for `config` and `contract` takes over
    as they are, because what they were built from did not change:
    - `counters` (rate-limit budgets): the same store (`state`, `lease_fraction`). Kept
      even when limits change: a budget is keyed by the limit's name and a GCRA state is
      valid under any rate, so a reload never hands every client a fresh budget;
    - `bans`: the same store and `rate_limiting.bans` rules (offense windows kept);
    - `auth`: the same `auth` section, state, mTLS setting and contract security schemes
      (JWKS key sets and their refresh, token caches, the API-key store; the per-operation
      plans are always compiled again from the new contract);
    - `concurrency`: the same limits (slots held by requests still running are counted);
    - `access_log`: the same settings (one file handle, lines in order);
    - `alerts`: the same `alerts` section (windows, baselines, cooldowns and queued
      deliveries go on; a changed section starts every rule afresh: a rule's state is
      only meaningful under the rule it was counted for)."""
    if previous is None:
        return frozenset()
    old = previous.config
    limiting, old_limiting = config.rate_limiting, old.rate_limiting
    same_state = (old.state == config.state and old.state_password == config.state_password
                  and old.source_dir == config.source_dir)
    kept = {
        "counters": same_state and old_limiting.lease_fraction == limiting.lease_fraction,
        "bans": same_state and old_limiting.bans == limiting.bans,
        "auth": previous.auth.serves(config, contract),
        "concurrency": old_limiting.concurrency == limiting.concurrency,
        "access_log": old.access_log == config.access_log,
        "alerts": old.alerts == config.alerts and old.source_dir == config.source_dir,
    }
    return frozenset(name for name in CARRIED_PARTS if kept[name])
