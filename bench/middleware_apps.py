#!/usr/bin/env python3
"""The apps `bench/middleware` measures: one app per target, served by uvicorn.

Run by the harness with the peer venv's python (it imports Starlette, FastAPI, Connexion,
openapi-core and apishield; the project's own venv need not have any of them):

    python bench/middleware_apps.py --target apishield --port 8001 --dir /tmp/x

Every target serves the same two operations with the same constant answers, so the only
difference between two targets is what checks a request on its way in:

  GET  /items/{itemId}?limit=N  -> 200, the ~200 B JSON bench/harness.py's upstream serves
  POST /items (1 KB JSON body)  -> 201, a small JSON

The handlers return ready-made bytes (a Starlette `Response`): no framework serializes
anything, so a response model's cost is not counted against one target and not another.
`--dir` holds `openapi.yaml` (the one document every validating target reads) and, for the
apishield targets, `apishield.yaml`; the harness writes both.
"""

# No `from __future__ import annotations`: FastAPI reads the annotations of the handlers
# and models defined inside fastapi_app(), which must be real objects, not strings.
import argparse
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from harness import HOST, UPSTREAM_BODY  # bench/ is sys.path[0] when run as a script

GET_BODY = UPSTREAM_BODY.encode()
CREATED_BODY = b'{"id":1001,"status":"created"}'
JSON = "application/json"


def starlette_app() -> Any:
    """Bare Starlette routes: no validation. The POST handler reads the body (every app
    does) but does not parse it: the reference is the server and the router."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def get_item(request: Request) -> Response:
        return Response(GET_BODY, media_type=JSON)

    async def create_item(request: Request) -> Response:
        await request.body()
        return Response(CREATED_BODY, status_code=201, media_type=JSON)

    return Starlette(routes=[
        Route("/items/{itemId}", get_item, methods=["GET"]),
        Route("/items", create_item, methods=["POST"]),
    ])


def apishield_app(d: Path) -> Any:
    """ApiShieldMiddleware wrapped directly around the bare Starlette app (outermost, as
    `add_middleware` would put it but for Starlette's own error middleware)."""
    from apishield import ApiShieldMiddleware

    return ApiShieldMiddleware(starlette_app(), config=str(d / "apishield.yaml"))


def fastapi_app() -> Any:
    """FastAPI with pydantic models written the way a FastAPI user writes the schema of
    bench/harness.py's ITEM_SCHEMA: the same bounds, patterns and enums, `extra="forbid"`
    at every level, optional fields that refuse an explicit null (their type is not
    Optional). pydantic's default (lax) mode: as a user gets it."""
    from fastapi import FastAPI, Query
    from fastapi import Path as PathParam
    from fastapi.responses import Response
    from pydantic import BaseModel, ConfigDict, Field

    Sku = Annotated[str, Field(pattern=r"^[A-Z]{3}-[0-9]{4}$")]

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class Line(Strict):
        sku: Sku
        qty: Annotated[int, Field(ge=1, le=1000)]
        price: Annotated[float, Field(ge=0, le=100000)] = None  # type: ignore[assignment]
        label: Annotated[str, Field(max_length=64)] = None  # type: ignore[assignment]
        warehouse: Literal["AMS", "FRA", "PAR", "MAD"] = None  # type: ignore[assignment]
        note: Annotated[str, Field(max_length=200)] = None  # type: ignore[assignment]

    class Dimensions(Strict):
        w: Annotated[int, Field(ge=0, le=10000)]
        h: Annotated[int, Field(ge=0, le=10000)]
        d: Annotated[int, Field(ge=0, le=10000)]
        unit: Literal["mm", "cm", "in"] = None  # type: ignore[assignment]

    class Item(Strict):
        sku: Sku
        name: Annotated[str, Field(min_length=1, max_length=100)]
        description: Annotated[str, Field(max_length=500)] = None  # type: ignore[assignment]
        price: Annotated[float, Field(ge=0, le=100000)]
        currency: Literal["EUR", "USD", "GBP", "CHF"]
        quantity: Annotated[int, Field(ge=0, le=10000)]
        weight_g: Annotated[int, Field(ge=0, le=1000000)] = None  # type: ignore[assignment]
        in_stock: bool = None  # type: ignore[assignment]
        category: Literal["hardware", "garden", "kitchen", "toys"] = None  # type: ignore[assignment]
        brand: Annotated[str, Field(max_length=64)] = None  # type: ignore[assignment]
        color: Annotated[str, Field(max_length=32)] = None  # type: ignore[assignment]
        material: Annotated[str, Field(max_length=32)] = None  # type: ignore[assignment]
        warranty_months: Annotated[int, Field(ge=0, le=120)] = None  # type: ignore[assignment]
        rating: Annotated[float, Field(ge=0, le=5)] = None  # type: ignore[assignment]
        supplier_id: Annotated[int, Field(ge=1, le=2147483647)] = None  # type: ignore[assignment]
        barcode: Annotated[str, Field(max_length=20)] = None  # type: ignore[assignment]
        dimensions: Dimensions = None  # type: ignore[assignment]
        tags: Annotated[list[Annotated[str, Field(max_length=32)]],
                        Field(max_length=10)] = None  # type: ignore[assignment]
        notes: Annotated[str, Field(max_length=1000)] = None  # type: ignore[assignment]
        lines: Annotated[list[Line], Field(max_length=1000)] = None  # type: ignore[assignment]

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/items/{itemId}")
    async def get_item(itemId: Annotated[int, PathParam(ge=1, le=1000000)],
                       limit: Annotated[int | None, Query(ge=1, le=100)] = None) -> Response:
        return Response(GET_BODY, media_type=JSON)

    @app.post("/items", status_code=201)
    async def create_item(item: Item) -> Response:
        return Response(CREATED_BODY, status_code=201, media_type=JSON)

    return app


def connexion_app(d: Path) -> Any:
    """Connexion 3's AsyncApp from the same document with its defaults: request validation
    on, response validation off, undeclared query parameters ignored (`strict_validation`
    off); handlers found by operationId."""
    from connexion import AsyncApp
    from connexion.resolver import Resolver
    from starlette.responses import Response

    async def get_item(itemId: int, limit: int | None = None) -> Response:
        return Response(GET_BODY, media_type=JSON)

    async def create_item(body: dict) -> Response:
        return Response(CREATED_BODY, status_code=201, media_type=JSON)

    handlers = {"getItem": get_item, "createItem": create_item}
    app = AsyncApp(__name__, specification_dir=str(d))
    app.add_api("openapi.yaml", resolver=Resolver(function_resolver=handlers.__getitem__))
    return app


def openapi_core_app(d: Path) -> Any:
    """openapi-core's Starlette middleware (request and response validation, its default)
    around the bare Starlette app."""
    from openapi_core import OpenAPI
    from openapi_core.contrib.starlette.middlewares import StarletteOpenAPIMiddleware
    from starlette.middleware import Middleware

    app = starlette_app()
    openapi = OpenAPI.from_file_path(str(d / "openapi.yaml"))
    app.user_middleware.insert(0, Middleware(StarletteOpenAPIMiddleware, openapi=openapi))
    return app


def build(target: str, d: Path) -> Any:
    if target == "starlette":
        return starlette_app()
    if target in ("apishield", "apishield_nolog"):
        return apishield_app(d)
    if target == "fastapi":
        return fastapi_app()
    if target == "connexion":
        return connexion_app(d)
    if target == "openapi_core":
        return openapi_core_app(d)
    raise SystemExit(f"unknown target {target!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", type=Path, required=True)
    args = ap.parse_args(argv)
    import uvicorn

    app = build(args.target, args.dir)
    # The same server settings for every target: 1 worker, uvloop, httptools, no access
    # log, no `server` header (apishield's docs ask for it; the others do not care).
    uvicorn.run(app, host=HOST, port=args.port, loop="uvloop", http="httptools",
                access_log=False, log_level="warning", lifespan="auto",
                server_header=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
