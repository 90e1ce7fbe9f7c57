"""Writing the usage counts (`usage.DAILY`) into the state store, off the request path.

The pipeline starts one `UsageFlusher` per running pipeline: every `usage.flush_interval`
it takes what was counted and adds it to the store from a worker thread (a SQLite commit
fsyncs, a Redis call waits on the network: neither may block the event loop), and once
more at shutdown. A flush that fails puts back what it could not store, logs one line and
counts `apishield_usage_flush_errors_total`; the next flush retries it. The aggregate is
per process and `take()` is atomic on the event loop, so at a reload the old pipeline's
last flush and the new pipeline's flushes write different counts: none is lost, none is
added twice.

The store is opened on the first flush (in the worker thread), not at start: a gateway
whose state file cannot be created yet (a read-only folder, Redis down) still starts and
serves; the failure is logged and counted like any failed flush, and retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

from apishield.config import Usage as UsageConfig
from apishield.observe.metrics import METRICS
from apishield.observe.usage import DAILY, DailyUsage
from apishield.state.usage import Batch, UsageStore

logger = logging.getLogger("apishield")


class UsageFlusher:
    def __init__(self, open_store: Callable[[], UsageStore], config: UsageConfig,
                 usage: DailyUsage = DAILY) -> None:
        self._open_store = open_store
        self._store: UsageStore | None = None
        self._opening = threading.Lock()
        self.config = config
        self.usage = usage
        self._task: asyncio.Task[None] | None = None
        self._writing: asyncio.Future[bool] | None = None
        self._failing = False

    def start(self) -> None:
        self.usage.max_pairs = self.config.max_pairs  # the config in force bounds the day
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.flush_interval)
            # shielded: a stop() during a write waits for it instead of losing its batch
            self._writing = asyncio.ensure_future(self.flush())
            await asyncio.shield(self._writing)

    def store(self) -> UsageStore:
        """The store, opened on first use; call it from a worker thread."""
        with self._opening:
            if self._store is None:
                self._store = self._open_store()
            return self._store

    def _add(self, batch: Batch) -> None:
        self.store().add(batch, self.config.max_pairs, self.config.retention_days)

    async def flush(self) -> bool:
        """Add what is pending to the store; False (the counts kept) when it failed."""
        batch = self.usage.take()
        if not batch:
            return True
        pairs = len(batch)
        try:
            await asyncio.to_thread(self._add, batch)
        except Exception as exc:
            self.usage.restore(batch)  # what was not stored: retried by the next flush
            METRICS.usage_flush_error()
            logger.warning("usage: could not write %d of %d pending counts to the state "
                           "store, kept for the next flush: %s", len(batch), pairs, exc)
            self._failing = True
            return False
        if self._failing:
            self._failing = False
            logger.info("usage: writing to the state store works again (%d counts "
                           "written)", pairs)
        return True

    async def stop(self) -> None:
        """Stop the timer, let a write in progress finish, then flush what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._writing is not None:
            with contextlib.suppress(Exception):
                await self._writing
            self._writing = None
        await self.flush()
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
            self._store = None
