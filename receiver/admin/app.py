"""The admin app: `/metrics`, the detailed `/readyz`, `/healthz`, and with
`[admin] inspector = true` the JSON admin API (`/api`, `api.py`) and the inspector pages
(`/inspector`, `inspector.py`), all behind the same `AdminAuth`.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from receiver.admin.api import api_routes
from receiver.admin.auth import AdminAuth
from receiver.admin.inspection import Inspection
from receiver.admin.inspector import inspector_routes
from receiver.metrics import exposition
from receiver.sources.backend import Backend
from receiver.sources.http import (
    JsonResponse,
    RequestContext,
    error,
    json_http_error,
    ready_or_not,
)


def routes(service: Backend) -> list[BaseRoute]:
    async def metrics(request: Request) -> Response:
        return Response(exposition(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def readyz(request: Request) -> Response:
        ready, checks = await service.readiness()
        if "access" not in request.scope.get("state", {}):  # a probe, without credentials
            return ready_or_not(ready)
        if ready:
            return JsonResponse({"ready": True, "checks": checks})
        return JsonResponse(
            {"ready": False, "checks": checks}, status_code=503, headers={"retry-after": "5"}
        )

    async def healthz(request: Request) -> Response:
        return JsonResponse({"status": "ok"})

    basics: list[BaseRoute] = [
        Route("/metrics", metrics, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    if not service.config.admin.inspector:
        return [*basics, *_switched_off()]
    inspection = Inspection(service)
    return [*basics, *api_routes(inspection), *inspector_routes(inspection, service.config)]


def _switched_off() -> list[BaseRoute]:
    async def off(request: Request) -> Response:
        return error(
            404,
            "not_found",
            "the admin API and the inspector are off: set [admin] inspector = true",
        )

    return [
        Route(path, off) for path in ("/api/{rest:path}", "/inspector", "/inspector/{rest:path}")
    ]


def create_admin_app(service: Backend) -> Starlette:
    config = service.config
    app = Starlette(routes=routes(service), exception_handlers={HTTPException: json_http_error})
    # The last added runs first: every request is logged, refused ones too, and one
    # without credentials reaches no route.
    app.add_middleware(AdminAuth, config=config.admin)
    app.add_middleware(RequestContext, access_log=config.http.access_log)
    return app
