"""What this process is when `apishield serve --workers N` started it: one of N workers.

Set once, by the CLI, before the gateway is built (`assume`); read where a worker must
act differently from a lone gateway: the counters lease from the supervisor
(`state.open.open_counters`) and access-log lines say which worker wrote them. A lone
gateway, the middleware and every CLI command never set it (`current()` is None), so
their behaviour is unchanged. It lives in `config` because both `state` and `observe`
read it and nothing above them may be imported there; `usable_cores()`, the default
number of workers, beside it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkerRole:
    index: int  # 0..N-1; worker 0 also serves the admin listener
    lease_socket: str  # the supervisor's lease server (a Unix socket path)


_role: WorkerRole | None = None


def current() -> WorkerRole | None:
    return _role


def assume(role: WorkerRole | None) -> None:
    """Become `role` (None: a lone gateway again, for tests that serve in-process)."""
    global _role
    _role = role


def usable_cores() -> int:
    """How many workers `apishield serve` runs by default: the cores this process may run
    on (`sched_getaffinity`: a `taskset` or a cpuset narrows it), or every core where
    that call is missing (macOS). 1 means a lone gateway, no supervisor. A container's
    CPU quota (`docker --cpus`) is not an affinity: set `--workers` there."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        with contextlib.suppress(OSError):
            return max(1, len(affinity(0)))
    return max(1, os.cpu_count() or 1)
