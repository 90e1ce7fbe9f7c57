"""Default deny (checklist A7): a path the contract does not declare is 404, a method it
does not declare for the path is 405 with `Allow` (RFC 9110 15.5.6)."""

from __future__ import annotations

from apishield.contract.paths import normalize_path
from apishield.contract.router import Router
from apishield.exchange import Exchange
from apishield.problems import MethodNotAllowed, NotFound


class RouteStep:
    name = "route"

    def __init__(self, router: Router) -> None:
        self.router = router
        # static paths by their raw bytes: the common request skips decoding and matching
        self._static = router.static_targets()

    def on_head(self, exchange: Exchange) -> None:
        request = exchange
        static = self._static.get(request.raw_path)
        if static is not None:
            request.path, entry = static
        else:
            request.path = normalize_path(request.raw_path)
            found = self.router.match(request.path)
            if found is None:
                raise NotFound("route-not-declared")
            entry, params = found
            exchange.path_params = params
        exchange.entry = entry
        operation = entry.operations.get(request.method)
        if operation is None:
            raise MethodNotAllowed("method-not-declared", headers=[(b"allow", entry.allow)])
        exchange.operation = operation
