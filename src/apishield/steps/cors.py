"""CORS: a strict allow-list, answered by the gateway (checklist C3).

Preflights (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) never reach the
upstream: the gateway answers 204 when the origin, the method (which must also be
declared for the path in the contract) and every requested header are allowed, and 403
otherwise. On other requests from an allowed origin the CORS response headers are added;
from any other origin none are (the browser then keeps the response from the page).
Whatever `Access-Control-*` headers the upstream sends are dropped: with CORS configured,
the gateway's list is the only one (an upstream answering `*` would undo it).
"""

from __future__ import annotations

from apishield.config import Cors
from apishield.contract.paths import normalize_path
from apishield.contract.router import Router
from apishield.exchange import Exchange, Headers
from apishield.problems import CorsRefused, PreflightAccepted


class CorsStep:
    name = "cors"

    def __init__(self, config: Cors, router: Router) -> None:
        self.router = router
        self.any_origin = "*" in config.allow_origins
        self.origins = frozenset(o.encode() for o in config.allow_origins if o != "*")
        self.methods = frozenset(m.upper() for m in config.allow_methods)
        self.allowed_headers = frozenset(h.lower() for h in config.allow_headers)
        self.credentials = config.allow_credentials
        self.preflight_headers: Headers = [
            (b"access-control-allow-headers", ", ".join(sorted(self.allowed_headers)).encode()),
            (b"access-control-max-age", str(config.max_age).encode()),
        ]
        self.common: Headers = [(b"vary", b"Origin")]
        if config.allow_credentials:
            self.common.append((b"access-control-allow-credentials", b"true"))
        if config.expose_headers:
            self.common.append((b"access-control-expose-headers",
                                ", ".join(config.expose_headers).encode()))

    def _allowed(self, origin: bytes | None) -> bool:
        return origin is not None and (self.any_origin or origin in self.origins)

    def _allow_origin(self, origin: bytes) -> bytes:
        return b"*" if self.any_origin and not self.credentials else origin

    def on_head(self, exchange: Exchange) -> None:
        request = exchange
        if request.method != "OPTIONS":
            return
        requested = request.header(b"access-control-request-method")
        origin = request.header(b"origin")
        if requested is None or origin is None:
            return  # a plain OPTIONS: the contract decides
        method = requested.decode("latin-1").strip().upper()
        found = self.router.match(normalize_path(request.raw_path))
        declared = found is not None and method in found[0].operations
        wanted = request.header(b"access-control-request-headers") or b""
        names = {h.strip().lower() for h in wanted.decode("latin-1").split(",") if h.strip()}
        if not (self._allowed(origin) and method in self.methods and declared
                and names <= self.allowed_headers):
            raise CorsRefused("cors-preflight-refused")
        if found is not None:
            exchange.entry = found[0]
        raise PreflightAccepted("cors-preflight", headers=[
            (b"access-control-allow-origin", self._allow_origin(origin)),
            (b"access-control-allow-methods", method.encode()),
            *self.preflight_headers,
        ])

    def on_response(self, exchange: Exchange, status: int, headers: Headers) -> Headers:
        if isinstance(exchange.problem, PreflightAccepted):
            out = headers  # the gateway's own preflight answer
        else:
            out = [h for h in headers if not h[0].startswith(b"access-control-")]
        origin = exchange.header(b"origin")
        if self._allowed(origin):
            assert origin is not None
            if not any(name == b"access-control-allow-origin" for name, _ in out):
                out.append((b"access-control-allow-origin", self._allow_origin(origin)))
            out.extend(self.common)
        return out


def build(config: Cors | None, router: Router) -> CorsStep | None:
    return CorsStep(config, router) if config is not None else None
