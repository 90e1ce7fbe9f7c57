"""The demo contract's operations as a Starlette app under ApiShieldMiddleware, for the
probe's middleware target (tests/test_probe.py), run by a real uvicorn
(`--factory tests.probe_middleware_app:create`); the config comes from the environment
(`PROBE_MIDDLEWARE_CONFIG`), so each test sets its own policy.

The app itself checks nothing (like many apps that rely on the layer in front): it answers
every declared operation, and also an `/admin` route the contract does not declare, so
whatever gets past the middleware is answered with a 2xx.
"""

from __future__ import annotations

import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from apishield import ApiShieldMiddleware

PET = {"id": 1, "name": "Rex", "tag": "dog"}
USER = {"id": 1, "name": "Ada", "email": "ada@example.com"}
ORDER = {"id": 1, "user_id": 1, "pet_id": 1, "status": "placed"}


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def pets(request: Request) -> Response:
    if request.method == "POST":
        await request.body()
        return JSONResponse(PET, status_code=201)
    return JSONResponse([PET])


async def pet(request: Request) -> Response:
    if request.method == "DELETE":
        return Response(status_code=204)
    return JSONResponse(PET)


async def user(request: Request) -> Response:
    return JSONResponse(USER)


async def orders(request: Request) -> Response:
    if request.method == "POST":
        await request.body()
        return JSONResponse(ORDER, status_code=201)
    return JSONResponse([ORDER])


async def order(request: Request) -> Response:
    return JSONResponse(ORDER)


async def admin(request: Request) -> Response:  # not in the contract
    return JSONResponse({"secret": "admin panel"})


ROUTES = [
    Route("/health", health), Route("/pets", pets, methods=["GET", "POST"]),
    Route("/pets/{petId}", pet, methods=["GET", "DELETE"]),
    Route("/users/{userId}", user), Route("/users/{userId}/orders", orders),
    Route("/orders", orders, methods=["POST"]), Route("/orders/{orderId}", order),
    Route("/admin", admin),
]


def create() -> Any:
    app = Starlette(routes=ROUTES)
    return ApiShieldMiddleware(app, config=os.environ["PROBE_MIDDLEWARE_CONFIG"])
