"""`apishield serve --workers N`: one supervisor process, N gateway worker processes.

The supervisor binds the listening sockets once (the public listener; the plain-HTTP
listener beside TLS; the admin listener) and starts N workers, each
`python -m apishield serve ... --worker-spec JSON` with the sockets passed as inherited
descriptors (`pass_fds`): a fresh interpreter, never a fork of a process that has
threads. Every worker runs the ordinary gateway (`gateway.serve`) on the inherited
sockets; the kernel hands each accepted connection to one of the workers blocked in
accept() on the shared socket. Only worker 0 gets the admin socket, so the admin API is
never bound twice; its `/metrics`, `/usage` and dashboard add up every worker's figures,
which the supervisor gathers for it (`observe/figures_channel.py`).

Shared limits: the supervisor runs the lease server (`state/local_leases.py`) on a Unix
socket in a private directory; each worker's counters lease from it, so a limit of
100/min is 100/min for the whole gateway, within N * L tokens (the bound in
`state/redis_counters.py` with G = N). Bans, API-key revocations and config reloads need
nothing from the supervisor: every worker polls the shared SQLite state once a second.

Life of the workers: a worker that exits while the supervisor is not stopping is logged
(`worker-exit`) and started again with the same index, after a back-off that doubles
with each restart in the last `RESTART_WINDOW` seconds; more than `RESTART_LIMIT` of them
in that window is a crash loop: the supervisor stops the others and exits 1 with a clear
message. SIGTERM, SIGINT and SIGQUIT are forwarded to every worker, which drains as a
lone gateway does; the supervisor exits once all have, or SIGKILLs what is left after
`timeouts.shutdown` plus `STOP_GRACE`. SIGHUP is forwarded: each worker reloads its config
and contract. A worker whose supervisor is gone (SIGKILL) stops by itself within a second.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from apishield.config import Config, worker_role
from apishield.gateway import Gateway, InheritedSockets, ReloadResult, serve
from apishield.observe.figures_channel import FiguresHub, FiguresLink
from apishield.observe.logjson import fields
from apishield.observe.metrics import METRICS
from apishield.state.local_leases import LeaseServer

logger = logging.getLogger("apishield")

RESTART_LIMIT = 5  # restarts within RESTART_WINDOW before the supervisor gives up
RESTART_WINDOW = 30.0  # seconds
BACKOFF_FIRST = 0.1  # seconds before the first restart; doubles per recent restart
BACKOFF_MAX = 2.0
STOP_GRACE = 5.0  # seconds past timeouts.shutdown before a worker is killed
ORPHAN_CHECK = 1.0  # seconds between a worker's checks that its supervisor lives
STOPPING_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker is told on its command line (`--worker-spec`, JSON)."""

    index: int
    lease_socket: str
    supervisor_pid: int
    public_fd: int
    plain_fd: int | None = None
    admin_fd: int | None = None

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))


@dataclass(slots=True)
class Listeners:
    public: socket.socket
    plain: socket.socket | None = None
    admin: socket.socket | None = None

    def all(self) -> list[socket.socket]:
        return [sock for sock in (self.public, self.plain, self.admin) if sock is not None]

    def close(self) -> None:
        for sock in self.all():
            sock.close()


def bind(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket, bound as `loop.create_server` would bind it (reuse_address),
    on the first address `host` resolves to."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_listeners(gateway: Gateway) -> Listeners:
    """Every listener the workers share, bound now (an error such as a port in use is
    the supervisor's, before any worker starts)."""
    config = gateway.config
    listeners = Listeners(bind(config.listen.host, config.listen.port, 2048))
    try:
        settings = gateway.tls.settings.plain_http if gateway.tls is not None else None
        if settings is not None:
            listeners.plain = bind(config.listen.host, settings.port, 512)
        if config.admin is not None:
            listeners.admin = bind(config.admin.host, config.admin.port, 64)
    except BaseException:
        listeners.close()
        raise
    return listeners


class Supervisor:
    """Starts, watches, restarts and stops the workers; serves their leases."""

    def __init__(self, gateway: Gateway, command: Sequence[str], workers: int,
                 listeners: Listeners) -> None:
        self.gateway = gateway  # compiled to check the config and bind; then closed
        self.config: Config = gateway.config
        self.command = list(command)  # `python -m apishield serve --config ...`
        self.workers = workers
        self.listeners = listeners
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self._recent: collections.deque[float] = collections.deque()
        self._stopping = asyncio.Event()
        self._gave_up = False
        self.folder = tempfile.mkdtemp(prefix="apishield-workers-")  # 0700
        self.lease_socket = Path(self.folder) / "leases.sock"
        self.leases = LeaseServer()
        self.figures = FiguresHub()

    def spec(self, index: int) -> WorkerSpec:
        listeners = self.listeners
        return WorkerSpec(
            index=index, lease_socket=str(self.lease_socket), supervisor_pid=os.getpid(),
            public_fd=listeners.public.fileno(),
            plain_fd=listeners.plain.fileno() if listeners.plain is not None else None,
            admin_fd=(listeners.admin.fileno() if listeners.admin is not None and index == 0
                      else None))

    async def start_worker(self, index: int) -> None:
        spec = self.spec(index)
        fds = [fd for fd in (spec.public_fd, spec.plain_fd, spec.admin_fd) if fd is not None]
        process = await asyncio.create_subprocess_exec(
            *self.command, "--worker-spec", spec.dumps(), pass_fds=fds,
            stdin=asyncio.subprocess.DEVNULL)
        self.processes[index] = process
        logger.info("worker %d started (pid %d)", index, process.pid, extra=fields(
            "lifecycle", event="worker-start", worker=index, pid=process.pid))

    async def watch(self, index: int) -> None:
        """Wait for worker `index` to exit; start it again unless stopping (or give up)."""
        while True:
            process = self.processes[index]
            code = await process.wait()
            if self._stopping.is_set():
                return
            now = time.monotonic()
            while self._recent and now - self._recent[0] > RESTART_WINDOW:
                self._recent.popleft()
            crash_loop = len(self._recent) >= RESTART_LIMIT
            logger.warning(
                "worker %d (pid %d) exited with %s: %s", index, process.pid, _exit(code),
                "too many restarts, giving up" if crash_loop else "starting it again",
                extra=fields("lifecycle", event="worker-exit", worker=index, pid=process.pid,
                             exit_code=code, restarts=self.restarts,
                             action="none" if crash_loop else "restart"))
            if crash_loop:
                self._gave_up = True
                logger.error(
                    "workers crash-looping: %d restarts in %.0f s (limit %d); stopping the "
                    "gateway. The workers' own lines above say why they exited (a config "
                    "or contract changed on disk since the start? run `apishield check`)",
                    len(self._recent) + 1, RESTART_WINDOW, RESTART_LIMIT, extra=fields(
                        "lifecycle", event="crash-loop", restarts=self.restarts,
                        limit=RESTART_LIMIT))
                self._stopping.set()
                return
            self._recent.append(now)
            self.restarts += 1
            self._publish()
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (len(self._recent) - 1))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return
            try:
                await self.start_worker(index)
            except OSError as exc:  # no process (EAGAIN, ENOMEM): counts as one that died
                logger.error("worker %d could not be started: %s", index, exc, extra=fields(
                    "lifecycle", event="worker-exit", worker=index, action="restart"))

    def _publish(self) -> None:
        """The restart count, for the workers' metrics (`restarts_file`), replaced whole."""
        path = restarts_file(self.lease_socket)
        temporary = path.with_suffix(".tmp")
        with contextlib.suppress(OSError):  # a metric is not worth a restart missed
            temporary.write_text(str(self.restarts))
            temporary.replace(path)

    def forward(self, sig: signal.Signals) -> None:
        for process in self.processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)

    async def run(self) -> int:
        """Serve until a stopping signal (0) or a crash loop (1)."""
        loop = asyncio.get_running_loop()
        await self.gateway.close()  # files it opened (access log, audit trail) are the workers'
        await self.leases.start(self.lease_socket)
        await self.figures.start(figures_socket(self.lease_socket))
        handled: list[signal.Signals] = []

        def stopping(sig: signal.Signals) -> None:
            if not self._stopping.is_set():
                logger.info("%s received: stopping %d workers", sig.name, self.workers,
                            extra=fields("lifecycle", event="signal", signal=sig.name,
                                         action="stop"))
            self._stopping.set()

        def reload(sig: signal.Signals) -> None:
            logger.info("SIGHUP received: forwarded to every worker (each reloads)",
                        extra=fields("lifecycle", event="signal", signal=sig.name,
                                     action="reload"))
            self.forward(sig)

        for name in (*STOPPING_SIGNALS, "SIGHUP", "SIGUSR1", "SIGUSR2"):
            sig = getattr(signal, name)
            action = (stopping if name in STOPPING_SIGNALS else reload if name == "SIGHUP"
                      else _ignored)
            loop.add_signal_handler(sig, action, sig)
            handled.append(sig)
        address = self.listeners.public.getsockname()
        logger.info("supervisor (pid %d) listening on %s:%d with %d workers", os.getpid(),
                    address[0], address[1], self.workers, extra=fields(
                        "lifecycle", event="start", listener="supervisor", host=address[0],
                        port=address[1], workers=self.workers, pid=os.getpid()))
        watchers: list[asyncio.Task[None]] = []
        try:
            for index in range(self.workers):
                await self.start_worker(index)
                watchers.append(loop.create_task(self.watch(index)))
            await self._stopping.wait()
        finally:
            await self._stop_all(watchers)
            for sig in handled:
                loop.remove_signal_handler(sig)
        return 1 if self._gave_up else 0

    async def _stop_all(self, watchers: list[asyncio.Task[None]]) -> None:
        self._stopping.set()
        reason = "crash-loop" if self._gave_up else "requested"
        logger.info("shutting down: every worker drains its in-flight requests",
                    extra=fields("lifecycle", event="stopping", reason=reason))
        self.forward(signal.SIGTERM)
        live = [process for process in self.processes.values() if process.returncode is None]
        deadline = self.config.timeouts.shutdown + STOP_GRACE
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in live)), deadline)
        except TimeoutError:
            for process in live:
                if process.returncode is None:
                    logger.warning("worker (pid %d) still running %.0f s after SIGTERM: "
                                   "killed", process.pid, deadline, extra=fields(
                                       "lifecycle", event="worker-exit", pid=process.pid,
                                       action="kill"))
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            await asyncio.gather(*(p.wait() for p in live))
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await self.leases.close()
        await self.figures.close()
        self.listeners.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        logger.info("stopped", extra=fields("lifecycle", event="stop", reason=reason))


def restarts_file(lease_socket: Path) -> Path:
    """Where the supervisor keeps its restart count: beside the lease socket, in the
    private folder (a file read once a second is all a worker needs for a metric)."""
    return lease_socket.parent / "restarts"


def figures_socket(lease_socket: Path) -> Path:
    """Where the supervisor gathers the workers' figures for worker 0's admin API: beside
    the lease socket, in the private folder."""
    return lease_socket.parent / "figures.sock"


def _ignored(sig: signal.Signals) -> None:
    logger.info("%s received: ignored", sig.name, extra=fields(
        "lifecycle", event="signal", signal=sig.name, action="ignored"))


def _exit(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"code {code}"


def supervise(gateway: Gateway, command: Sequence[str], workers: int) -> int:
    """Bind the listeners, run the supervisor until it stops; its exit code."""
    listeners = bind_listeners(gateway)
    supervisor = Supervisor(gateway, command, workers, listeners)
    try:
        return asyncio.run(supervisor.run())
    finally:
        listeners.close()
        shutil.rmtree(supervisor.folder, ignore_errors=True)


# ---------------------------------------------------------------- the worker's side
def inherited(spec: WorkerSpec) -> InheritedSockets:
    def adopt(fd: int | None) -> socket.socket | None:
        return None if fd is None else socket.socket(fileno=fd)

    public = adopt(spec.public_fd)
    assert public is not None
    return InheritedSockets(public, adopt(spec.plain_fd), adopt(spec.admin_fd))


def become_worker(spec: WorkerSpec) -> None:
    """Take the worker's role before the gateway is built (its counters and access log
    read it)."""
    worker_role.assume(worker_role.WorkerRole(spec.index, spec.lease_socket))


async def serve_worker(gateway: Gateway, spec: WorkerSpec) -> None:
    """One worker: the gateway on the inherited sockets, until a stopping signal or the
    supervisor is gone."""
    stop = asyncio.Event()
    link = FiguresLink(figures_socket(Path(spec.lease_socket)), spec.index)

    async def orphaned() -> None:
        """Once a second: is the supervisor still there? Also copies its restart count
        into this worker's metrics, and connects the figures channel if it is not (the
        supervisor asks every worker for its figures when worker 0 needs them)."""
        counted = restarts_file(Path(spec.lease_socket))
        while os.getppid() == spec.supervisor_pid:
            with contextlib.suppress(OSError, ValueError):
                METRICS.worker_restarts = int(counted.read_text())
            if not link.connected:
                with contextlib.suppress(OSError, TimeoutError):
                    await link.connect()
            await asyncio.sleep(ORPHAN_CHECK)
        logger.warning("worker %d: the supervisor (pid %d) is gone: stopping", spec.index,
                       spec.supervisor_pid, extra=fields(
                           "lifecycle", event="stopping", reason="orphaned"))
        stop.set()

    def reload_everyone(result: ReloadResult) -> None:
        """`POST /reload` reached worker 0 (the admin listener's): the others reload too,
        through the supervisor (which forwards SIGHUP to all; this worker finds its files
        unchanged)."""
        if result.outcome == "succeeded":
            with contextlib.suppress(ProcessLookupError):
                os.kill(spec.supervisor_pid, signal.SIGHUP)

    gateway.after_admin_reload = reload_everyone
    if spec.admin_fd is not None:  # worker 0: its admin API shows every worker's figures
        gateway.figures = link.gather
    try:
        await link.connect()  # before serving: the first scrape finds every worker
    except (OSError, TimeoutError) as exc:  # tried again once a second (orphaned)
        logger.warning("worker %d: the figures channel is not connected yet (%s)",
                       spec.index, exc, extra=fields("lifecycle", event="figures-late",
                                                     reason="connect"))
    watch = asyncio.get_running_loop().create_task(orphaned())
    try:
        listen = gateway.config.listen
        await serve(gateway, listen.host, listen.port, stop=stop, sockets=inherited(spec))
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        link.close()


def worker_command(config: str, host: str | None, port: int | None) -> list[str]:
    """The command a worker runs: this interpreter, `-m apishield serve`, the options the
    supervisor got (minus `--workers`); the CLI adds `--worker-spec`."""
    return [sys.executable, "-m", "apishield", "serve", "--config", config,
            *(["--host", host] if host is not None else []),
            *(["--port", str(port)] if port is not None else [])]
