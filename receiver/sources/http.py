"""The HTTP receiver: CI's CallBack URL, plus health and a bare readiness.

`POST /callbacks` (or `/callbacks/<token>` when tokens are configured) answers 200 only
after the callback is committed to the inbox (in relay mode: confirmed by the TDMQ
broker). A sender that fails authentication is refused before its body is read, and
nothing of it is kept. Bad input gets a 4xx with a JSON reason, and its body is kept for
inspection (within the budget of `Ingestor.reject`); a body over the limit is refused as
soon as the limit is passed. Metrics and the detailed readiness are on the admin
listener (`receiver.admin`), not here.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from receiver import tracing
from receiver.callback.decode import PayloadError
from receiver.ids import new_id
from receiver.inbox import Receipt
from receiver.ingest.ingest import THREAD_PARSE_BYTES, IntakeUnavailable, RejectionNotKept
from receiver.sources.admission import Admission
from receiver.sources.backend import Backend
from receiver.sources.http_auth import SenderAuth, client_address

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
# Bodies over this size hold the most memory while they wait for the one thread that
# decodes them (the body, its document and its Event: several times the bytes): only
# `http.max_large_requests` of them are taken in at once, the others get 503.
LARGE_BODY_BYTES = THREAD_PARSE_BYTES
# A header value kept with a callback is cut to this many bytes.
MAX_KEPT_HEADER_BYTES = 512
# Seconds a sender is asked to wait before sending again after a 503.
RETRY_AFTER = "1"
# Path segments the access log shows as they are; any other is masked ("***"), so that a
# token never reaches the log, whatever path it was sent to.
_LOGGED_SEGMENTS = frozenset({"callbacks", "callback", "healthz", "readyz", "metrics"})


class JsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error(
    status: int, reason: str, detail: str, headers: dict[str, str] | None = None
) -> JsonResponse:
    return JsonResponse({"error": reason, "detail": detail}, status_code=status, headers=headers)


class Slots:
    """A count of things in progress, up to a limit; taken without waiting."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0

    def take(self) -> bool:
        if self.taken >= self.limit:
            return False
        self.taken += 1
        return True

    def give_back(self) -> None:
        self.taken -= 1


# The paths of `receive_callback`, as Starlette's routes `/callbacks` and
# `/callbacks/{token}` match them (the same expression, `$` and all).
_CALLBACK_PATH = re.compile(r"^/callbacks(?:/(?P<token>[^/]+))?$")
_SERVER_ERROR = b"Internal Server Error"


@dataclass(slots=True)
class Answer:
    """A complete response of the callback route: what Starlette's JSONResponse sends."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]

    @classmethod
    def json(cls, status: int, content: Any, headers: dict[str, str] | None = None) -> Answer:
        return cls(
            status,
            orjson.dumps(content),
            [(name.lower().encode("latin-1"), value.encode("latin-1"))
             for name, value in (headers or {}).items()],
        )  # fmt: skip

    @classmethod
    def error(
        cls, status: int, reason: str, detail: str, headers: dict[str, str] | None = None
    ) -> Answer:
        return cls.json(status, {"error": reason, "detail": detail}, headers)

    def head(self, request_id: bytes) -> list[tuple[bytes, bytes]]:
        head = [*self.headers, (b"content-length", b"%d" % len(self.body))]
        if self.body:
            head.append((b"content-type", b"application/json"))
        head.append((b"x-request-id", request_id))
        return head


def unavailable(reason: str = "inbox_unavailable") -> Answer:
    # Even a body that will be refused is kept first: when it cannot be, the sender is
    # asked to send it again rather than have it vanish. `relay_unavailable`: the broker
    # did not confirm it (relay mode).
    return Answer.error(
        503, reason, "the callback could not be stored; send it again", {"retry-after": RETRY_AFTER}
    )


def busy(detail: str) -> Answer:
    return Answer.error(503, "busy", f"{detail}; send again", {"retry-after": RETRY_AFTER})


def _read_head(scope: Scope) -> tuple[str, dict[str, str], str | None]:
    """In one pass over the raw ASGI headers (cheaper than Request.headers): the request
    id (the sender's X-Request-Id when fit to echo, else a new one), the headers kept
    with a callback, the user agent logged."""
    request_id: str | None = None
    kept: dict[str, str] = {}
    agent: str | None = None
    for name, value in scope["headers"]:
        if name in _RAW_HEADERS_OF_INTEREST:
            kept[name.decode()] = value[:MAX_KEPT_HEADER_BYTES].decode("latin-1")
            if agent is None and name == b"user-agent":
                agent = value[:200].decode("latin-1")
        elif request_id is None and name == b"x-request-id":
            request_id = _valid_request_id(value)
    return request_id or new_id(), kept, agent


async def json_http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (404, 405) with the JSON body of every other error."""
    assert isinstance(exc, HTTPException)
    reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JsonResponse(
        {"error": reason, "detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
    )


class Callbacks:
    """`POST /callbacks[/<token>]` as a bare ASGI endpoint: the one route under load
    needs none of Starlette's layers (middleware, Request, Response, exception
    handling), and costs about a third of the CPU without them (bench/stages.py). What
    `RequestContext` does for the other routes it does itself: the request id bound to
    the log context once, echoed back, and the access log line."""

    def __init__(self, service: Backend) -> None:
        config = service.config
        self._senders = SenderAuth(config.http)
        self._admission = Admission(config.http.max_inflight_bytes, config.http.admission_wait)
        self._large_bodies = Slots(config.http.max_large_requests)
        self._no_room = (
            f"no room for this callback within {config.http.admission_wait:g} s"
            " (too many in progress)"
        )
        self._max_bytes = config.limits.max_bytes
        self._ingestor, self._metrics = service.ingestor, service.metrics
        self._access_log = config.http.access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send, token: str | None) -> None:
        began = time.perf_counter()
        request_id, headers, agent = _read_head(scope)
        status = 500
        bound = structlog.contextvars.bind_contextvars(request_id=request_id)
        started = False
        route = "/callbacks" if token is None else "/callbacks/{token}"
        span = tracing.receiving_http(scope, route, headers, agent)
        try:
            answer = await self._answer(scope, receive, token, request_id, headers, span.carrier())
            status = answer.status
            started = True
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": answer.head(request_id.encode()),
                }
            )
            await send({"type": "http.response.body", "body": answer.body})
        except Exception:
            # As Starlette's ServerErrorMiddleware: a plain 500 (unless the answer had
            # begun), then the error goes on up.
            if started:
                raise
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-length", b"%d" % len(_SERVER_ERROR)),
                        (b"content-type", b"text/plain; charset=utf-8"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": _SERVER_ERROR})
            raise
        finally:
            if self._access_log:  # inside the span: the line carries its trace id
                log_request(scope, route, status, began, agent)
            span.http_status(status)
            span.end()
            structlog.contextvars.reset_contextvars(**bound)

    async def _answer(
        self,
        scope: Scope,
        receive: Receive,
        token: str | None,
        request_id: str,
        headers: dict[str, str],
        trace: dict[str, str],
    ) -> Answer:
        """`trace`: the W3C fields of the request's span, kept with the callback."""
        refusal = self._senders.check(scope, token)
        if refusal is not None:
            self._metrics.series(self._metrics.callbacks, "http", refusal.reason).inc()
            return Answer.error(refusal.status, refusal.reason, refusal.detail, refusal.headers)
        receipt = Receipt(
            body=b"",
            source="http",
            received_at=datetime.now(timezone.utc),
            request_id=request_id,
            headers=headers,
            source_meta={"request_id": request_id, **trace},
        )
        max_bytes = self._max_bytes
        declared = headers.get("content-length", "")
        size = int(declared) if declared.isdigit() else None
        if size is not None and size > max_bytes:
            return await self._refuse(receipt, size=size)
        large = size is not None and size > LARGE_BODY_BYTES
        if large and not self._large_bodies.take():
            return self._busy("too many large callbacks in progress")
        ticket = None
        body: bytes | bytearray = b""
        try:
            ticket = await self._admission.enter(size or 0)
            if ticket is None:
                return self._busy(self._no_room)
            # A chunked body (no Content-Length) is admitted as it is read, within the wait.
            grow_until = 0.0 if size is not None else time.monotonic() + self._admission.wait
            more = True
            while more:  # as Starlette's Request.stream()
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect
                if message["type"] != "http.request":
                    continue
                more = message.get("more_body", False)
                chunk = message.get("body", b"")
                if not chunk:
                    continue
                if body:
                    if not isinstance(body, bytearray):
                        body = bytearray(body)
                    body += chunk
                else:  # the whole body in one message, usually: kept without a copy
                    body = chunk
                if size is None:
                    if not await self._admission.grow(ticket, len(chunk), deadline=grow_until):
                        return self._busy(self._no_room)
                    if not large and len(body) > LARGE_BODY_BYTES:
                        large = self._large_bodies.take()
                        if not large:
                            return self._busy("too many large callbacks in progress")
                if len(body) > max_bytes:
                    receipt.body = bytes(body)
                    return await self._refuse(receipt, size=len(body))
            receipt.body = bytes(body)
            body = b""  # one copy held while the callback waits for its commit
            return await self._ingest(receipt)
        except ClientDisconnect:
            logger.info("client went away before sending the whole body", received=len(body))
            return Answer(400, b"", [])
        finally:  # also when the request is cancelled (the server stopping)
            if ticket is not None:
                self._admission.leave(ticket)
            if large:
                self._large_bodies.give_back()

    def _busy(self, detail: str) -> Answer:
        self._metrics.series(self._metrics.callbacks, "http", "busy").inc()
        return busy(detail)

    async def _ingest(self, receipt: Receipt) -> Answer:
        try:
            stored = await self._ingestor.ingest(receipt)
        except PayloadError as exc:
            return Answer.error(400, exc.reason, exc.message)
        except IntakeUnavailable as exc:  # a refused body not kept, a broker away, ...
            return unavailable(exc.reason)
        except Exception:
            logger.exception("cannot commit the callback to the inbox")
            return unavailable()
        return Answer.json(
            200,
            {
                "accepted": len(stored.new),
                "duplicates": len(stored.duplicates),
                "ids": stored.ids,
            },
        )

    async def _refuse(self, receipt: Receipt, *, size: int) -> Answer:
        max_bytes = self._max_bytes
        too_large = PayloadError("too_large", f"the body is over the {max_bytes}-byte limit")
        try:
            await self._ingestor.reject(receipt, too_large, size=size)  # kept, or counted
        except RejectionNotKept as exc:
            return unavailable(exc.reason)
        return Answer.error(413, too_large.reason, too_large.message)


class PublicApp:
    """The public port's app: `POST /callbacks[/<token>]` straight to `Callbacks`,
    everything else (health, readiness, 404s, 405s, redirects) to Starlette."""

    def __init__(self, callbacks: Callbacks, rest: ASGIApp) -> None:
        self._callbacks = callbacks
        self._rest = rest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _CALLBACK_PATH.match(scope["path"])
            if match is not None:
                await self._callbacks(scope, receive, send, match["token"])
                return
        await self._rest(scope, receive, send)


async def _served_by_callbacks(request: Request) -> Response:
    raise AssertionError("POST /callbacks is served by `Callbacks`, before Starlette")


def ready_or_not(ready: bool) -> Response:
    """/readyz as a load balancer or a probe sees it: ready or not, and no more (the
    details, inbox, handlers, broker, are for the admin listener's credentials)."""
    if ready:
        return JsonResponse({"ready": True})
    return JsonResponse({"ready": False}, status_code=503, headers={"retry-after": "5"})


def create_app(service: Backend) -> PublicApp:
    async def healthz(request: Request) -> Response:
        return JsonResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ready, _ = await service.readiness()
        return ready_or_not(ready)

    rest = Starlette(
        routes=[
            # The callback paths stay known here, for Starlette to answer their other
            # methods (405) and their trailing slashes (a redirect) as it always has.
            Route("/callbacks", _served_by_callbacks, methods=["POST"]),
            Route("/callbacks/{token}", _served_by_callbacks, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
        ],
        exception_handlers={HTTPException: json_http_error},
    )
    rest.add_middleware(RequestContext, access_log=service.config.http.access_log)
    return PublicApp(Callbacks(service), rest)


class RequestContext:
    """Give every request an id (its `X-Request-Id`, or a new one), bind it to the log
    context of everything the request does, echo it back, and log the request: the route
    it took (never the path a token is in), the client (behind trusted proxies, the one
    they name) and its user agent."""

    def __init__(self, app: ASGIApp, *, access_log: bool) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id, _, agent = _read_head(scope)
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
                    log_request(scope, logged_path(scope), status, began, agent)


def log_request(scope: Scope, path: str, status: int, began: float, agent: str | None) -> None:
    """The access log line: the route (never a token), the status, the time it took, the
    client (behind trusted proxies, the one they name) and its user agent."""
    logger.info(
        "request",
        method=scope["method"],
        path=path,
        status=status,
        ms=round((time.perf_counter() - began) * 1000, 2),
        client=client_address(scope),
        user_agent=agent,
    )


def logged_path(scope: Scope) -> str:
    """The route template a request matched (`/callbacks/{token}`); for one that matched
    none, its path with every segment but the known words masked."""
    route = scope.get("route")
    if route is not None:
        return str(route.path)
    return "/".join(
        part if not part or part.lower() in _LOGGED_SEGMENTS else "***"
        for part in scope["path"].split("/")
    )


def _valid_request_id(value: bytes) -> str | None:
    """A sender's X-Request-Id, if fit to be echoed and logged."""
    if 0 < len(value) <= 64 and value.isascii():
        text = value.decode()
        if text.isprintable():
            return text
    return None
