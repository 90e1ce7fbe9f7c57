"""Every worker's figures, added up for worker 0's admin API (`serve --workers N`).

The supervisor runs a `FiguresHub` on a Unix socket beside the lease server's (same
private 0700 folder, the socket 0600, the same framing: 4-byte big-endian length and an
orjson body, `state/local_leases.py`). Each worker keeps one `FiguresLink` connected to
it. When worker 0 needs the figures (a `/metrics` scrape, `/usage`, the dashboard's poll
and its 2 s sampler) it sends its own with a `gather`; the hub asks every other worker
for theirs, waits at most `GATHER_DEADLINE`, and answers the sum.

Why pull at read time rather than workers pushing every second: a scrape right after
the traffic stops is exact (the test sends N requests and reads N), and a worker spends
nothing on figures while nobody looks. Why through the supervisor rather than worker 0
asking the others directly: the supervisor already knows every worker, outlives them
all, and is where the figures of a worker that died are kept.

Counters never go down, as Prometheus requires (and as its multiprocess mode does for
the files of dead pids): the hub keeps the last figures each worker sent, and when a
worker's connection closes (it exited, crashed, was killed) those are added into a
`retired` sum that every later answer includes. What a killed worker counted after its
last report (at most one sampler period, 2 s, while the admin listener runs) is lost;
nothing counted twice. A worker that does not answer within `GATHER_DEADLINE` (a
stalled loop) is not waited for: its last figures stand in for it (stale, never lower)
and the hub logs `figures-late`. If the hub does not answer, worker 0 answers with the
last sum it had (its own figures before the first) and logs why.

Messages (JSON objects): worker -> hub `{"hello": index}` once; hub -> worker
`{"ask": id}`, worker -> hub `{"answer": id, "figures": doc}`; worker 0 -> hub
`{"gather": id, "figures": doc}`, hub -> worker 0 `{"gathered": id, "figures": sum,
"late": [index, ...]}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import orjson

from apishield.observe.figures import Document, View, add, local, take, view
from apishield.observe.logjson import fields
from apishield.state.local_leases import FrameReader, encode

logger = logging.getLogger("apishield")

GATHER_DEADLINE = 1.0  # seconds the hub waits for the other workers' answers
LINK_TIMEOUT = GATHER_DEADLINE + 1.0  # seconds worker 0 waits for the hub's sum


class _Peer(asyncio.Protocol):
    """Frames in and out of one Unix-socket connection; `on_message` gets each object."""

    def __init__(self) -> None:
        self.frames = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        try:
            messages = [orjson.loads(frame) for frame in self.frames.feed(data)]
        except ValueError as exc:  # framing or JSON broken: this connection is useless
            logger.warning("figures channel: dropped a connection (%s)", str(exc)[:200])
            self.abort()
            return
        for message in messages:
            try:
                if not isinstance(message, dict):
                    raise TypeError(f"{type(message).__name__}, not an object")
                self.on_message(message)
            except (KeyError, TypeError, ValueError) as exc:  # not a message of ours
                logger.warning("figures channel: dropped a connection (a malformed "
                               "message: %s)", f"{type(exc).__name__}: {exc}"[:200])
                self.abort()
                return

    def on_message(self, message: dict[str, Any]) -> None:
        raise NotImplementedError

    def send(self, message: dict[str, Any]) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(encode(message))

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


# ---------------------------------------------------------------- the supervisor's side
class _WorkerPeer(_Peer):
    def __init__(self, hub: FiguresHub) -> None:
        super().__init__()
        self.hub = hub
        self.index: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.hub.peers.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.hub.gone(self)

    def on_message(self, message: dict[str, Any]) -> None:
        if "hello" in message:
            self.index = int(message["hello"])
        elif "answer" in message:
            self.hub.answered(self, int(message["answer"]), _checked(message["figures"]))
        elif "gather" in message:
            self.hub.last[self] = _checked(message["figures"])
            self.hub.spawn(self.hub.gather(self, int(message["gather"])))


def _checked(figures: Any) -> Document:
    """`figures` if it adds up (a document `take()` wrote); else TypeError, which drops the
    connection (kept, it would break every later sum)."""
    try:
        view([figures])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise TypeError(f"figures that do not add up ({type(exc).__name__}: {exc})") from None
    return cast(Document, figures)


class FiguresHub:
    """The supervisor's end: asks the workers, keeps their last figures and those of the
    workers that are gone, answers worker 0's gathers with the sum."""

    def __init__(self) -> None:
        self.peers: set[_WorkerPeer] = set()
        self.last: dict[_WorkerPeer, Document] = {}  # each live worker's latest figures
        self.retired: Document | None = None  # the sum of the last figures of the gone
        self._asks: dict[int, tuple[_WorkerPeer, asyncio.Future[None]]] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self.path: Path | None = None

    async def start(self, path: Path) -> None:
        """Listen on `path`, in a folder only this user can enter; the socket is 0600."""
        loop = asyncio.get_running_loop()
        old_umask = os.umask(0o177)
        try:
            self._server = await loop.create_unix_server(lambda: _WorkerPeer(self),
                                                         path=str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self.path = path

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def gone(self, peer: _WorkerPeer) -> None:
        """A worker's connection closed: its last figures count from now on as retired
        (a counter must not go down when the worker that counted is started again)."""
        self.peers.discard(peer)
        last = self.last.pop(peer, None)
        if last is not None:
            self.retired = last if self.retired is None else add([self.retired, last])
        for ask, (asked, waiter) in list(self._asks.items()):
            if asked is peer and not waiter.done():
                waiter.set_result(None)  # no answer is coming: do not wait the deadline
                del self._asks[ask]

    def answered(self, peer: _WorkerPeer, ask: int, figures: Document) -> None:
        self.last[peer] = figures  # a late answer still refreshes the last figures
        pending = self._asks.pop(ask, None)
        if pending is not None and not pending[1].done():
            pending[1].set_result(None)

    async def gather(self, requester: _WorkerPeer, gather: int) -> None:
        loop = asyncio.get_running_loop()
        waiting: dict[asyncio.Future[None], _WorkerPeer] = {}
        for peer in list(self.peers):
            if peer is requester or peer.index is None or peer.closed:
                continue
            ask = next(self._ids)
            waiter: asyncio.Future[None] = loop.create_future()
            self._asks[ask] = (peer, waiter)
            waiting[waiter] = peer
            peer.send({"ask": ask})
        late: list[int] = []
        if waiting:
            _done, pending = await asyncio.wait(waiting, timeout=GATHER_DEADLINE)
            for waiter in pending:
                peer = waiting[waiter]
                waiter.cancel()
                late.append(peer.index if peer.index is not None else -1)
            for ask in [ask for ask, (_, w) in self._asks.items() if w in pending]:
                del self._asks[ask]
        if late:
            logger.warning(
                "figures: worker(s) %s did not answer within %.1f s: their last figures "
                "are used for this answer", ", ".join(map(str, sorted(late))),
                GATHER_DEADLINE, extra=fields("lifecycle", event="figures-late",
                                              late=sorted(late)))
        parts = [*self.last.values(), *([self.retired] if self.retired is not None else [])]
        requester.send({"gathered": gather, "figures": add(parts), "late": sorted(late)})

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            for peer in list(self.peers):
                peer.abort()
            await self._server.wait_closed()
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()


# ---------------------------------------------------------------- the worker's side
class _HubPeer(_Peer):
    def __init__(self, link: FiguresLink) -> None:
        super().__init__()
        self.link = link

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for waiter in list(self.link.waiting.values()):
            if not waiter.done():
                waiter.set_exception(OSError("the supervisor closed the figures channel"))

    def on_message(self, message: dict[str, Any]) -> None:
        if "ask" in message:  # on the loop, between requests: a copy of a few tables
            self.send({"answer": message["ask"], "figures": take(self.link.source())})
        elif "gathered" in message:
            waiter = self.link.waiting.pop(int(message["gathered"]), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message)


class FiguresLink:
    """A worker's end: answers the hub's asks; in worker 0, `gather()` the sum of every
    worker's figures (its own if the hub cannot be reached)."""

    def __init__(self, path: str | Path, index: int,
                 source: Callable[[], View] = local) -> None:
        """`source`: the figures this worker reports (this process's; a test's own)."""
        self.path = str(path)
        self.index = index
        self.source = source
        self._last: View | None = None  # the last sum the hub answered
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._peer: _HubPeer | None = None

    @property
    def connected(self) -> bool:
        return self._peer is not None and not self._peer.closed

    async def connect(self) -> None:
        """Connect (again) and say which worker this is; OSError when the hub is gone."""
        _transport, peer = await asyncio.wait_for(
            asyncio.get_running_loop().create_unix_connection(lambda: _HubPeer(self),
                                                              self.path), LINK_TIMEOUT)
        peer.send({"hello": self.index})
        self._peer = peer

    async def gather(self) -> View:
        """Every worker's figures added up; this worker's own if that fails (logged)."""
        try:
            if not self.connected:
                await self.connect()
            assert self._peer is not None
            gather = next(self._ids)
            waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self.waiting[gather] = waiter
            self._peer.send({"gather": gather, "figures": take(self.source())})
            try:
                answer = await asyncio.wait_for(waiter, LINK_TIMEOUT)
            finally:
                self.waiting.pop(gather, None)
            self._last = view([answer["figures"]])
            # counted after this answer's sum: the next one has it
            self.source().metrics.figures_late += len(answer["late"])
            return self._last
        except (OSError, TimeoutError) as exc:
            self.source().metrics.figures_late += 1
            logger.warning("figures: the supervisor could not add up the workers' figures "
                           "(%s): this answer has %s", exc or type(exc).__name__,
                           "the last sum it gave" if self._last is not None
                           else f"worker {self.index}'s only", extra=fields(
                               "lifecycle", event="figures-late", reason="supervisor"))
            if self._peer is not None:
                self._peer.abort()
                self._peer = None
            # stale but never lower (a counter going down reads as a reset), as the hub
            # does for a worker that is late; nothing to go lower than before a first sum
            return self._last if self._last is not None else self.source()

    def close(self) -> None:
        if self._peer is not None:
            self._peer.abort()
            self._peer = None
