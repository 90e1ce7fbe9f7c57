"""What this process is when `apishield serve --workers N` started it: one of N workers.

Set once, by the CLI, before the gateway is built (`assume`); read where a worker must
act differently from a lone gateway: the counters lease from the supervisor
(`state.open.open_counters`) and access-log lines say which worker wrote them. A lone
gateway, the middleware and every CLI command never set it (`current()` is None), so
their behaviour is unchanged. It lives in `config` because both `state` and `observe`
read it and nothing above them may be imported there.
"""

from __future__ import annotations

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
