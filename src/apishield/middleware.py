"""`ApiShieldMiddleware`: the same pipeline in-process, in front of any ASGI app.

    app.add_middleware(ApiShieldMiddleware, config="apishield.yaml")

Here `forward` is the wrapped app. What the ASGI server already guarantees (one parse by
its own HTTP parser, hop-by-hop handling, keep-alive) is left to it; everything the
contract decides (default deny, media types, body limits, security headers, request id,
access log) is the same code the gateway runs. `upstream` and `listen` in the config are
ignored here. This class is the public, subclassable surface (lifespan, the admin mount,
the last flush); what runs once per request is `asgi_http.py`, compiled in a mypyc build.

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
from pathlib import Path

from apishield.admin.app import AdminApp, read_token
from apishield.admin.asgi import AdminMount
from apishield.asgi_http import ASGIApp, AsgiHttp, Message, Receive, Scope, Send
from apishield.config import Config, load_config
from apishield.contract.loader import load_contract
from apishield.observe.logjson import attach_if_unconfigured, redact_records
from apishield.pipeline import Pipeline

__all__ = ["ASGIApp", "ApiShieldMiddleware", "Message", "Receive", "Scope", "Send"]

logger = logging.getLogger("apishield")


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

    # The per-request path (asgi_http.py, compiled in a mypyc build) holds the pipeline and
    # the app it serves: setting either here builds it anew, so it never runs stale ones.
    @property
    def pipeline(self) -> Pipeline:
        return self._pipeline

    @pipeline.setter
    def pipeline(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self._asgi_http = AsgiHttp(pipeline, self._app, self.config.limits)

    @property
    def app(self) -> ASGIApp:
        return self._app

    @app.setter
    def app(self, app: ASGIApp) -> None:
        self._app = app
        if hasattr(self, "_pipeline"):  # not yet in __init__: the pipeline setter builds it
            self._asgi_http = AsgiHttp(self._pipeline, app, self.config.limits)

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
                await self._asgi_http.serve(scope, receive, send)
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
            await self._asgi_http.serve(scope, receive, send)
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
