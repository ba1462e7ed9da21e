"""The HTTP receiver: CI's CallBack URL, plus health, readiness and metrics.

`POST /callbacks` (or `/callbacks/<token>` when tokens are configured) answers 200 only
after the callback is committed to the inbox (in relay mode: confirmed by the TDMQ
broker). Bad input gets a 4xx with a JSON reason, and its body is kept for inspection;
a body over the limit is refused as soon as the limit is passed.
"""

from __future__ import annotations

import hmac
import time
from datetime import datetime, timezone
from typing import Any

import orjson
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from receiver.ids import new_id
from receiver.inbox import Receipt
from receiver.ingest import IntakeUnavailable, RejectionNotKept
from receiver.payload import PayloadError
from receiver.service import Backend

logger = structlog.get_logger("ci_receiver.sources.http")

# Request headers kept with each callback: what tells its format, variant and sender.
HEADERS_OF_INTEREST = frozenset(
    {
        "content-type",
        "content-length",
        "user-agent",
        "x-ci-content-version",
        "x-cmq-message-id",
        "x-cmq-message-tag",
        "x-cmq-request-id",
        "x-forwarded-for",
        "x-real-ip",
    }
)
# As ASGI gives them: lower-case bytes.
_RAW_HEADERS_OF_INTEREST = frozenset(name.encode() for name in HEADERS_OF_INTEREST)


class JsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error(status: int, reason: str, detail: str) -> JsonResponse:
    return JsonResponse({"error": reason, "detail": detail}, status_code=status)


def unavailable(reason: str = "inbox_unavailable") -> JsonResponse:
    # Even a body that will be refused is kept first: when it cannot be, the sender is
    # asked to send it again rather than have it vanish. `relay_unavailable`: the broker
    # did not confirm it (relay mode).
    return error(503, reason, "the callback could not be stored; send it again")


def _headers_of_interest(scope: Scope) -> dict[str, str]:
    # From the raw ASGI headers: decoding only these is cheaper than Request.headers.
    return {
        name.decode(): value.decode("latin-1")
        for name, value in scope["headers"]
        if name in _RAW_HEADERS_OF_INTEREST
    }


def create_app(service: Backend) -> Starlette:
    config = service.config
    tokens = [token.get_secret_value().encode() for token in config.http.tokens]
    max_bytes = config.limits.max_bytes
    ingestor, metrics = service.ingestor, service.metrics

    async def receive_callback(request: Request) -> Response:
        if tokens and not _token_ok(request.path_params.get("token"), tokens):
            metrics.series(metrics.callbacks, "http", "unauthorized").inc()
            return error(401, "unauthorized", "POST to /callbacks/<token> with a configured token")
        receipt = Receipt(
            body=b"",
            source="http",
            received_at=datetime.now(timezone.utc),
            request_id=request.scope["state"]["request_id"],
            headers=_headers_of_interest(request.scope),
            source_meta={"request_id": request.scope["state"]["request_id"]},
        )
        too_large = PayloadError("too_large", f"the body is over the {max_bytes}-byte limit")
        declared = receipt.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            return await refuse(receipt, too_large, size=int(declared))
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    receipt.body = bytes(body)
                    return await refuse(receipt, too_large, size=len(body))
        except ClientDisconnect:
            logger.info("client went away before sending the whole body", received=len(body))
            return Response(status_code=400)
        receipt.body = bytes(body)
        try:
            stored = await ingestor.ingest(receipt)
        except PayloadError as exc:
            return error(400, exc.reason, exc.message)
        except IntakeUnavailable as exc:  # a refused body not kept, a broker away, ...
            return unavailable(exc.reason)
        except Exception:
            logger.exception("cannot commit the callback to the inbox")
            return unavailable()
        return JsonResponse(
            {
                "accepted": len(stored.new),
                "duplicates": len(stored.duplicates),
                "ids": stored.ids,
            }
        )

    async def refuse(receipt: Receipt, refusal: PayloadError, *, size: int) -> Response:
        try:
            await ingestor.reject(receipt, refusal, size=size)
        except RejectionNotKept as exc:
            return unavailable(exc.reason)
        return error(413, refusal.reason, refusal.message)

    async def healthz(request: Request) -> Response:
        return JsonResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ready, checks = await service.readiness()
        return JsonResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JsonResponse(
            {"error": reason, "detail": exc.detail},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    app = Starlette(
        routes=[
            Route("/callbacks", receive_callback, methods=["POST"]),
            Route("/callbacks/{token}", receive_callback, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
    )
    app.add_middleware(RequestContext, access_log=config.http.access_log)
    return app


def _token_ok(given: str | None, tokens: list[bytes]) -> bool:
    if given is None:
        return False
    candidate = given.encode()
    # Compare against every token so the time taken does not tell which one is close.
    return any([hmac.compare_digest(candidate, token) for token in tokens])


class RequestContext:
    """Give every request an id (its `X-Request-Id`, or a new one), bind it to the log
    context of everything the request does, echo it back, and log the request."""

    def __init__(self, app: ASGIApp, *, access_log: bool) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        began = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                if self.access_log:
                    logger.info(
                        "request",
                        method=scope["method"],
                        # Never log a callback token.
                        path="/callbacks/***"
                        if scope["path"].startswith("/callbacks/")
                        else scope["path"],
                        status=status,
                        ms=round((time.perf_counter() - began) * 1000, 2),
                    )


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id" and 0 < len(value) <= 64 and value.isascii():
            text: Any = value.decode()
            if text.isprintable():
                return str(text)
    return new_id()
