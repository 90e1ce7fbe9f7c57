"""Large response bodies are cut to their schema in a worker process, not on the loop.

Cutting a 4 MiB JSON list costs ~150 ms of CPU (bench/RESULTS.md, issue 11): ~70 ms of it
in `orjson.loads`, which holds the GIL the whole time. On the event loop that stalls every
other client; in a thread it still takes the GIL from the loop in 70 ms slices (the
soak's non-reading-filtered phase: 60% of normal requests answered). One worker process
(spawned, so nothing of the running loop is inherited) does the CPU work with its own
interpreter; the gateway only copies bytes in and out. It starts on the first large body,
so a gateway that never filters one never pays for it; one worker bounds the CPU and
memory a burst of large filtered responses can take.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from apishield.contract.shapes import Shape
from apishield.steps.response_filter import cut_json

logger = logging.getLogger("apishield")


class Cutter:
    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    async def cut(self, body: bytes, shape: Shape | None) -> tuple[bytes | None] | None:
        """`(cut_json(body, shape),)` computed in the worker, or None when it could not be
        (not JSON, or the worker died): the caller then cuts in place, which reports the
        failure exactly as for a small body."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        loop = asyncio.get_running_loop()
        try:
            return (await loop.run_in_executor(self._pool, cut_json, body, shape),)
        except ValueError:
            return None
        except BrokenProcessPool:
            logger.warning("response cutter process died; cutting in the gateway process "
                           "and starting a new one for the next large response")
            self._pool = None
            return None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
