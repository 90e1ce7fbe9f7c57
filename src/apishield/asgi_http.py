"""The ASGI middleware's per-request path: one `http` scope through the pipeline, into the
wrapped app and back (issue 18).

`ApiShieldMiddleware` (middleware.py) stays an interpreted class: it is public, users
subclass it, and it ties the access log's last flush to itself with `weakref.finalize`.
What runs once per request lives here instead, so a compiled build (mypyc,
`compiled.HOT_MODULES`) turns it into C like the gateway's transport: building the
`Exchange` from the scope, the size limits, reading the body under its limit, replaying it
to the app, holding, rewriting and counting the app's response. Behaviour is the
middleware's as documented there; only where the code runs changed.

Two rules keep the compiled build identical to the interpreted one:

- `exchange.problem` is only ever read into a local, never narrowed in place: mypy would
  keep a narrowing to None across `await pipeline.on_request(exchange)` (which sets it),
  and mypyc checks narrowed types at run time (bench/RESULTS.md, "narrowed to None").
- Whatever comes from the server or the app (the values in scopes and messages) is typed
  `Any` where its exact type is not ours to promise, so mypyc adds no run-time type
  checks the interpreted build would not make. Scopes and messages themselves are dicts
  (ASGI 3.0) and are read as dicts (another mapping is copied into one first): compiled,
  a dict lookup is a C call, a `Mapping.get` a generic method call.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from apishield.auth.identity import identity_headers
from apishield.config import Limits
from apishield.exchange import Exchange, Headers
from apishield.observe.logjson import fields
from apishield.pipeline import Pipeline
from apishield.problems import BadGateway, HeadersTooLarge, PayloadTooLarge, Problem, UriTooLong
from apishield.steps.response_filter import Plan

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("apishield")
_IDENTITY_PREFIX = b"x-apishield-"


def spoofs_gateway_header(name: bytes) -> bool:
    """Client copies of what only the gateway may say (also as `X_Apishield_...` twins);
    `name` is lower case. Both names start `x-` (or `x_`), so most headers are let go on
    two byte comparisons (compiled: native indexing; `startswith` with a tuple was a
    generic method call, ~1,200 instructions a header)."""
    if len(name) < 2 or name[0] != 0x78 or (name[1] != 0x2D and name[1] != 0x5F):  # x- x_
        return False
    dashed = name.replace(b"_", b"-")
    return dashed.startswith(_IDENTITY_PREFIX) or dashed == b"x-request-id"


class AsgiHttp:
    """Serves a middleware's `http` scopes with one pipeline in front of one app; the
    middleware builds a new one whenever its pipeline or app changes."""

    def __init__(self, pipeline: Pipeline, app: ASGIApp, limits: Limits) -> None:
        self.pipeline = pipeline
        self.app = app
        self.max_url = limits.max_url_length
        self.max_header_bytes = limits.max_header_bytes
        self.max_header_count = limits.max_header_count

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One request: refused, failed or answered by the app, and recorded once."""
        pipeline = self.pipeline
        exchange, app_headers, header_bytes = exchange_from(scope)
        flight = Flight(pipeline, exchange, receive, send)
        try:
            # a refusal or failure is kept and answered after its handler: a compiled
            # coroutine must not await inside `except` (the mypyc note in gateway.py)
            failure: Exception | None = None
            try:
                await self._answer(pipeline, flight, scope, exchange, app_headers,
                                   header_bytes, receive)
            except Problem as problem:
                if flight.started:
                    raise
                failure = problem
            except Exception as exc:
                if flight.started:
                    logger.error("response to %s broken", exchange.id, exc_info=exc,
                                 extra=fields("error", exchange.id))
                    exchange.reason = "response-broken"
                    raise
                failure = exc
            if isinstance(failure, Problem):
                await flight.refuse(failure)
            elif failure is not None:
                status, headers, answer = pipeline.internal_error(exchange, failure)
                flight.status = status
                await flight.out({"type": "http.response.start", "status": status,
                                  "headers": headers})
                await flight.out({"type": "http.response.body", "body": answer})
        finally:
            pipeline.record(exchange, flight.status)

    async def _answer(self, pipeline: Pipeline, flight: Flight, scope: Scope,
                      exchange: Exchange, app_headers: Headers, header_bytes: int,
                      receive: Receive) -> None:
        """The request's way through: refused by a step, or read and handed to the app."""
        try:
            self.check_sizes(exchange, header_bytes)
        except Problem as problem:
            exchange.problem = problem
        else:
            pipeline.on_head(exchange)
        refused = exchange.problem
        if refused is not None:
            await flight.refuse(refused)
            return
        body = await read_body(receive, exchange.body_limit)
        if body is None:
            exchange.reason = "client-disconnected"
            flight.status = 499
            return
        exchange.body = body
        pipeline.on_body(exchange)
        refused = exchange.problem
        if refused is not None:
            await flight.refuse(refused)
            return
        if exchange.suspended is not None:
            await pipeline.on_request(exchange)
            refused = exchange.problem
            if refused is not None:
                await flight.refuse(refused)
                return
        flight.body = body
        await self.app(app_scope(scope, exchange, app_headers), flight.receive, flight.send)

    def check_sizes(self, exchange: Exchange, header_bytes: int) -> None:
        """The transport limits the gateway's parser enforces (`header_bytes`: as
        `exchange_from` counted them, `name: value\\r\\n` each)."""
        if len(exchange.raw_path) + len(exchange.query) + 1 > self.max_url:
            raise UriTooLong("url-over-limit")
        if len(exchange.headers) > self.max_header_count:
            raise HeadersTooLarge("header-count-over-limit")
        if header_bytes > self.max_header_bytes:
            raise HeadersTooLarge("header-bytes-over-limit")


def exchange_from(scope: Scope) -> tuple[Exchange, Headers, int]:
    """The `Exchange` of a scope, the headers the app will see (the client's copies of the
    gateway's own removed, names as the server gave them) and the header bytes, all in one
    pass over the scope's headers."""
    # A scope is a dict (ASGI 3.0); typed so, a compiled build reads it with dict
    # operations instead of generic method calls (~300 instructions each).
    scope_dict: dict[str, Any] = scope if isinstance(scope, dict) else dict(scope)
    raw_path: bytes = scope_dict.get("raw_path") or scope_dict["path"].encode("utf-8")
    root = scope_dict.get("root_path")
    if root:  # mounted under a prefix: contract paths are app-relative
        root_path: bytes = root.encode("utf-8")
        if raw_path.startswith(root_path):
            cut = len(root_path)
            raw_path = raw_path[cut:] or b"/"
    lowered: Headers = []
    kept: Headers = []
    header_bytes = 0
    for name, value in scope_dict.get("headers", []):
        low: bytes = name.lower()
        lowered.append((low, value))
        header_bytes += len(low) + len(value) + 4
        if not spoofs_gateway_header(low):
            kept.append((name, value))
    client = scope_dict.get("client")
    exchange = Exchange(
        scope_dict["method"],
        raw_path,
        scope_dict.get("query_string", b""),
        lowered,
        client[0] if client else "",
        scope_dict.get("scheme", "http"),
        scope_dict.get("http_version", "1.1"),
    )
    exchange.read_framing()  # for the limits step (the gateway's parser does this)
    return exchange, kept, header_bytes


def app_scope(scope: Scope, exchange: Exchange, headers: Headers) -> Scope:
    """The scope the app gets: `headers` (the client's, cleaned) with the gateway's request
    id and the identity the pipeline verified."""
    headers.append((b"x-request-id", exchange.id.encode()))
    if exchange.client_identity:
        headers.extend(exchange.client_identity)
    principal = exchange.principal
    if principal is not None:
        headers.extend(identity_headers(principal))
    return {**scope, "headers": headers}


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, refused with 413 the moment it passes `limit`; None when the client
    disconnected first."""
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


class Flight:
    """One admitted request between the app and the server: the app's `receive` replays
    the body already read, its `send` passes the response on or holds it whole (a 5xx to
    mask, a body to filter), and `out` counts the body bytes sent when usage is on (F4:
    the server writes the head, so only body bytes are known here)."""

    def __init__(self, pipeline: Pipeline, exchange: Exchange, receive: Receive,
                 send: Send) -> None:
        self.pipeline = pipeline
        self.exchange = exchange
        self.server_receive = receive
        self.server_send = send
        self.counting = pipeline.usage is not None
        self.body = b""
        self.replayed = False
        self.status = 500  # what the access log records if nothing is sent
        self.started = False  # the app sent its response's start
        # a response held whole: its status and (lower-cased) headers, the plan for its
        # body, the body parts so far (kept typed, not as the app's start message: only
        # these two of its fields are ever sent on)
        self.holding = False
        self.held_status = 0
        self.held_headers: Headers = []
        self.held_plan: Plan | None = None
        self.held: list[bytes] = []
        self.held_size = 0

    async def out(self, message: Message) -> None:
        """To the server, counted."""
        if self.counting and message["type"] == "http.response.body":
            self.exchange.bytes_out += len(message.get("body", b""))
        await self.server_send(message)

    async def refuse(self, problem: Problem) -> None:
        status, headers, body = self.pipeline.problem_response(self.exchange, problem)
        self.status = status
        await self.out({"type": "http.response.start", "status": status, "headers": headers})
        await self.out({"type": "http.response.body", "body": body})

    async def receive(self) -> Message:
        if not self.replayed:
            self.replayed = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        return await self.server_receive()

    async def send(self, message: Message) -> None:
        # a message is a dict (ASGI 3.0): read as one, with dict operations when compiled
        message_dict: dict[str, Any] = message if isinstance(message, dict) else dict(message)
        kind = message_dict["type"]
        if kind == "http.response.start":
            pipeline = self.pipeline
            status: int = message_dict["status"]
            self.status = status
            self.started = True
            headers: Headers = [(name.lower(), value)
                                for name, value in message_dict.get("headers", [])]
            masked = status >= 500 and pipeline.mask_errors
            plan = None if masked else pipeline.filter_shape(self.exchange, status, headers)
            self.held_plan = plan
            if masked or plan is not None:
                self.holding = True
                self.held_status = status
                self.held_headers = headers
                return
            headers = pipeline.on_response(self.exchange, status, headers)
            await self.out({**message, "headers": headers})
            return
        if not self.holding or kind != "http.response.body":
            await self.out(message)
            return
        chunk = message_dict.get("body", b"")
        self.held_size += len(chunk)
        if self.held_size > self.pipeline.max_filter_bytes:
            raise BadGateway("response-too-large-to-filter")
        self.held.append(chunk)
        if not message_dict.get("more_body", False):
            self.status = await self.send_held(b"".join(self.held))

    async def send_held(self, body: bytes) -> int:
        """Send a held response: a 5xx masked, or a body as the plan says (cut to its
        declared shape, checked against its schema, or refused); the status sent."""
        pipeline = self.pipeline
        exchange = self.exchange
        status = self.held_status
        plan = self.held_plan
        if status >= 500 and pipeline.mask_errors:
            code, headers, body = pipeline.mask_upstream_error(exchange, status, body)
        else:
            try:
                if plan is not None:
                    body = pipeline.filter_body(exchange, plan, body)
            except Problem as problem:
                code, headers, body = pipeline.problem_response(exchange, problem)
            else:
                code = status
                headers = [(n, v) for n, v in self.held_headers if n != b"content-length"]
                headers.append((b"content-length", b"%d" % len(body)))
                headers = pipeline.on_response(exchange, status, headers)
        await self.out({"type": "http.response.start", "status": code, "headers": headers})
        await self.out({"type": "http.response.body", "body": body})
        return code
