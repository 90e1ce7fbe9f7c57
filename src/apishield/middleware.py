"""`ApiShieldMiddleware`: the same pipeline in-process, in front of any ASGI app.

    app.add_middleware(ApiShieldMiddleware, config="apishield.yaml")

Here `forward` is the wrapped app. What the ASGI server already guarantees (one parse by
its own HTTP parser, hop-by-hop handling, keep-alive) is left to it; everything the
contract decides (default deny, media types, body limits, security headers, request id,
access log) is the same code the gateway runs. `upstream` and `listen` in the config are
ignored here.

- `lifespan` passes through to the app (its own startup and shutdown handlers run as
  before); the middleware only watches it: once the app has finished its shutdown, the
  pipeline is stopped and closed (the access log flushed) before the server is told that
  shutdown is complete. An app that does not speak lifespan (it raises or returns before
  asking for the first event) gets it spoken for it, so the flush still happens.
- A server that runs no lifespan (`uvicorn --lifespan off`: the first scope is `http`)
  never says it is stopping, and uvicorn ends a SIGTERM by re-raising the signal, so no
  exit hook runs either. Then the access log is written whenever no request is in flight
  (lines still batch under concurrent load), and also when the loop's leftover tasks are
  cancelled and at interpreter exit.
- `websocket` connections are refused (closed with 1008 before the handshake, which
  servers answer with HTTP 403) unless `websockets: true`.
- The body is read under the operation's limit before the app sees a byte of it; the app
  gets it replayed as a single `http.request` message.
- Client copies of `X-Apishield-*` (the identity namespace) and `X-Request-Id` are removed
  from the scope; the app sees the gateway's request id in `x-request-id`.
- An exception from the app before it started its response becomes a generic 500
  problem, with the traceback logged under the request id; after, it propagates so the
  server aborts the connection (the only honest signal once a status was sent).
- Logging: the host's logging configuration is never changed. If no handler would receive
  the `apishield` loggers' records (neither they nor the root logger have one: a bare
  uvicorn), one JSON handler on stderr is added to the `apishield` logger, so the
  middleware writes the same line schema as the gateway (docs/logging.md);
  `log_handler=False` never adds it. Either way a filter on the `apishield` loggers masks
  secrets in messages and tracebacks before any handler, the host's included, sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from apishield.admin.app import AdminApp, read_token
from apishield.admin.asgi import AdminMount
from apishield.auth.identity import identity_headers
from apishield.config import Config, load_config
from apishield.contract.loader import load_contract
from apishield.exchange import Exchange, Headers
from apishield.observe.logjson import attach_if_unconfigured, fields, redact_records
from apishield.pipeline import Pipeline
from apishield.problems import (
    BadGateway,
    HeadersTooLarge,
    PayloadTooLarge,
    Problem,
    UriTooLong,
)
from apishield.steps.response_filter import Plan

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("apishield")
_IDENTITY_PREFIX = b"x-apishield-"


def _spoofs_gateway_header(name: bytes) -> bool:
    """Client copies of what only the gateway may say (also as `X_Apishield_...` twins)."""
    dashed = name.replace(b"_", b"-")
    return dashed.startswith(_IDENTITY_PREFIX) or dashed == b"x-request-id"


class ApiShieldMiddleware:
    def __init__(self, app: ASGIApp, config: str | Path | Config = "apishield.yaml", *,
                 log_handler: bool = True) -> None:
        self.app = app
        self.config = config if isinstance(config, Config) else load_config(config)
        redact_records()  # before anything is logged, whoever formats it
        if log_handler:
            attach_if_unconfigured()
        self.contract = load_contract(self.config)
        self._log_closer: weakref.finalize[[], ApiShieldMiddleware] | None = None
        self.pipeline = self._new_pipeline()
        self._started = False
        self._closed = False
        self._flusher: asyncio.Task[None] | None = None
        self._lifespan_seen = False  # a lifespan server tells us when it stops
        self._in_flight = 0  # requests, counted only without lifespan
        self.admin = self._admin_mount()
        limits = self.config.limits
        self._max_url = limits.max_url_length
        self._max_header_bytes = limits.max_header_bytes
        self._max_header_count = limits.max_header_count

    def _admin_mount(self) -> AdminMount | None:
        """The admin API under `admin.path` (see admin/asgi.py), when configured."""
        admin = self.config.admin
        if admin is None:
            return None
        app = AdminApp(config=lambda: self.config, readiness=self._readiness,
                       gauges=lambda: {
                           "apishield_bans_active": float(self.pipeline.bans.active())},
                       reload=None, token=read_token(self.config),
                       pipeline=lambda: self.pipeline)
        return AdminMount(app, admin.path, protected=admin.protected)

    async def _readiness(self) -> list[str]:
        """The wrapped app is in this process: only the state store can be unreachable."""
        return self.pipeline.state_problems()

    def _new_pipeline(self) -> Pipeline:
        pipeline = Pipeline(self.config, self.contract)
        if self._log_closer is not None:
            self._log_closer()  # the previous pipeline's log (a finalizer runs at most once)
        # The last resort for a server that never sends lifespan.shutdown: lines still
        # pending when the interpreter exits (or this middleware is dropped) are written.
        # Tied to the middleware, not the pipeline: a compiled (mypyc) Pipeline has no
        # __weakref__ slot.
        self._log_closer = (None if pipeline.access_log is None
                            else weakref.finalize(self, pipeline.access_log.close))
        return pipeline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if not self._started:
            # no lifespan event is guaranteed to reach a middleware: start on first use
            self._started = True
            if self._closed:  # a second lifespan cycle (a test client used twice)
                self._closed = False
                self.pipeline = self._new_pipeline()
            await self.pipeline.start()
            if self.pipeline.access_log is not None:
                self._flusher = asyncio.create_task(self._flush_when_cancelled(self.pipeline))
        if kind == "http":
            if self.admin is not None and self.admin.matches(scope["path"]):
                await self.admin(scope, send)
            elif self._lifespan_seen:
                await self._http(scope, receive, send)
            else:
                await self._http_unannounced_end(scope, receive, send)
        elif kind == "lifespan":
            self._lifespan_seen = True
            await self._lifespan(scope, receive, send)
        elif kind == "websocket" and not self.config.websockets:
            await send({"type": "websocket.close", "code": 1008})
        else:  # websockets when allowed
            await self.app(scope, receive, send)

    async def _http_unannounced_end(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A request under a server without lifespan: write the log once idle."""
        self._in_flight += 1
        try:
            await self._http(scope, receive, send)
        finally:
            self._in_flight -= 1
            access_log = self.pipeline.access_log
            if self._in_flight == 0 and access_log is not None:
                access_log.flush()

    @staticmethod
    async def _flush_when_cancelled(pipeline: Pipeline) -> None:
        """Waits forever; cancelled when the server's loop ends without a lifespan
        shutdown (`asyncio.run` cancels what is left), it writes the pending lines."""
        try:
            await asyncio.Event().wait()
        finally:
            if pipeline.access_log is not None:
                pipeline.access_log.flush()

    async def _shutdown(self) -> None:
        """Stop the background work and flush and close the access log (once)."""
        if self._closed:
            return
        self._closed = True
        self._started = False
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        try:
            await self.pipeline.stop()
        finally:
            self.pipeline.close()

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the lifespan protocol through; close the pipeline after the app's shutdown
        and before the server hears that shutdown is complete (it exits right after)."""
        asked = False  # the app asked for an event: it speaks lifespan
        answered = False
        shutting_down = False

        async def app_receive() -> Message:
            nonlocal asked, shutting_down
            asked = True
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                shutting_down = True
            return message

        async def app_send(message: Message) -> None:
            nonlocal answered
            answered = True
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self._shutdown()
            await send(message)

        try:
            await self.app(scope, app_receive, app_send)
        except Exception:
            if asked or answered:
                raise
            logger.debug("the app does not support lifespan; the middleware answers it")
        else:
            if asked or answered:
                return
        finally:
            if shutting_down:  # the app ended (or failed) its shutdown without saying so
                await self._shutdown()
        await self._serve_lifespan(receive, send)

    async def _serve_lifespan(self, receive: Receive, send: Send) -> None:
        """Lifespan for an app without it: nothing to start, the pipeline to close."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _exchange(self, scope: Scope) -> Exchange:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        root_path = scope.get("root_path", "").encode("utf-8")
        if root_path and raw_path.startswith(root_path):
            raw_path = raw_path[len(root_path):] or b"/"  # contract paths are app-relative
        client = scope.get("client")
        exchange = Exchange(
            scope["method"],
            raw_path,
            scope.get("query_string", b""),
            [(name.lower(), value) for name, value in scope.get("headers", [])],
            client[0] if client else "",
            scope.get("scheme", "http"),
            scope.get("http_version", "1.1"),
        )
        exchange.read_framing()  # for the limits step (the gateway's parser does this)
        return exchange

    def _check_sizes(self, exchange: Exchange) -> None:
        if len(exchange.raw_path) + len(exchange.query) + 1 > self._max_url:
            raise UriTooLong("url-over-limit")
        if len(exchange.headers) > self._max_header_count:
            raise HeadersTooLarge("header-count-over-limit")
        if sum(len(n) + len(v) + 4 for n, v in exchange.headers) > self._max_header_bytes:
            raise HeadersTooLarge("header-bytes-over-limit")

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        pipeline = self.pipeline
        exchange = self._exchange(scope)
        status = 500
        started = False
        if pipeline.usage is not None:  # count the response body bytes (F4)
            send = _counting(send, exchange)

        async def refuse(problem: Problem) -> None:
            nonlocal status
            status, headers, body = pipeline.problem_response(exchange, problem)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        try:
            try:
                self._check_sizes(exchange)
            except Problem as problem:
                exchange.problem = problem
            else:
                pipeline.on_head(exchange)
            if exchange.problem is not None:
                await refuse(exchange.problem)
                return
            body = await self._read_body(receive, exchange.body_limit)
            if body is None:
                exchange.reason = "client-disconnected"
                status = 499
                return
            exchange.body = body
            pipeline.on_body(exchange)
            if exchange.problem is not None:
                await refuse(exchange.problem)
                return
            if exchange.suspended is not None:
                await pipeline.on_request(exchange)
                if exchange.problem is not None:
                    await refuse(exchange.problem)
                    return

            replayed = False

            async def app_receive() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            # A response the gateway must rewrite (a 5xx to mask, a JSON body to filter) is
            # held whole: its start message, then its body parts.
            held_start: Message | None = None
            held_plan: Plan | None = None  # what the pipeline does to a held body
            held: list[bytes] = []
            held_size = 0

            async def app_send(message: Message) -> None:
                nonlocal status, started, held_start, held_plan, held_size
                if message["type"] == "http.response.start":
                    status = message["status"]
                    started = True
                    headers: Headers = [
                        (name.lower(), value) for name, value in message.get("headers", [])
                    ]
                    masked = status >= 500 and pipeline.mask_errors
                    held_plan = None if masked else pipeline.filter_shape(exchange, status,
                                                                          headers)
                    if masked or held_plan is not None:
                        held_start = {**message, "headers": headers}
                        return
                    headers = pipeline.on_response(exchange, status, headers)
                    await send({**message, "headers": headers})
                    return
                if held_start is None or message["type"] != "http.response.body":
                    await send(message)
                    return
                chunk = message.get("body", b"")
                held_size += len(chunk)
                if held_size > pipeline.max_filter_bytes:
                    raise BadGateway("response-too-large-to-filter")
                held.append(chunk)
                if not message.get("more_body", False):
                    status = await self._send_held(exchange, held_start, held_plan,
                                                   b"".join(held), send)

            await self.app(self._app_scope(scope, exchange), app_receive, app_send)
        except Problem as problem:
            if started:
                raise
            await refuse(problem)
        except Exception as exc:
            if started:
                logger.error("response to %s broken", exchange.id, exc_info=exc,
                             extra=fields("error", exchange.id))
                exchange.reason = "response-broken"
                raise
            status, headers, body = pipeline.internal_error(exchange, exc)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            pipeline.record(exchange, status)

    async def _send_held(self, exchange: Exchange, start: Message, plan: Plan | None,
                         body: bytes, send: Send) -> int:
        """Send a held response: a 5xx masked, or a body as `plan` says (cut to its
        declared shape, checked against its schema, or refused)."""
        pipeline = self.pipeline
        status = start["status"]
        if status >= 500 and pipeline.mask_errors:
            code, headers, body = pipeline.mask_upstream_error(exchange, status, body)
        else:
            try:
                body = pipeline.filter_body(exchange, plan, body) if plan else body
            except Problem as problem:
                code, headers, body = pipeline.problem_response(exchange, problem)
            else:
                code = status
                headers = [(n, v) for n, v in start["headers"] if n != b"content-length"]
                headers.append((b"content-length", b"%d" % len(body)))
                headers = pipeline.on_response(exchange, status, headers)
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return code

    async def _read_body(self, receive: Receive, limit: int) -> bytes | None:
        """The whole body, refused with 413 the moment it passes `limit`."""
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge("body-over-limit")
                parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    def _app_scope(self, scope: Scope, exchange: Exchange) -> Scope:
        headers = [
            (name, value)
            for name, value in scope.get("headers", [])
            if not _spoofs_gateway_header(name.lower())
        ]
        headers.append((b"x-request-id", exchange.id.encode()))
        if exchange.client_identity:
            headers.extend(exchange.client_identity)
        if exchange.principal is not None:
            headers.extend(identity_headers(exchange.principal))
        return {**scope, "headers": headers}


def _counting(send: Send, exchange: Exchange) -> Send:
    """`send`, adding every response body's size to `exchange.bytes_out` (usage counts;
    the ASGI server writes the head, so only body bytes are known here)."""
    async def counted(message: Message) -> None:
        if message["type"] == "http.response.body":
            exchange.bytes_out += len(message.get("body", b""))
        await send(message)

    return counted
