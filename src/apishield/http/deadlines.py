"""Coarse deadlines checked by one periodic sweep, instead of a timer per request.

Every request used to arm and cancel four event-loop timers (header, body, idle,
upstream read). In place, under load, those cost about a fifth of the gateway's time
(bench/RESULTS.md). A timeout here only has to bound how long a slow client or upstream
can hold resources, so precision of one tick (250 ms) is plenty: each connection stores
a deadline (a float) and a callback, and one sweep per tick fires the expired ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

TICK = 0.25


class HasDeadline:
    """Mixin: `expire_at(delay, callback)` / `clear_deadline()`; the sweep calls back."""

    deadline: float = 0.0
    on_deadline: Callable[[], None] | None = None
    loop: asyncio.AbstractEventLoop

    def expire_at(self, delay: float, callback: Callable[[], None]) -> None:
        self.deadline = self.loop.time() + delay
        self.on_deadline = callback

    def clear_deadline(self) -> None:
        self.deadline = 0.0


class Sweeper:
    """Calls the callback of every expired deadline among `sources()`, every TICK."""

    def __init__(self, sources: Callable[[], Iterable[HasDeadline]]) -> None:
        self.sources = sources
        self.loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = self.loop.call_later(TICK, self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        expired = [item for item in self.sources() if 0.0 < item.deadline <= now]
        for item in expired:
            callback = item.on_deadline
            item.deadline = 0.0
            if callback is not None:
                callback()
        self._handle = self.loop.call_later(TICK, self._sweep)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
