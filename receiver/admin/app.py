"""The admin app: `/metrics`, the detailed `/readyz`, and `/healthz`.

More admin routes (the JSON admin API, the inspector page) go in `routes()`: they are
served on the same listener, behind the same `AdminAuth`.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from receiver.admin.auth import AdminAuth
from receiver.service import Backend
from receiver.sources.http import JsonResponse, RequestContext, json_http_error


def routes(service: Backend) -> list[BaseRoute]:
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def readyz(request: Request) -> Response:
        ready, checks = await service.readiness()
        if ready:
            return JsonResponse({"ready": True, "checks": checks})
        return JsonResponse(
            {"ready": False, "checks": checks}, status_code=503, headers={"retry-after": "5"}
        )

    async def healthz(request: Request) -> Response:
        return JsonResponse({"status": "ok"})

    return [
        Route("/metrics", metrics, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]


def create_admin_app(service: Backend) -> Starlette:
    config = service.config
    app = Starlette(routes=routes(service), exception_handlers={HTTPException: json_http_error})
    # The last added runs first: every request is logged, refused ones too, and one
    # without credentials reaches no route.
    app.add_middleware(AdminAuth, config=config.admin)
    app.add_middleware(RequestContext, access_log=config.http.access_log)
    return app
