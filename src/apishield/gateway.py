"""The standalone gateway: listener + pipeline + upstream pool, and its lifecycle.

Forwarding rules (RFC 9110 7.6, RFC 9112):
- hop-by-hop headers (`Connection` and the fields it names, `Keep-Alive`, `TE`, `Trailer`,
  `Transfer-Encoding`, `Upgrade`, `Proxy-*`) are removed in both directions;
- `X-Forwarded-For/Proto/Host` are set from what the gateway saw; client-sent copies,
  `Forwarded` and `X-Real-Ip` are dropped unless the peer is a trusted proxy;
- the client's `X-Request-Id` is replaced by the gateway's, and headers in the identity
  namespace (`X-Apishield-*`) are always stripped: only the gateway may assert identity
  (with mutual TLS, `X-Apishield-Client-Subject/-San` from the verified certificate);
- the request body was read whole under its limit, so it is sent with a Content-Length.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import signal
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from apishield.admin.app import AdminApp, Figures, ReloadReport, read_token
from apishield.admin.listener import AdminListener
from apishield.auth.identity import identity_headers
from apishield.config import Config, ConfigError
from apishield.contract.loader import Contract, load_contract
from apishield.exchange import Headers
from apishield.http.deadlines import Sweeper
from apishield.http.plain_http import PlainHttpResponder
from apishield.http.server import HttpConnection, Message
from apishield.http.tls import ServerTls, server_tls, upstream_context
from apishield.http.upstream import (
    REQUEST_OWNED,
    RESPONSE_DROPPED,
    Ready,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    problem_for,
)
from apishield.observe.alert_feed import FiredAlert
from apishield.observe.audit_trail import AuditTrail, BackgroundAuditTrail
from apishield.observe.logjson import fields
from apishield.observe.metrics import METRICS
from apishield.pipeline import CARRIED_PARTS, Pipeline
from apishield.state.open import open_audit_trail
from apishield.steps.response_cutter import Cutter

logger = logging.getLogger("apishield")

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
ACCEPT_ENCODING = frozenset({b"accept-encoding"})


@lru_cache(maxsize=256)
def _named_late(tokens: frozenset[bytes]) -> frozenset[bytes]:
    """The request fields a `Connection` header names beyond those never forwarded anyway
    (usually none: `keep-alive` or `close`); memoized like `connection_tokens`."""
    return tokens - REQUEST_OWNED


@lru_cache(maxsize=256)
def _named_hop_by_hop(tokens: frozenset[bytes]) -> frozenset[bytes]:
    """The fields a response's `Connection` names beyond those the upstream connection
    already dropped while parsing (usually none: `keep-alive` or `close`)."""
    return tokens - RESPONSE_DROPPED


class Reply:
    """What the front end writes: a head, the body so far, and maybe a stream of the rest."""

    __slots__ = ("body", "content_length", "headers", "status", "stream")

    def __init__(
        self,
        status: int,
        headers: Headers,
        body: bytes,
        stream: UpstreamResponse | None = None,
        content_length: int | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.stream = stream
        self.content_length = content_length


class Gateway:
    def __init__(
        self,
        config: Config,
        contract: Contract,
        *,
        tls: ServerTls | None = None,
        upstream_tls: ssl.SSLContext | None = None,
        admin_token: bytes | None = None,
        audit: AuditTrail | None = None,
    ) -> None:
        """`tls`: the listener terminates TLS (and the pipeline sends HSTS); `upstream_tls`:
        the client context for an https upstream (default: the system's, verified);
        `admin_token`: the admin API's bearer token (`read_token`); `audit`: the audit
        trail (`open_audit_trail`), written from a thread of its own."""
        assert config.upstream is not None
        self.config = config
        self.contract = contract
        self.tls = tls
        self.pipeline = Pipeline(config, contract, tls=tls is not None)
        self.connections: set[HttpConnection] = set()
        self._set_upstream(config, upstream_tls)
        self.pool: UpstreamPool | None = None
        # responses held whole to be filtered, all connections (HttpConnection._reserve_buffer)
        self.buffered_bytes = 0
        self.max_buffered_bytes = config.responses.max_buffered_bytes
        self.cutter = Cutter()
        self.admin_token = admin_token
        self.audit = BackgroundAuditTrail(audit) if audit is not None else None
        self._trail_alerts(self.pipeline)
        # set by start_pool(), which serve() calls before any connection is accepted
        self.loop: asyncio.AbstractEventLoop
        # live reload (`reload`): where the config comes from, set by `reload_from`
        self.source: Path | None = None
        self._load: Callable[[], Config] | None = None
        self._fingerprint = ""  # of the config file and the contract's files, as running
        self._contract_hash = ""
        self.reload_counts: Counter[str] = Counter()  # by outcome, for the metrics
        self._reload_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()  # replaced pipelines draining
        self._draining_pools: set[UpstreamPool] = set()
        # told of each reload through the admin API (worker 0 of `serve --workers N`
        # then has the supervisor reload every worker: supervisor.serve_worker)
        self.after_admin_reload: Callable[[ReloadResult], None] | None = None
        # what the admin API shows, when not this process's own figures (worker 0 of
        # `serve --workers N`: every worker's added up, supervisor.serve_worker)
        self.figures: Figures | None = None

    def _set_upstream(self, config: Config, upstream_tls: ssl.SSLContext | None) -> None:
        """Where requests go (at start, and at a reload that changed `upstream`)."""
        assert config.upstream is not None
        upstream = urlsplit(config.upstream.url)
        self.upstream_host = upstream.hostname or ""
        self.upstream_tls = upstream.scheme == "https"
        self.upstream_context = upstream_tls
        if self.upstream_tls and upstream_tls is None:
            self.upstream_context = ssl.create_default_context()
        self.upstream_port = upstream.port or (443 if self.upstream_tls else 80)
        self.upstream_prefix = upstream.path.rstrip("/").encode()
        default_port = 443 if self.upstream_tls else 80
        host = upstream.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        self.upstream_host_header = (
            host if self.upstream_port == default_port else f"{host}:{self.upstream_port}"
        ).encode()
        self.preserve_host = config.upstream.host_header == "client"

    def start_pool(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.pool = self._new_pool()

    def _new_pool(self) -> UpstreamPool:
        upstream = self.config.upstream
        assert upstream is not None
        return UpstreamPool(
            self.upstream_host,
            self.upstream_port,
            tls=self.upstream_context if self.upstream_tls else None,
            connect_timeout=upstream.connect_timeout,
            read_timeout=upstream.read_timeout,
            max_connections=upstream.max_connections,
            max_per_client=upstream.client_share,
        )

    def serialize_request(
        self, exchange: Message, framing: tuple[bytes, bytes] | None = None,
        pipeline: Pipeline | None = None,
    ) -> bytes:
        """The request for the upstream. With `framing` (a streamed body), only the head,
        carrying that framing header; else head and the whole body. `pipeline`: the one
        the request runs on (after a reload, maybe not the gateway's current one).

        The client's header lines to pass on were picked and formatted as the parser read
        them (`Message.forward`); only those dropped late are taken out here."""
        target = self.upstream_prefix + exchange.raw_path
        if exchange.query:
            target += b"?" + exchange.query
        forward = exchange.forward
        tokens = exchange.connection_tokens
        late = _named_late(tokens) if tokens else tokens
        if (pipeline or self.pipeline).filters_operation(exchange):
            # its JSON responses are filtered: ask for them unencoded (identity)
            late = late | ACCEPT_ENCODING
        if late and forward:
            forward = [line for line in forward if line[:line.index(b":")] not in late]
        forwarded_proto = exchange.scheme.encode()
        forwarded_host = b""
        if exchange.trusted_peer:
            if exchange.forwarded_proto is not None:
                forwarded_proto = exchange.forwarded_proto
            forwarded_host = exchange.forwarded_host
        client_host = exchange.client_host
        host = self.upstream_host_header
        if self.preserve_host and client_host:
            host = client_host
        # the head as lines, each `name: value` formatted once (no tuple list re-joined)
        lines = [b"%b %b HTTP/1.1" % (exchange.method.encode(), target), *forward,
                 b"host: %b\r\nx-forwarded-for: %b\r\nx-forwarded-proto: %b" % (
                     host, exchange.forwarded_for.encode(), forwarded_proto)]
        if forwarded_host or client_host:
            lines.append(b"x-forwarded-host: %b" % (forwarded_host or client_host))
        lines.append(b"x-request-id: %b" % exchange.id.encode())
        if exchange.client_identity:  # the parser dropped any client-sent copy
            lines.extend([b": ".join(pair) for pair in exchange.client_identity])
        if exchange.principal is not None:
            lines.extend([b": ".join(pair) for pair in identity_headers(exchange.principal)])
        body = exchange.body
        if framing is not None:
            lines.append(b": ".join(framing))
        elif body or exchange.method in BODY_METHODS:
            lines.append(b"content-length: %d" % len(body))
        return b"%b\r\n\r\n%b" % (b"\r\n".join(lines), body)

    async def forward(self, exchange: Message, pipeline: Pipeline | None = None) -> Reply:
        assert self.pool is not None
        payload = self.serialize_request(exchange, None, pipeline)
        response = await self.pool.request(payload, exchange.method,
                                           exchange.client_ip)
        return self.reply_from(response)

    async def forward_streaming(
        self, exchange: Message, framing: tuple[bytes, bytes],
        connected: Callable[[UpstreamConnection], None], pipeline: Pipeline | None = None,
    ) -> Reply:
        """Send the head now and let the front end write the body as it arrives
        (`connected` is called with the connection before the response is awaited).
        Not retried: the body cannot be replayed."""
        assert self.pool is not None
        conn = await self.pool.acquire(exchange.client_ip)
        head = self.serialize_request(exchange, framing, pipeline)
        try:
            conn.start(head, head_only=False)
            connected(conn)
            response = await conn.response()
        except UpstreamError as exc:
            conn._close()
            self.pool.forget(conn)
            raise problem_for(exc) from None
        return self.reply_from(response)

    def forward_nowait(self, exchange: Message, on_ready: Ready,
                       pipeline: Pipeline | None = None) -> bool:
        """Send on a pooled connection in callback mode; False if none is idle."""
        assert self.pool is not None
        conn = self.pool.take_idle(exchange.client_ip)
        if conn is None:
            return False
        conn.send_nowait(
            self.serialize_request(exchange, None, pipeline),
            head_only=exchange.method == "HEAD",
            on_ready=on_ready,
        )
        return True

    def reply_from(self, response: UpstreamResponse) -> Reply:
        """Drop the response headers its `Connection` names (the standard hop-by-hop ones
        never reached the list: `UpstreamConnection.on_header`); give the connection back
        if the body is in."""
        headers = response.headers
        if response.connection_tokens:
            named = _named_hop_by_hop(response.connection_tokens)
            if named:
                headers = [item for item in headers if item[0] not in named]
        if response.complete:
            response.release()
            return Reply(response.status, headers, response.body, None, response.content_length)
        return Reply(response.status, headers, response.body, response, response.content_length)

    def reply_complete(self, conn: UpstreamConnection) -> Reply:
        """`reply_from(UpstreamResponse(conn))` for a response received whole (the fast
        path): the same Reply without the intermediate object; the connection goes back."""
        headers = conn.headers
        if conn.connection_tokens:
            named = _named_hop_by_hop(conn.connection_tokens)
            if named:
                headers = [item for item in headers if item[0] not in named]
        reply = Reply(conn.status, headers, b"".join(conn.chunks), None, conn.content_length)
        conn.finish()
        return reply

    def admin_app(self) -> AdminApp:
        """The admin API over this gateway (it reads the pipeline in force at each call)."""
        return AdminApp(config=lambda: self.config, readiness=self.readiness,
                        gauges=self.gauges, reload=self._admin_reload, token=self.admin_token,
                        pipeline=lambda: self.pipeline, audit=self.audit,
                        figures=self.figures)

    async def _admin_reload(self, trigger: str) -> ReloadReport:
        result = await self.reload(trigger)
        if self.after_admin_reload is not None:
            self.after_admin_reload(result)
        return ReloadReport(result.outcome, result.as_dict())

    async def readiness(self) -> list[str]:
        """What keeps the gateway from serving well (`GET /readyz`), each `part: why`."""
        failing: list[str] = []
        pool = self.pool
        if pool is None:
            failing.append("upstream: the gateway has not started")
        elif not pool.reached:
            why = await pool.probe()  # no request went through yet: try a connection
            if why is not None:
                failing.append(f"upstream: {pool.host}:{pool.port} was never reached ({why})")
        failing += self.pipeline.state_problems()
        return failing

    def gauges(self) -> dict[str, float]:
        """Values read when Prometheus scrapes."""
        return {"apishield_bans_active": float(self.pipeline.bans.active())}

    def upstream_busy(self) -> list[UpstreamConnection]:
        """Upstream connections in use, also those of pools a reload replaced (their
        deadlines still fire)."""
        busy = [*self.pool.busy] if self.pool is not None else []
        for pool in self._draining_pools:
            busy.extend(pool.busy)
        return busy

    async def close(self) -> None:
        for task in list(self._retiring):  # replaced pipelines: closed now, drained or not
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        self.cutter.close()
        if self.pool is not None:
            self.pool.close()
        await self.pipeline.stop()
        self.pipeline.close()
        if self.audit is not None:  # what is queued is written first (bounded wait)
            await asyncio.to_thread(self.audit.close)

    # -- live reload ------------------------------------------------------------------------

    def reload_from(self, path: str | Path, load: Callable[[], Config]) -> None:
        """Make `reload` possible: `path` is the config file, `load` reads it into the
        effective config (the CLI's `--host`/`--port` applied again each time)."""
        self.source = Path(path)
        self._load = load
        self._contract_hash = _fingerprint(b"", self.contract)[1]
        try:
            self._fingerprint = _fingerprint(self.source.read_bytes(), self.contract)[1]
        except OSError:
            self._fingerprint = ""

    async def reload(self, trigger: str) -> ReloadResult:
        """Read the config file and the contract again and swap the new pipeline in
        between requests (SIGHUP, the admin API's `POST /reload`, the file watch).

        Compiled in a worker thread, started on the loop, then swapped: a request keeps
        the pipeline it started on, and the replaced one is stopped once those are done.
        Parts whose config did not change are carried over (`Pipeline.kept`, the upstream
        pool, the response cutter). A broken file keeps everything as it runs. Reloads run
        one at a time: a second caller waits, then reads the files again itself (usually
        `unchanged`). Never raises: a bug is a `failed` outcome, never a stopped gateway."""
        async with self._reload_lock:
            started = time.perf_counter()
            try:
                result = await self._reload(trigger)
            except Exception as exc:
                logger.exception("reload (%s) failed: internal error", trigger)
                result = ReloadResult(trigger, "failed", "",
                                      problems=(f"internal error: {type(exc).__name__}",))
            result.duration = time.perf_counter() - started
            self.reload_counts[result.outcome] += 1
            METRICS.config_reload(result.outcome)
            _log_reload(result)
            self._record_reload(result)
            return result

    def _record_reload(self, result: ReloadResult) -> None:
        """A reload that changed something (or tried to) goes into the audit trail with
        the hashes of what it loaded; `unchanged` is not an operation."""
        if self.audit is None or result.outcome == "unchanged":
            return
        action = "config-reloaded" if result.outcome == "succeeded" else "config-reload-failed"
        details: dict[str, object] = {"trigger": result.trigger,
                                      "config_sha256": result.config_hash}
        if result.outcome == "succeeded":
            details["contract_sha256"] = self._contract_hash
            details["changed"] = list(result.changed)
        else:
            details["problems"] = len(result.problems)
        self.audit.submit(action, "gateway", **details)

    def _trail_alerts(self, pipeline: Pipeline) -> None:
        """Every alert the pipeline's rules fire goes into the audit trail (F5), once: a
        carried-over alert engine keeps the listener it was given."""
        engine = pipeline.alerts
        if self.audit is not None and engine is not None and \
                self._alert_fired not in engine.listeners:
            engine.listeners.append(self._alert_fired)

    def _alert_fired(self, alert: FiredAlert) -> None:
        assert self.audit is not None
        self.audit.submit("alert-fired", "gateway", rule=alert.rule, kind=alert.kind,
                          subject=alert.key, severity=alert.severity, summary=alert.summary)

    def record_start(self, host: str, port: int) -> None:
        """`gateway-started` in the audit trail: which config and contract it serves."""
        if self.audit is None or self.source is None:
            return
        try:
            config_hash = _fingerprint(self.source.read_bytes(), self.contract)[0]
        except OSError:
            config_hash = ""
        self.audit.submit("gateway-started", "gateway", listen=f"{host}:{port}",
                          config_sha256=config_hash, contract_sha256=self._contract_hash)

    async def _reload(self, trigger: str) -> ReloadResult:
        if self.source is None or self._load is None:
            return ReloadResult(trigger, "failed", "", problems=(
                "reload: this gateway was not started from a config file",))
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(None, self._prepare, trigger)
        if isinstance(prepared, ReloadResult):
            return prepared
        new = prepared.pipeline
        failure: Exception | None = None
        try:
            await new.start()  # what needs the loop: JWKS fetch, key store, housekeeping
        except Exception as exc:
            failure = exc  # handled below, outside the handler (await outside the handler: mypyc)
        if failure is not None:
            new.abandon()
            await new.stop()
            new.close()
            problems = failure.problems if isinstance(failure, ConfigError) else [
                f"starting the new pipeline: {type(failure).__name__}: {failure}"]
            return ReloadResult(trigger, "failed", prepared.result.config_hash,
                                problems=tuple(problems))
        old, old_pool = self.pipeline, None
        # the swap: between two requests, as nothing else runs on the loop meanwhile
        self.pipeline = new
        self._trail_alerts(new)
        self.config = new.config
        self.contract = new.contract
        self.max_buffered_bytes = new.config.responses.max_buffered_bytes
        if prepared.upstream_changed:
            old_pool = self.pool
            self._set_upstream(new.config, prepared.upstream_context)
            self.pool = self._new_pool()
            if old_pool is not None:
                self._draining_pools.add(old_pool)
        old.hand_over(new)
        self._fingerprint, self._contract_hash = prepared.fingerprint, prepared.contract_hash
        task = loop.create_task(self._retire(old, old_pool), name="retire pipeline")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return prepared.result

    def _prepare(self, trigger: str) -> _Prepared | ReloadResult:
        """In a worker thread: read, validate and compile; never touches the running
        gateway except to read it."""
        assert self.source is not None and self._load is not None
        running = self.config
        try:
            data = self.source.read_bytes()
        except OSError as exc:
            return ReloadResult(trigger, "failed", "", problems=(
                f"{self.source}: cannot read: {exc.strerror or exc}",))
        config_hash, fingerprint = _fingerprint(data, self.contract)
        if fingerprint == self._fingerprint:  # (the running contract's files, read now)
            return ReloadResult(trigger, "unchanged", config_hash)
        problems: list[str] = []
        try:
            config = self._load()
        except ConfigError as exc:  # located in the file: `apishield.yaml: timeouts.header: ...`
            name = self.source.name
            return ReloadResult(trigger, "failed", config_hash, problems=tuple(
                problem if problem.startswith((name, str(self.source))) else f"{name}: {problem}"
                for problem in exc.problems))
        if config.upstream is None:
            problems.append("upstream: required key is missing (write e.g. upstream: "
                            "{url: http://127.0.0.1:9000})")
        contract = None
        try:
            contract = load_contract(config)
        except ConfigError as exc:
            problems += exc.problems
        client_tls = self.upstream_context if self.upstream_tls else None
        upstream_changed = config.upstream != running.upstream
        if upstream_changed and config.upstream is not None:
            try:
                client_tls = upstream_context(config)
            except ConfigError as exc:
                problems += exc.problems
        if problems or contract is None:
            return ReloadResult(trigger, "failed", config_hash, problems=tuple(problems))
        warnings = [f"{name}: changed in {self.source.name}, but the running listener "
                    "keeps its settings: restart to apply"
                    for name in RESTART_ONLY if getattr(config, name) != getattr(running, name)]
        # what cannot change live stays as it runs, so `config` says what is in effect
        config = config.model_copy(update={name: getattr(running, name)
                                           for name in RESTART_ONLY})
        try:
            pipeline = Pipeline(config, contract, tls=self.tls is not None,
                                previous=self.pipeline)
        except ConfigError as exc:
            return ReloadResult(trigger, "failed", config_hash, problems=tuple(exc.problems))
        changed = [name for name in type(config).model_fields
                   if getattr(config, name) != getattr(running, name)]
        contract_hash = _fingerprint(b"", contract)[1]
        if contract_hash != self._contract_hash:
            changed.append("contract")
        kept = [*(part for part in CARRIED_PARTS if part in pipeline.kept), "response_cutter"]
        if not upstream_changed:
            kept.append("upstream_pool")
        replaced = [part for part in (*CARRIED_PARTS, "upstream_pool") if part not in kept
                    and (part != "access_log" or config.access_log.enabled)]
        result = ReloadResult(trigger, "succeeded", config_hash, changed=tuple(changed),
                              kept=tuple(kept), replaced=tuple(replaced),
                              warnings=tuple(warnings))
        return _Prepared(pipeline, result, fingerprint, contract_hash, upstream_changed,
                         client_tls)

    async def _retire(self, old: Pipeline, pool: UpstreamPool | None) -> None:
        """Stop the replaced pipeline once the requests that started on it are done (its
        access log stays open for their lines); close its upstream pool with it.

        Cancelled (`close`): stopped at once, drained or not, then cancelled. The stop is
        awaited outside the `except`, as the compiled build needs
        (see the mypyc note above `settle_heap`)."""
        cancelled = False
        try:
            while old.in_flight > 0:  # noqa: ASYNC110 - a poll, bounded by the requests
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            cancelled = True
        try:
            await old.stop()
        finally:
            old.close()
            if pool is not None:
                pool.close()
                self._draining_pools.discard(pool)
            if gc.get_freeze_count():
                # the old pipeline was frozen with the heap: thawed, its cycles can be
                # collected; the new one is frozen in their place (one full collection
                # per reload, ~20 ms with a large contract)
                gc.unfreeze()
                settle_heap()
        if cancelled:
            raise asyncio.CancelledError

    async def watch_files(self) -> None:
        """`reload.watch`: poll the config file and the contract's files; reload once a
        change has stayed put for one interval. Reads `self.config` every round, so a
        reload can turn the watch on or off and change its interval."""
        seen = stamp = self._stamp()
        while True:
            await asyncio.sleep(self.config.reload.interval)
            if not self.config.reload.watch:
                seen = stamp = self._stamp()
                continue
            now = self._stamp()
            if now == stamp:
                seen = now
                continue
            if now != seen:
                seen = now  # still being written: look again next round
                continue
            await self.reload("watch")
            seen = stamp = self._stamp()

    def _stamp(self) -> tuple[object, ...]:
        """What changes when the config or a contract file is rewritten or swapped."""
        paths = [self.source, *_contract_files(self.contract)] if self.source else []
        stamps: list[object] = []
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)


# Settings the running listener was built from: a reload that changes them keeps them
# (and says "restart to apply"). The TLS certificate files themselves are read again by
# SIGHUP and the certificate watcher.
RESTART_ONLY = ("listen", "tls", "audit_log")  # audit_log: the trail is opened once


@dataclass(slots=True)
class ReloadResult:
    """What a reload did; the admin API answers it as JSON (`as_dict`)."""

    trigger: str  # "SIGHUP", "admin", "watch"
    outcome: Literal["succeeded", "failed", "unchanged"]
    config_hash: str  # sha256 of the config file's bytes ("" when it could not be read)
    problems: tuple[str, ...] = ()  # a failed reload: each `location: message`
    changed: tuple[str, ...] = ()  # top-level config sections, and "contract"
    kept: tuple[str, ...] = ()  # stateful parts carried over as they ran
    replaced: tuple[str, ...] = ()  # stateful parts built anew
    warnings: tuple[str, ...] = ()  # changes that need a restart
    duration: float = field(default=0.0)  # seconds

    def as_dict(self) -> dict[str, object]:
        return {
            "trigger": self.trigger, "outcome": self.outcome, "config_hash": self.config_hash,
            "duration_ms": round(self.duration * 1000, 1), "problems": list(self.problems),
            "changed": list(self.changed), "kept": list(self.kept),
            "replaced": list(self.replaced), "warnings": list(self.warnings),
        }


@dataclass(slots=True)
class _Prepared:
    pipeline: Pipeline
    result: ReloadResult
    fingerprint: str
    contract_hash: str
    upstream_changed: bool
    upstream_context: ssl.SSLContext | None


def _contract_files(contract: Contract) -> list[Path]:
    """Every file the contract was read from (the root and the files its $refs name)."""
    if contract.resolver is None:
        return [contract.source]
    return sorted(contract.resolver.docs)


def _fingerprint(config_bytes: bytes, contract: Contract) -> tuple[str, str]:
    """(sha256 of the config file, sha256 of it and of every contract file): equal
    fingerprints mean a reload has nothing to do."""
    config_hash = hashlib.sha256(config_bytes).hexdigest()
    digest = hashlib.sha256(config_bytes)
    for path in _contract_files(contract):
        digest.update(str(path).encode() + b"\0")
        with contextlib.suppress(OSError):
            digest.update(path.read_bytes())
    return config_hash, digest.hexdigest()


def _log_reload(result: ReloadResult) -> None:
    """One line per reload; a failed one also logs each problem with its location."""
    summary = fields("lifecycle", None, event="reload", **result.as_dict())
    if result.outcome == "failed":
        for problem in result.problems:
            logger.error("reload (%s) problem: %s", result.trigger, problem, extra=fields(
                "lifecycle", event="reload-problem", trigger=result.trigger, problem=problem))
        logger.error("reload (%s) failed in %.0f ms: %d problem(s), the running config is "
                     "kept (config sha256 %s)", result.trigger, result.duration * 1000,
                     len(result.problems), result.config_hash[:12] or "-", extra=summary)
        return
    for warning in result.warnings:
        logger.warning("reload (%s): %s", result.trigger, warning, extra=fields(
            "lifecycle", event="reload-warning", trigger=result.trigger, warning=warning))
    if result.outcome == "unchanged":
        logger.info("reload (%s) unchanged in %.0f ms: the files are as running (config "
                    "sha256 %s)", result.trigger, result.duration * 1000,
                    result.config_hash[:12], extra=summary)
        return
    logger.info("reload (%s) succeeded in %.0f ms (config sha256 %s): changed %s; kept %s; "
                "replaced %s", result.trigger, result.duration * 1000, result.config_hash[:12],
                ", ".join(result.changed) or "nothing", ", ".join(result.kept) or "nothing",
                ", ".join(result.replaced) or "nothing", extra=summary)


# mypyc 2.4.1: a compiled coroutine that awaits inside an `except` or `finally` block while
# an exception is in flight leaks that exception into the coroutine that awaits it (a
# cancelled task's CancelledError re-raised by `serve` after `gather(..., return_exceptions=
# True)`; 25 lines reproduce it, bench/RESULTS.md). In the compiled modules the exception is
# caught into a local and the awaits run after the handler; tests/test_compiled.py checks
# that no hot module awaits inside a handler ("await outside the handler" below).


def settle_heap() -> None:
    """Collect once, then freeze what is alive (`gc.freeze`): the compiled contract, the
    validators and the config, objects that live as long as the pipeline, leave the cyclic
    collector's reach.

    Why: a full (generation 2) collection traverses every container object in the process,
    on the event loop, while every request in flight waits. Measured (`bench/gc_pause.py`,
    bench/RESULTS.md): with Stripe's contract (452 operations) a gateway tracks ~150k objects
    and a full collection takes tens of milliseconds (69 ms on the shared bench machine),
    0.00 ms once they are frozen. They are rare while serving (the young generations take the
    per-request garbage), but each one is a tail no request deserved. Frozen objects are
    still freed by reference counting; only a cycle among them waits for `gc.unfreeze`, which
    `serve` calls when it stops and a reload calls once the old pipeline is retired."""
    gc.collect()
    gc.freeze()


def build_gateway(config: Config) -> Gateway:
    """Load and compile everything: contract, TLS files, upstream TLS (raises ConfigError
    listing every problem of all three at once)."""
    problems: list[str] = []
    contract: Contract | None = None
    listener_tls: ServerTls | None = None
    client_tls: ssl.SSLContext | None = None
    try:
        contract = load_contract(config)
    except ConfigError as exc:
        problems += exc.problems
    try:
        listener_tls = server_tls(config)
    except ConfigError as exc:
        problems += exc.problems
    try:
        client_tls = upstream_context(config)
    except ConfigError as exc:
        problems += exc.problems
    admin_token: bytes | None = None
    try:
        admin_token = read_token(config)
    except ConfigError as exc:
        problems += exc.problems
    audit: AuditTrail | None = None
    try:
        audit = open_audit_trail(config)
    except ConfigError as exc:
        problems += exc.problems
    if problems or contract is None:
        raise ConfigError(problems)
    return Gateway(config, contract, tls=listener_tls, upstream_tls=client_tls,
                   admin_token=admin_token, audit=audit)


# Signals whose default action would end the process: each is handled, so none can stop
# the gateway without a log line and a flushed access log (issue 11: SIGHUP killed a
# plain-HTTP gateway silently).
STOPPING_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT")
IGNORED_SIGNALS = ("SIGUSR1", "SIGUSR2")


def _handle_signals(
    loop: asyncio.AbstractEventLoop, stop: asyncio.Event, tls: ServerTls | None,
    on_reload: Callable[[], None] | None = None,
) -> list[signal.Signals]:
    """Install the process's signal handlers; return those installed (none when not on
    the main thread, as in tests that serve in a thread, or on Windows). `on_reload`:
    what SIGHUP starts besides the certificate reload (the config and contract reload)."""

    def stopping(name: str) -> None:
        if not stop.is_set():
            logger.info("%s received: shutting down", name, extra=fields(
                "lifecycle", event="signal", signal=name, action="stop"))
        stop.set()

    def reload() -> None:
        done = "no TLS listener to reload"
        if tls is not None:  # tls.reload logs what it loaded, or why it kept the old chain
            done = "TLS certificate reloaded" if tls.reload("SIGHUP") else "TLS certificate kept"
        if on_reload is None:
            logger.info("SIGHUP: %s; other settings are read at start only (restart to "
                        "change them)", done, extra=fields(
                            "lifecycle", event="reload", signal="SIGHUP", result=done))
            return
        logger.info("SIGHUP: %s; reloading the config and the contract", done, extra=fields(
            "lifecycle", event="signal", signal="SIGHUP", action="reload", result=done))
        on_reload()

    def ignored(name: str) -> None:
        logger.info("%s received: ignored", name, extra=fields(
            "lifecycle", event="signal", signal=name, action="ignored"))

    actions: list[tuple[str, Callable[..., object], tuple[object, ...]]] = [
        *((name, stopping, (name,)) for name in STOPPING_SIGNALS),
        ("SIGHUP", reload, ()),
        *((name, ignored, (name,)) for name in IGNORED_SIGNALS),
    ]
    installed: list[signal.Signals] = []
    for name, action, args in actions:
        sig = getattr(signal, name, None)
        if sig is None:  # not on this platform
            continue
        try:
            loop.add_signal_handler(sig, action, *args)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            return installed
        installed.append(sig)
    return installed


@dataclass(frozen=True, slots=True)
class InheritedSockets:
    """Listening sockets a worker of `serve --workers N` got from its supervisor, which
    bound them once for every worker (apishield/supervisor.py). `admin` is given to
    worker 0 only: the admin listener is never bound twice."""

    public: socket.socket
    plain: socket.socket | None = None
    admin: socket.socket | None = None


def bound_address(server: asyncio.Server) -> tuple[str, int]:
    """The host and port a server listens on. `Server.sockets` is typed a tuple but uvloop
    returns a list: read untyped, so a mypyc build does not check the declared type."""
    sockets: list[socket.socket] = list(getattr(server, "sockets"))  # noqa: B009
    host, port = sockets[0].getsockname()[:2]
    return str(host), int(port)


async def _listen(
    factory: Callable[[], asyncio.BaseProtocol], host: str, port: int,
    sock: socket.socket | None, backlog: int, context: ssl.SSLContext | None = None,
    handshake: float | None = None,
) -> asyncio.Server:
    """A listener on `host`:`port`, or on `sock` when the supervisor bound it."""
    loop = asyncio.get_running_loop()
    if sock is not None:
        return await loop.create_server(factory, sock=sock, backlog=backlog, ssl=context,
                                        ssl_handshake_timeout=handshake)
    return await loop.create_server(factory, host, port, backlog=backlog, reuse_address=True,
                                    ssl=context, ssl_handshake_timeout=handshake)


async def serve(
    gateway: Gateway,
    host: str,
    port: int,
    *,
    ready: asyncio.Future[tuple[str, int]] | None = None,
    stop: asyncio.Event | None = None,
    sockets: InheritedSockets | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT/SIGQUIT (or `stop`), then drain in-flight requests, flush
    the access log and close. SIGHUP never stops it (see `_handle_signals`).

    With `tls`, the listener speaks HTTPS only; SIGHUP and a change of the certificate
    files reload the chain in place; `tls.plain_http` adds a listener that redirects or
    refuses (it never forwards).

    `sockets`: serve on listeners bound by the supervisor instead of binding `host` and
    `port` (the kernel spreads the connections over the workers that accept on them)."""
    loop = asyncio.get_running_loop()
    gateway.start_pool()
    await gateway.pipeline.start()
    pool = gateway.pool
    assert pool is not None
    sweeper = Sweeper(lambda: [*gateway.connections, *gateway.upstream_busy()])
    tls = gateway.tls
    public = sockets.public if sockets is not None else None
    if tls is None:
        server = await _listen(lambda: HttpConnection(gateway), host, port, public, 2048)
    else:
        server = await _listen(
            lambda: HttpConnection(gateway, scheme="https"), host, port, public, 2048,
            tls.context,
            # the handshake is part of the request head's time budget (slowloris, D3)
            gateway.config.timeouts.header,
        )
    address = bound_address(server)
    plain: asyncio.Server | None = None
    responder: PlainHttpResponder | None = None
    if tls is not None and tls.settings.plain_http is not None:
        settings = tls.settings.plain_http
        responder = PlainHttpResponder(
            gateway, settings.mode, settings.redirect_port or address[1]
        )
        try:
            plain = await _listen(responder.protocol, host, settings.port,
                                  sockets.plain if sockets is not None else None, 512)
        except OSError:
            server.close()
            raise
    stop = stop or asyncio.Event()
    reloads: set[asyncio.Task[object]] = set()

    def reload_on_signal() -> None:
        task: asyncio.Task[object] = loop.create_task(gateway.reload("SIGHUP"))
        reloads.add(task)  # held: the loop keeps only weak references
        task.add_done_callback(reloads.discard)

    handled = _handle_signals(loop, stop, tls,
                              reload_on_signal if gateway.source is not None else None)
    file_watch = loop.create_task(gateway.watch_files()) if gateway.source else None
    watcher: asyncio.Task[None] | None = None
    if tls is not None:
        watcher = loop.create_task(tls.watch())
        logger.info("listening on https://%s:%d (%s profile; %s)", address[0], address[1],
                    tls.settings.profile, tls.info.describe(), extra=fields(
                        "lifecycle", event="start", listener="https", host=address[0],
                        port=address[1], tls_profile=tls.settings.profile))
    else:
        logger.info("listening on http://%s:%d", address[0], address[1], extra=fields(
            "lifecycle", event="start", listener="http", host=address[0], port=address[1]))
    if plain is not None and responder is not None:
        plain_address = bound_address(plain)
        logger.info("plain http on http://%s:%d: %s", plain_address[0], plain_address[1],
                    "redirected to https" if responder.mode == "redirect" else "refused",
                    extra=fields("lifecycle", event="start", listener="plain_http",
                                 host=plain_address[0], port=plain_address[1],
                                 plain_http=responder.mode))
    admin: AdminListener | None = None
    if gateway.config.admin is not None and (sockets is None or sockets.admin is not None):
        admin = AdminListener(gateway.admin_app())
        try:
            admin_address = await admin.start(gateway.config.admin.host,
                                              gateway.config.admin.port,
                                              sock=sockets.admin if sockets else None)
        except OSError:
            server.close()
            if plain is not None:
                plain.close()
            raise
        logger.info("admin API on http://%s:%d (%s)", admin_address[0], admin_address[1],
                    "bearer token required" if gateway.admin_token else "loopback, no token",
                    extra=fields("lifecycle", event="start", listener="admin",
                                 host=admin_address[0], port=admin_address[1]))
    gateway.record_start(address[0], address[1])
    settle_heap()
    if ready is not None:
        ready.set_result((address[0], address[1]))
    interrupted: BaseException | None = None
    try:
        await stop.wait()
    except BaseException as exc:  # cancelled: shut down all the same, then re-raise
        interrupted = exc  # (await outside the handler: mypyc)
    # the shutdown, whether stopped or cancelled
    gc.unfreeze()  # an embedding process gets its whole heap back under the cyclic GC
    logger.info("shutting down: no new connections, finishing in-flight requests",
                extra=fields("lifecycle", event="stopping",
                             reason="requested" if stop.is_set() else "cancelled"))
    server.close()
    if plain is not None and responder is not None:
        plain.close()
        responder.close()
    if watcher is not None:
        watcher.cancel()
    if admin is not None:
        admin.close()
    if file_watch is not None:
        file_watch.cancel()
    for task in list(reloads):
        task.cancel()
    await asyncio.gather(*reloads, *(t for t in (file_watch,) if t), return_exceptions=True)
    for sig in handled:
        loop.remove_signal_handler(sig)
    for connection in list(gateway.connections):
        connection.shutdown()
    deadline = loop.time() + gateway.config.timeouts.shutdown
    while gateway.connections and loop.time() < deadline:  # noqa: ASYNC110 - bounded poll
        await asyncio.sleep(0.05)
    for connection in list(gateway.connections):
        if connection.transport is not None:
            connection.transport.abort()
    sweeper.stop()
    await gateway.close()
    logger.info("stopped", extra=fields(
        "lifecycle", event="stop", reason="requested" if stop.is_set() else "cancelled"))
    if interrupted is not None:
        raise interrupted
