"""Apps for tests/test_middleware_lifespan.py, run by a real uvicorn (`--factory`).

The config and a file of lifespan events come from the environment, so each test can
give the process its own access log: `LIFESPAN_TEST_CONFIG`, `LIFESPAN_TEST_EVENTS`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from apishield import ApiShieldMiddleware

SLOW = 0.3  # seconds `/items/slow` takes


def _note(event: str) -> None:
    with Path(os.environ["LIFESPAN_TEST_EVENTS"]).open("a") as events:
        events.write(event + "\n")


def fastapi_app() -> FastAPI:
    """A FastAPI app with its own lifespan (startup, a slow shutdown) under the middleware."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        _note("startup")
        yield {"greeting": "hello"}
        await asyncio.sleep(0)  # a shutdown handler that awaits: the pipeline waits for it
        _note("shutdown")

    app = FastAPI(lifespan=lifespan)

    @app.get("/items/{item_id}")
    async def get_item(item_id: str, request: Request) -> dict[str, str]:
        if item_id == "slow":  # still in flight when the server is told to stop
            await asyncio.sleep(SLOW)
        greeting = getattr(request.state, "greeting", None)  # lifespan state, when it ran
        return {"item_id": item_id, **({"greeting": greeting} if greeting else {})}

    app.add_middleware(ApiShieldMiddleware, config=os.environ["LIFESPAN_TEST_CONFIG"])
    return app


def raw_app() -> ApiShieldMiddleware:
    """A bare ASGI app that does not speak lifespan (it refuses every non-HTTP scope)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"unsupported scope {scope['type']}")
        if scope["path"] == "/items/slow":
            await asyncio.sleep(SLOW)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"ok":true}'})

    return ApiShieldMiddleware(app, config=os.environ["LIFESPAN_TEST_CONFIG"])
