"""In-flight caps (checklist D4, B4): throttling besides rejection.

`max_in_flight` bounds the requests this gateway forwards at once (503 past it: the
service, not the client, is the limit), `per_identity` the requests one caller has in
flight (429: a client that opens a hundred slow requests cannot starve the others). With
`queue_timeout` a request over a cap waits up to that long for a slot (first come, first
served) instead of being refused at once.

A slot is taken in the head phase and given back by the pipeline's `record`, which every
front end calls exactly once per request, refused, failed or complete. Caps are per
gateway process (a shared in-flight count would cost a store round trip per request and
per response; rate limits are the shared control).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from apishield.config import Concurrency
from apishield.exchange import Exchange, Suspend
from apishield.problems import ServiceUnavailable, TooManyRequests

_GLOBAL = "*"


class ConcurrencyStep:
    name = "concurrency"

    def __init__(self, settings: Concurrency) -> None:
        self.max_in_flight = settings.max_in_flight
        self.per_identity = settings.per_identity
        self.queue_timeout = settings.queue_timeout
        self.in_flight = 0
        self.by_identity: dict[str, int] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()

    @staticmethod
    def identity(exchange: Exchange) -> str:
        principal = exchange.principal
        if principal is None:
            return "ip=" + exchange.client_ip
        return "key=" + principal.key_id if principal.key_id else "sub=" + principal.subject

    def _full(self, identity: str) -> str | None:
        if self.max_in_flight and self.in_flight >= self.max_in_flight:
            return "global"
        if self.per_identity and self.by_identity.get(identity, 0) >= self.per_identity:
            return "identity"
        return None

    def on_head(self, exchange: Exchange) -> None:
        identity = self.identity(exchange)
        full = self._full(identity)
        if full is not None:
            if self.queue_timeout > 0 and exchange.waited_for is not self:
                raise Suspend(self._wait, owner=self)
            if full == "global":
                raise ServiceUnavailable("concurrency-global",
                                         headers=[(b"retry-after", b"1")])
            raise TooManyRequests("concurrency-identity", headers=[(b"retry-after", b"1")])
        self.in_flight += 1
        if self.per_identity:
            self.by_identity[identity] = self.by_identity.get(identity, 0) + 1
            exchange.held = (identity,)
        else:
            exchange.held = (_GLOBAL,)

    async def _wait(self) -> None:
        """Wait for any slot to be released (or the timeout); the rerun decides."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, self.queue_timeout)
        except TimeoutError:
            pass
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def release(self, exchange: Exchange) -> None:
        held = exchange.held
        if not held:
            return
        exchange.held = ()
        self.in_flight -= 1
        identity = held[0]
        if identity != _GLOBAL:
            left = self.by_identity.get(identity, 1) - 1
            if left > 0:
                self.by_identity[identity] = left
            else:
                self.by_identity.pop(identity, None)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break


def build(settings: Concurrency) -> ConcurrencyStep | None:
    if not (settings.max_in_flight or settings.per_identity):
        return None
    return ConcurrencyStep(settings)
