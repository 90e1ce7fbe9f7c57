"""The admin API inside the app the middleware wraps, under `admin.path`.

The middleware has no listener of its own, so the admin API shares the app's: it is only
as private as the app is public. Without a token it answers loopback clients only (a
sidecar scraper, `curl` on the host), and says how to open it to others; with a token
every client must present it, as on the gateway's listener.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from apishield.admin.app import AdminApp, AdminResponse, _problem
from apishield.config import is_loopback

Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class AdminMount:
    def __init__(self, app: AdminApp, path: str, *, protected: bool) -> None:
        self.app = app
        self.path = path
        self.protected = protected

    def matches(self, path: str) -> bool:
        return path == self.path or path.startswith(self.path + "/")

    async def __call__(self, scope: Scope, send: Send) -> None:
        """Answer an admin request (its body, if any, is never read: no endpoint takes
        one)."""
        client = scope.get("client")
        host = str(client[0]) if client else ""
        path = scope["path"][len(self.path):] or "/"
        if not self.protected and not is_loopback(host):
            response = _problem(
                403, "admin-loopback-only", "Forbidden",
                "Without admin.token_env or admin.token_file the admin API answers "
                "loopback clients only.")
        else:
            headers = dict(scope.get("headers") or [])
            response = await self.app.handle(
                scope["method"], path, headers.get(b"authorization"),
                headers.get(b"accept", b""), host,
                bytes(scope.get("query_string") or b"").decode("latin-1"))
        await _send(response, send, head_only=scope["method"] == "HEAD")


async def _send(response: AdminResponse, send: Send, *, head_only: bool) -> None:
    headers = [
        (b"content-type", response.content_type),
        (b"content-length", b"%d" % len(response.body)),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        *response.headers,
    ]
    await send({"type": "http.response.start", "status": response.status,
                "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head_only else response.body})
