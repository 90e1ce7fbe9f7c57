"""The standalone gateway: listener + pipeline + upstream pool, and its lifecycle.

Forwarding rules (RFC 9110 7.6, RFC 9112):
- hop-by-hop headers (`Connection` and the fields it names, `Keep-Alive`, `TE`, `Trailer`,
  `Transfer-Encoding`, `Upgrade`, `Proxy-*`) are removed in both directions;
- `X-Forwarded-For/Proto/Host` are set from what the gateway saw; client-sent copies,
  `Forwarded` and `X-Real-Ip` are dropped unless the peer is a trusted proxy;
- the client's `X-Request-Id` is replaced by the gateway's, and headers in the identity
  namespace (`X-Apishield-*`) are always stripped: only the gateway may assert identity;
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

from apishield.config import Config
from apishield.contract import Contract, load_contract
from apishield.deadlines import Sweeper
from apishield.exchange import Exchange, Headers
from apishield.pipeline import Pipeline
from apishield.server import HttpConnection
from apishield.upstream import (
    Ready,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    problem_for,
)

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
    def __init__(self, config: Config, contract: Contract, *, tls: bool = False) -> None:
        assert config.upstream is not None
        self.config = config
        self.contract = contract
        self.pipeline = Pipeline(config, contract, tls=tls)
        self.connections: set[HttpConnection] = set()
        upstream = urlsplit(config.upstream.url)
        self.upstream_host = upstream.hostname or ""
        self.upstream_tls = upstream.scheme == "https"
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
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]

    def start_pool(self) -> None:
        self.loop = asyncio.get_running_loop()
        upstream = self.config.upstream
        assert upstream is not None
        self.pool = UpstreamPool(
            self.upstream_host,
            self.upstream_port,
            tls=ssl.create_default_context() if self.upstream_tls else None,
            connect_timeout=upstream.connect_timeout,
            read_timeout=upstream.read_timeout,
            max_connections=upstream.max_connections,
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
        response = await self.pool.request(payload, exchange.request.method)
        return self.reply_from(response)

    async def forward_streaming(
        self, exchange: Exchange, framing: tuple[bytes, bytes],
        connected: Callable[[UpstreamConnection], None],
    ) -> Reply:
        """Send the head now and let the front end write the body as it arrives
        (`connected` is called with the connection before the response is awaited).
        Not retried: the body cannot be replayed."""
        assert self.pool is not None
        conn = await self.pool.acquire()
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
        conn = self.pool.take_idle()
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
        if self.pool is not None:
            self.pool.close()
        self.pipeline.close()


def build_gateway(config: Config, *, tls: bool = False) -> Gateway:
    """Load and compile everything (raises ConfigError listing every problem)."""
    contract = load_contract(config)
    return Gateway(config, contract, tls=tls)


async def serve(
    gateway: Gateway,
    host: str,
    port: int,
    *,
    ready: asyncio.Future[tuple[str, int]] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop`), then drain in-flight requests and close."""
    loop = asyncio.get_running_loop()
    gateway.start_pool()
    pool = gateway.pool
    assert pool is not None
    sweeper = Sweeper(lambda: [*gateway.connections, *pool.busy])
    server = await loop.create_server(
        lambda: HttpConnection(gateway), host, port, backlog=2048, reuse_address=True
    )
    address = server.sockets[0].getsockname()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    logger.info("listening on http://%s:%d", address[0], address[1])
    if ready is not None:
        ready.set_result((address[0], address[1]))
    try:
        await stop.wait()
    finally:
        logger.info("shutting down: no new connections, finishing in-flight requests")
        server.close()
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
        logger.info("stopped")
