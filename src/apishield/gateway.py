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
import logging
import signal
import ssl
from collections.abc import Callable
from functools import lru_cache
from urllib.parse import urlsplit

from apishield.auth.identity import identity_headers
from apishield.config import Config, ConfigError
from apishield.contract.loader import Contract, load_contract
from apishield.exchange import Exchange, Headers
from apishield.http.deadlines import Sweeper
from apishield.http.plain_http import PlainHttpResponder
from apishield.http.server import HttpConnection
from apishield.http.tls import ServerTls, server_tls, upstream_context
from apishield.http.upstream import (
    Ready,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    problem_for,
)
from apishield.observe.logjson import fields
from apishield.pipeline import Pipeline
from apishield.steps.response_cutter import Cutter

logger = logging.getLogger("apishield")

HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
    }
)
# Replaced by the gateway on the way to the upstream.
REQUEST_OWNED = HOP_BY_HOP | {
    b"host", b"content-length", b"expect", b"x-request-id",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip",
}
RESPONSE_DROPPED = HOP_BY_HOP | {b"content-length"}
IDENTITY_PREFIX = b"x-apishield-"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@lru_cache(maxsize=256)
def _response_dropped(tokens: frozenset[bytes]) -> frozenset[bytes]:
    return RESPONSE_DROPPED | tokens


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
    ) -> None:
        """`tls`: the listener terminates TLS (and the pipeline sends HSTS); `upstream_tls`:
        the client context for an https upstream (default: the system's, verified)."""
        assert config.upstream is not None
        self.config = config
        self.contract = contract
        self.tls = tls
        self.pipeline = Pipeline(config, contract, tls=tls is not None)
        self.connections: set[HttpConnection] = set()
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
        self.pool: UpstreamPool | None = None
        # responses held whole to be filtered, all connections (HttpConnection._reserve_buffer)
        self.buffered_bytes = 0
        self.max_buffered_bytes = config.responses.max_buffered_bytes
        self.cutter = Cutter()
        # set by start_pool(), which serve() calls before any connection is accepted
        self.loop: asyncio.AbstractEventLoop

    def start_pool(self) -> None:
        self.loop = asyncio.get_running_loop()
        upstream = self.config.upstream
        assert upstream is not None
        self.pool = UpstreamPool(
            self.upstream_host,
            self.upstream_port,
            tls=self.upstream_context if self.upstream_tls else None,
            connect_timeout=upstream.connect_timeout,
            read_timeout=upstream.read_timeout,
            max_connections=upstream.max_connections,
            max_per_client=upstream.client_share,
        )

    def serialize_request(
        self, exchange: Exchange, framing: tuple[bytes, bytes] | None = None
    ) -> bytes:
        """The request for the upstream. With `framing` (a streamed body), only the head,
        carrying that framing header; else head and the whole body."""
        request = exchange.request
        target = self.upstream_prefix + request.raw_path
        if request.query:
            target += b"?" + request.query
        headers = request.headers
        dropped = REQUEST_OWNED
        if request.connection_tokens:
            dropped = dropped | request.connection_tokens
        if self.pipeline.filters_operation(exchange):
            # its JSON responses are filtered: ask for them unencoded (identity)
            dropped = dropped | {b"accept-encoding"}
        client_host = b""
        forwarded_proto = request.scheme.encode()
        forwarded_host = b""
        kept: Headers = []
        for name, value in headers:
            if b"_" in name:
                # WSGI/CGI backends read `X_Forwarded_For` as `X-Forwarded-For`: an
                # underscore twin of a header the gateway owns is a spoofing attempt.
                dashed = name.replace(b"_", b"-")
                if dashed in REQUEST_OWNED or dashed.startswith(IDENTITY_PREFIX):
                    continue
            if name in dropped or name.startswith(IDENTITY_PREFIX):
                if name == b"host":
                    client_host = value
                elif exchange.trusted_peer:
                    if name == b"x-forwarded-proto":
                        forwarded_proto = value
                    elif name == b"x-forwarded-host":
                        forwarded_host = value
                continue
            kept.append((name, value))
        host = self.upstream_host_header
        if self.preserve_host and client_host:
            host = client_host
        kept.append((b"host", host))
        kept.append((b"x-forwarded-for", exchange.forwarded_for.encode()))
        kept.append((b"x-forwarded-proto", forwarded_proto))
        if forwarded_host or client_host:
            kept.append((b"x-forwarded-host", forwarded_host or client_host))
        kept.append((b"x-request-id", exchange.id.encode()))
        if request.client_identity:  # after the filter above dropped any client-sent copy
            kept.extend(request.client_identity)
        if exchange.principal is not None:
            kept.extend(identity_headers(exchange.principal))
        body = request.body
        if framing is not None:
            kept.append(framing)
        elif body or request.method in BODY_METHODS:
            kept.append((b"content-length", b"%d" % len(body)))
        return b"%b %b HTTP/1.1\r\n%b\r\n\r\n%b" % (
            request.method.encode(), target, b"\r\n".join([b": ".join(h) for h in kept]), body
        )

    async def forward(self, exchange: Exchange) -> Reply:
        assert self.pool is not None
        payload = self.serialize_request(exchange)
        response = await self.pool.request(payload, exchange.request.method,
                                           exchange.client_ip)
        return self.reply_from(response)

    async def forward_streaming(
        self, exchange: Exchange, framing: tuple[bytes, bytes],
        connected: Callable[[UpstreamConnection], None],
    ) -> Reply:
        """Send the head now and let the front end write the body as it arrives
        (`connected` is called with the connection before the response is awaited).
        Not retried: the body cannot be replayed."""
        assert self.pool is not None
        conn = await self.pool.acquire(exchange.client_ip)
        head = self.serialize_request(exchange, framing)
        try:
            conn.start(head, head_only=False)
            connected(conn)
            response = await conn.response()
        except UpstreamError as exc:
            conn._close()
            self.pool.forget(conn)
            raise problem_for(exc) from None
        return self.reply_from(response)

    def forward_nowait(self, exchange: Exchange, on_ready: Ready) -> bool:
        """Send on a pooled connection in callback mode; False if none is idle."""
        assert self.pool is not None
        conn = self.pool.take_idle(exchange.client_ip)
        if conn is None:
            return False
        conn.send_nowait(
            self.serialize_request(exchange),
            head_only=exchange.request.method == "HEAD",
            on_ready=on_ready,
        )
        return True

    def reply_from(self, response: UpstreamResponse) -> Reply:
        """Drop hop-by-hop response headers; give the connection back if the body is in."""
        raw = response.headers
        dropped = RESPONSE_DROPPED
        if response.connection_tokens:
            dropped = _response_dropped(response.connection_tokens)
        headers = [item for item in raw if item[0] not in dropped]
        if response.complete:
            response.release()
            return Reply(response.status, headers, response.body, None, response.content_length)
        return Reply(response.status, headers, response.body, response, response.content_length)

    async def close(self) -> None:
        self.cutter.close()
        if self.pool is not None:
            self.pool.close()
        await self.pipeline.stop()
        self.pipeline.close()


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
    if problems or contract is None:
        raise ConfigError(problems)
    return Gateway(config, contract, tls=listener_tls, upstream_tls=client_tls)


# Signals whose default action would end the process: each is handled, so none can stop
# the gateway without a log line and a flushed access log (issue 11: SIGHUP killed a
# plain-HTTP gateway silently).
STOPPING_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT")
IGNORED_SIGNALS = ("SIGUSR1", "SIGUSR2")


def _handle_signals(
    loop: asyncio.AbstractEventLoop, stop: asyncio.Event, tls: ServerTls | None
) -> list[signal.Signals]:
    """Install the process's signal handlers; return those installed (none when not on
    the main thread, as in tests that serve in a thread, or on Windows)."""

    def stopping(name: str) -> None:
        if not stop.is_set():
            logger.info("%s received: shutting down", name, extra=fields(
                "lifecycle", event="signal", signal=name, action="stop"))
        stop.set()

    def reload() -> None:
        done = "no TLS listener to reload"
        if tls is not None:  # tls.reload logs what it loaded, or why it kept the old chain
            done = "TLS certificate reloaded" if tls.reload("SIGHUP") else "TLS certificate kept"
        logger.info("SIGHUP: %s; other settings are read at start only (restart to "
                    "change them)", done, extra=fields(
                        "lifecycle", event="reload", signal="SIGHUP", result=done))

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


async def serve(
    gateway: Gateway,
    host: str,
    port: int,
    *,
    ready: asyncio.Future[tuple[str, int]] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT/SIGQUIT (or `stop`), then drain in-flight requests, flush
    the access log and close. SIGHUP never stops it (see `_handle_signals`).

    With `tls`, the listener speaks HTTPS only; SIGHUP and a change of the certificate
    files reload the chain in place; `tls.plain_http` adds a listener that redirects or
    refuses (it never forwards)."""
    loop = asyncio.get_running_loop()
    gateway.start_pool()
    await gateway.pipeline.start()
    pool = gateway.pool
    assert pool is not None
    sweeper = Sweeper(lambda: [*gateway.connections, *pool.busy])
    tls = gateway.tls
    if tls is None:
        server = await loop.create_server(
            lambda: HttpConnection(gateway), host, port, backlog=2048, reuse_address=True
        )
    else:
        server = await loop.create_server(
            lambda: HttpConnection(gateway, scheme="https"), host, port, backlog=2048,
            reuse_address=True, ssl=tls.context,
            # the handshake is part of the request head's time budget (slowloris, D3)
            ssl_handshake_timeout=gateway.config.timeouts.header,
        )
    address = server.sockets[0].getsockname()
    plain: asyncio.Server | None = None
    responder: PlainHttpResponder | None = None
    if tls is not None and tls.settings.plain_http is not None:
        settings = tls.settings.plain_http
        responder = PlainHttpResponder(
            gateway, settings.mode, settings.redirect_port or address[1]
        )
        try:
            plain = await loop.create_server(
                responder.protocol, host, settings.port, backlog=512, reuse_address=True
            )
        except OSError:
            server.close()
            raise
    stop = stop or asyncio.Event()
    handled = _handle_signals(loop, stop, tls)
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
        plain_address = plain.sockets[0].getsockname()
        logger.info("plain http on http://%s:%d: %s", plain_address[0], plain_address[1],
                    "redirected to https" if responder.mode == "redirect" else "refused",
                    extra=fields("lifecycle", event="start", listener="plain_http",
                                 host=plain_address[0], port=plain_address[1],
                                 plain_http=responder.mode))
    if ready is not None:
        ready.set_result((address[0], address[1]))
    try:
        await stop.wait()
    finally:
        logger.info("shutting down: no new connections, finishing in-flight requests",
                    extra=fields("lifecycle", event="stopping",
                                 reason="requested" if stop.is_set() else "cancelled"))
        server.close()
        if plain is not None and responder is not None:
            plain.close()
            responder.close()
        if watcher is not None:
            watcher.cancel()
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
