"""The baseline for bench/http.py: a Starlette endpoint that only reads the body."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def callbacks(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"accepted": 1, "bytes": len(body)})


app = Starlette(routes=[Route("/callbacks", callbacks, methods=["POST"])])
