"""The only code that opens a socket: to --target's scheme://host:port, nothing else.

Safety rules, each enforced here rather than trusted to the plan:
- one origin: the connection is made to the target's host and port; a request target is
  always a path (`/...`), so no request can name another host; a server URL in the
  contract is never read;
- no redirects: `http.client` never follows one, and the probe reports a 3xx as the
  answer it got (the `Location` is not contacted);
- bounded: at most `max_requests` requests (a hard stop, whatever the plan holds), and
  no faster than `rate` a second (requests are spaced, not bursted), except the requests
  of a rate-limit burst (`paced=False`: bursts.py, bounded by the limit it tests);
- every request sent is recorded, so the report lists them all.
"""

from __future__ import annotations

import http.client
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from apishield.probe.plan import ProbeRequest

BODY_KEPT = 64 * 1024  # of each answer, for the stack-trace check and the problem type


class BudgetExhausted(Exception):
    """`max_requests` were sent: the sender refuses one more."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    base: str  # a path prefix the target serves the API under ("" for none)

    @classmethod
    def parse(cls, url: str) -> Target:
        """Raises ValueError with a message for people."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"--target {url!r}: the scheme must be http or https")
        if not parts.hostname:
            raise ValueError(f"--target {url!r}: no host")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError(f"--target {url!r}: write scheme://host[:port][/base] only "
                             "(credentials go in --identity)")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise ValueError(f"--target {url!r}: {exc}") from None
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in order
    body: bytes  # the first BODY_KEPT bytes

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)


class Sender:
    def __init__(self, target: Target, *, max_requests: int, rate: float,
                 timeout: float = 10.0, ca_file: str | None = None) -> None:
        """`ca_file`: trust this CA (a staging deployment's private one) besides the
        system's; certificate and host name checks are never turned off."""
        if max_requests < 1 or rate <= 0:
            raise ValueError("max_requests and rate must be positive")
        self.target = target
        self.max_requests = max_requests
        self.interval = 1.0 / rate
        self.timeout = timeout
        self.ca_file = ca_file
        self.sent = 0
        self._next = 0.0
        self._connection: http.client.HTTPConnection | None = None

    def check_ca(self) -> None:
        """Load `ca_file` now, so a bad one is a usage error before anything is sent."""
        if self.ca_file is not None:
            ssl.create_default_context(cafile=self.ca_file)

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            if self.target.scheme == "https":
                self._connection = http.client.HTTPSConnection(
                    self.target.host, self.target.port, timeout=self.timeout,
                    context=ssl.create_default_context(cafile=self.ca_file))
            else:
                self._connection = http.client.HTTPConnection(
                    self.target.host, self.target.port, timeout=self.timeout)
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def send(self, request: ProbeRequest, *, paced: bool = True) -> Answer | str:
        """The answer, or why there was none (connection refused, reset, timeout).
        `paced=False`: not spaced at `rate` (a burst must outrun the limit it tests)."""
        if self.sent >= self.max_requests:
            raise BudgetExhausted
        path = self.target.base + request.target
        if not path.startswith("/") or path.startswith("//"):
            raise ValueError(f"not a path on the target: {path!r}")
        wait = self._next - time.monotonic()
        if wait > 0 and paced:
            time.sleep(wait)
        self._next = time.monotonic() + self.interval
        self.sent += 1
        connection = self._connect()
        try:
            connection.putrequest(request.method, path, skip_accept_encoding=True)
            for name, value in request.headers:
                connection.putheader(name, value)
            if request.body is not None:
                connection.putheader("Content-Length", str(len(request.body)))
            connection.endheaders()
            if request.body is not None:
                try:
                    connection.send(request.body)
                except OSError:  # refused before reading it all (413): read the answer
                    pass
            response = connection.getresponse()
            body = response.read(BODY_KEPT)
            if response.will_close or len(body) == BODY_KEPT:
                self.close()
            else:
                response.read()
            headers = tuple((n.lower(), v) for n, v in response.getheaders())
            return Answer(response.status, headers, body)
        except (OSError, http.client.HTTPException) as exc:  # timeouts are OSErrors
            self.close()
            return f"no answer: {exc.__class__.__name__}: {exc}"
