"""A plain ASGI app under ApiShieldMiddleware for tests/test_logging.py, run by a real
uvicorn (`--factory tests.logging_app:create`); its config comes from the environment
(`LOGGING_TEST_CONFIG`), so the test gives the process its own access log and redaction."""

from __future__ import annotations

import os
from typing import Any

from apishield import ApiShieldMiddleware

# what /boom's exception says and /leak's body holds: neither may reach a log line
BOOM_PASSWORD = "Tr0ub4dor-and-3"
LEAKED_CARD = "4111111111111111"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/boom":
        raise RuntimeError(f"connect(host=db, password={BOOM_PASSWORD}) failed")
    status, body = (500, f"card_number={LEAKED_CARD} declined".encode()) if path == "/leak" \
        else (200, b'{"ok": true}')
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def create() -> ApiShieldMiddleware:
    return ApiShieldMiddleware(app, config=os.environ["LOGGING_TEST_CONFIG"])
