"""Delivering fired alerts to webhooks, never on the request path (F3).

Each webhook has its own bounded queue and its own worker task: a request only appends to
a queue (`put_nowait`; full: the alert is dropped for that webhook and counted), and a
webhook that hangs holds its own worker, never another webhook's nor a request. The POST
itself is blocking `urllib` (as the JWKS fetcher, auth/jwks.py) run on a small thread pool
of this module's own, one thread per webhook (at most `MAX_THREADS`), so a hung endpoint
cannot starve the default executor that the rest of the gateway uses. Each attempt has a
timeout; a failed one (network error, timeout, 5xx, 429) is retried `retries` times after
an exponential backoff with full jitter (AWS's "Exponential Backoff And Jitter"); other
answers (4xx, a redirect: never followed, a URL that is a secret must not be sent
elsewhere) are final. Every failure is a `alert-delivery-failed` security line naming the
webhook, never its URL or headers (they may hold a secret), and a count in
`apishield_alert_deliveries_total`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from apishield.config.alerts import Webhook
from apishield.config.errors import ConfigError
from apishield.config.secrets import read_secret
from apishield.observe.alert_feed import FiredAlert
from apishield.observe.logjson import fields
from apishield.observe.metrics import Metrics

security_log = logging.getLogger("apishield.security")

FLUSH_TIMEOUT = 2.0  # seconds `stop()` lets queued alerts go out before cancelling


@dataclass(frozen=True)
class Target:
    """A webhook with its secrets read: what a POST needs."""

    name: str
    url: str
    format: str
    headers: tuple[tuple[str, str], ...]
    timeout: float
    retries: int
    backoff: float
    max_backoff: float


def resolve(name: str, webhook: Webhook, source_dir: str | Path) -> Target:
    """The webhook with its URL and header secrets read (a ConfigError naming the
    variable or file, never the value)."""
    where = f"alerts.webhooks.{name}"
    try:
        url = (webhook.url if webhook.url_secret is None else
               read_secret(webhook.url_secret, source_dir, what=f"{where}.url_secret")
               .decode("utf-8").strip())
        headers = [*webhook.headers.items(), *(
            (header, read_secret(secret, source_dir, what=f"{where}.secret_headers.{header}")
             .decode("utf-8").strip()) for header, secret in webhook.secret_headers.items())]
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError([str(exc)]) from None
    assert url is not None
    if not url.startswith(("http://", "https://")):  # the message never holds the URL
        raise ConfigError([f"{where}.url_secret: the secret is not an http:// or https:// "
                           "URL"])
    return Target(name, url, webhook.format, tuple(headers), webhook.timeout,
                  webhook.retries, webhook.backoff, webhook.max_backoff)


def body(alert: FiredAlert, fmt: str) -> bytes:
    """The POST body: the alert as JSON, or Slack's `{"text": ...}`."""
    if fmt == "slack":
        return orjson.dumps({"text": f"[apishield] {alert.severity}: {alert.rule} "
                                     f"({alert.kind}): {alert.summary}"})
    return orjson.dumps({"source": "apishield", **alert.as_dict()})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        return None  # a 3xx is an HTTPError: the alert is not sent somewhere else


_OPENER = urllib.request.build_opener(_NoRedirect())


class Failure(Exception):
    def __init__(self, error: str, retry: bool, status: int | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.retry = retry
        self.status = status


def post(target: Target, payload: bytes) -> int:
    """One attempt (blocking, in a worker thread): the status, or `Failure`."""
    request = urllib.request.Request(target.url, data=payload, method="POST")  # noqa: S310 - scheme checked in resolve
    request.add_header("Content-Type", "application/json")
    request.add_header("User-Agent", "apishield-alerts")
    for name, value in target.headers:
        request.add_header(name, value)
    try:
        with _OPENER.open(request, timeout=target.timeout) as response:
            response.read(65536)
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        status = exc.code
        raise Failure(f"http-{status}", retry=status >= 500 or status == 429,
                      status=status) from None
    except TimeoutError:
        raise Failure("timeout", retry=True) from None
    except urllib.error.URLError as exc:
        kind = "timeout" if isinstance(exc.reason, TimeoutError) else "unreachable"
        raise Failure(kind, retry=True) from None
    except OSError as exc:  # reset, refused mid-way
        raise Failure(type(exc).__name__, retry=True) from None


class Delivery:
    """The queues and workers of every configured webhook; started with the pipeline."""

    def __init__(self, targets: dict[str, Target], queue_size: int,
                 metrics: Metrics | None) -> None:
        self.targets = targets
        self.queue_size = queue_size
        self.metrics = metrics
        self._queues: dict[str, asyncio.Queue[FiredAlert]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def count(self, webhook: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.alert_delivery(webhook, outcome)

    async def start(self) -> None:
        if not self.targets or self._tasks:
            return
        self._loop = asyncio.get_running_loop()
        for name, target in self.targets.items():
            queue: asyncio.Queue[FiredAlert] = asyncio.Queue(self.queue_size)
            self._queues[name] = queue
            self._tasks.append(asyncio.create_task(self._work(target, queue),
                                                   name=f"webhook {name}"))

    def send(self, alert: FiredAlert, webhooks: tuple[str, ...]) -> None:
        """Queue `alert` for each webhook (never blocks; full or not started: dropped).
        Events come from the event loop; one from another thread is handed to it (an
        asyncio queue is not thread-safe)."""
        loop = self._loop
        if loop is not None:
            try:
                current = asyncio.get_running_loop()
            except RuntimeError:
                current = None
            if current is not loop:
                try:
                    loop.call_soon_threadsafe(self.send, alert, webhooks)
                except RuntimeError:  # the loop is closed: shutting down
                    for name in webhooks:
                        self.count(name, "dropped")
                return
        for name in webhooks:
            queue = self._queues.get(name)
            try:
                if queue is None:
                    raise asyncio.QueueFull
                queue.put_nowait(alert)
            except asyncio.QueueFull:
                self.count(name, "dropped")

    async def _work(self, target: Target, queue: asyncio.Queue[FiredAlert]) -> None:
        while True:
            alert = await queue.get()
            try:
                await self._deliver(target, alert)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end the worker
                security_log.exception("alert delivery crashed", extra=fields(
                    "error", None))
            finally:
                queue.task_done()

    async def _deliver(self, target: Target, alert: FiredAlert) -> None:
        payload = body(alert, target.format)
        for attempt in range(1, target.retries + 2):
            try:
                await _in_thread(target, payload)
            except Failure as failure:
                last = attempt > target.retries or not failure.retry
                self.count(target.name, "failed" if last else "retried")
                values: dict[str, object] = {
                    "event": "alert-delivery-failed", "webhook": target.name,
                    "rule": alert.rule, "attempt": attempt, "error": failure.error,
                    "final": last}
                security_log.warning("alert delivery failed", extra=fields(
                    "security", None, **values))
                if last:
                    return
                delay = min(target.max_backoff, target.backoff * 2 ** (attempt - 1))
                await asyncio.sleep(random.uniform(0, delay))  # noqa: S311 - jitter, not a secret
            else:
                self.count(target.name, "delivered")
                return

    async def stop(self) -> None:
        """Let what is queued go out for up to `FLUSH_TIMEOUT` seconds, then cancel the
        workers; a POST in flight ends at its own timeout, in its thread."""
        if self._queues:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(
                    *(queue.join() for queue in self._queues.values())), FLUSH_TIMEOUT)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for name, queue in self._queues.items():  # left unsent: counted as dropped
            while not queue.empty():
                queue.get_nowait()
                self.count(name, "dropped")
        self._queues.clear()
        self._loop = None


def _in_thread(target: Target, payload: bytes) -> asyncio.Future[int]:
    """`post` in a daemon thread of its own; its answer (or `Failure`) as a future. A
    cancelled wait leaves the thread to end at its timeout, unheard."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()

    def settle(status: int | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            assert status is not None
            future.set_result(status)

    def run() -> None:
        try:
            status, error = post(target, payload), None
        except BaseException as exc:  # handed to the loop, raised there
            status, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, status, error)
        except RuntimeError:  # the loop closed meanwhile (shutdown): nobody waits
            pass

    threading.Thread(target=run, name=f"apishield-webhook-{target.name}", daemon=True).start()
    return future
