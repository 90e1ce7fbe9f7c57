"""A real headless Chromium driven over the Chrome DevTools Protocol, for the browser tests.

Why CDP over `websockets` rather than Selenium: nothing is downloaded at test time (no
Selenium Manager, no driver to match to the browser's version), the only dependency is
the `websockets` package the suite already has, and the protocol gives what the tests
need directly: navigate, evaluate JavaScript, read console errors (a CSP violation is
one), take a screenshot. The browser is Debian's `chromium` (`.ci/run` installs it).

The browser binds its debugging port itself (`--remote-debugging-port=0`) and writes it
to `DevToolsActivePort` in its profile directory: no port is guessed, so parallel test
workers never collide.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL = ("install Debian's chromium (`apt-get install chromium`; .ci/run does it) or set "
           "APISHIELD_CHROMIUM to a Chromium or Chrome binary")


def find_chromium() -> str:
    """The browser binary; a skip outside CI when there is none, a failure under CI=true
    (CI must run the browser test, never skip it unnoticed)."""
    wanted = os.environ.get("APISHIELD_CHROMIUM")
    found = shutil.which(wanted) if wanted else next(
        (path for path in map(shutil.which, NAMES) if path), None)
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and no Chromium found: {INSTALL}")
        pytest.skip(f"no Chromium on this machine: {INSTALL}")
    return found


class Chromium:
    """One headless browser process with one page (a CDP session attached to its tab)."""

    def __init__(self, binary: str, profile: Path, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.console: list[str] = []  # errors from the page: exceptions, CSP violations
        self._ids = itertools.count(1)
        self._stack = ExitStack()
        args = [
            binary, "--headless=new", "--remote-debugging-port=0",
            f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
            "--disable-gpu", "--disable-extensions", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-default-apps",
            "--disable-dev-shm-usage", "--window-size=1280,1400", "about:blank",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self.stderr = (profile.parent / f"{profile.name}.stderr").open("wb")
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.stderr)
        try:
            # entered as a context (websockets 17 warns on a bare connect()), left in close()
            self.socket = self._stack.enter_context(
                connect(self._browser_url(profile), max_size=None, open_timeout=timeout))
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target,
                                     flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                self.call(f"{domain}.enable", session=self.session)
        except BaseException:
            self.close()
            raise

    def _browser_url(self, profile: Path) -> str:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}")
            lines = active.read_text().split() if active.exists() else []
            if len(lines) >= 2:
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            time.sleep(0.05)
        raise RuntimeError(f"chromium wrote no DevToolsActivePort within {self.timeout}s")

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its answer; events seen meanwhile are kept when
        they report an error on the page."""
        message: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        self.socket.send(json.dumps(message))
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no CDP answer to {method} within {self.timeout}s")
            reply = json.loads(self.socket.recv(timeout=left))
            if reply.get("id") == message["id"]:
                if "error" in reply:
                    raise RuntimeError(f"CDP {method}: {reply['error']}")
                return dict(reply.get("result", {}))
            self._event(reply)

    def _event(self, event: dict[str, Any]) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.console.append(str(params["exceptionDetails"].get("exception", params)))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.console.append(params["entry"]["text"])
        elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
            self.console.append(" ".join(str(a.get("value")) for a in params["args"]))

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.call(method, session=self.session, **params)

    def navigate(self, url: str) -> None:
        result = self.page("Page.navigate", url=url)
        if result.get("errorText"):
            raise RuntimeError(f"cannot load {url}: {result['errorText']}")
        loaded = f"location.href === {json.dumps(url)} && document.readyState === 'complete'"
        if not self.wait_for(loaded, self.timeout):
            raise RuntimeError(f"{url} did not finish loading within {self.timeout}s")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serializable values)."""
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Poll a JavaScript expression until it is truthy (bounded); its last value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.1)

    def screenshot(self, path: Path) -> None:
        data = self.page("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))

    def close(self) -> None:
        self._stack.close()  # the CDP connection
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.stderr.close()
