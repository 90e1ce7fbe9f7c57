"""A FastAPI app wrapped by ApiShieldMiddleware; it has routes the contract does not declare."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import StreamingResponse

from apishield import ApiShieldMiddleware

CONFIG = Path(__file__).parent / "data" / "middleware.yaml"
events: list[str] = []


def create_app(config: Path | str = CONFIG) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        events.append("startup")
        yield
        events.append("shutdown")

    app = FastAPI(lifespan=lifespan)

    @app.get("/items/{item_id}")
    async def get_item(item_id: str) -> dict[str, str]:
        return {"item_id": item_id}

    @app.post("/items", status_code=201)
    async def create_item(request: Request) -> dict[str, object]:
        return {"received": await request.json()}

    @app.get("/admin")  # exists in the app, not in the contract: must be unreachable
    async def admin() -> dict[str, str]:
        return {"secret": "admin panel"}

    @app.get("/boom")
    async def boom() -> dict[str, str]:
        raise RuntimeError("database password is hunter2")

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def parts():
            for i in range(5):
                yield f"part{i};".encode()

        return StreamingResponse(parts(), media_type="text/plain",
                                 headers={"Server": "uvicorn-leak", "X-Powered-By": "FastAPI"})

    @app.get("/leak")
    async def leak():
        from fastapi.responses import PlainTextResponse

        return PlainTextResponse("Traceback: password=hunter2 in db.py", status_code=500)

    @app.get("/headers")
    async def headers(request: Request) -> dict[str, str]:
        return dict(request.headers)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    app.add_middleware(ApiShieldMiddleware, config=str(config))
    return app


app = create_app()
