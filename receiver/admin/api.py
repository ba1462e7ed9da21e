"""The JSON admin API, under /api on the admin listener (with `[admin] inspector = true`).

Everything `ci-receiver events` and `ci-receiver replay` do, for scripts: lists page by
cursor (`next` is the URL of the next page, null after the last), every parameter is
checked (a 400 says which and why), and the records have the shapes `--json` prints.
Replaying needs credentials that may write (`admin.token` / `admin.basic_auth`, or an
open loopback listener) and a JSON body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import wraps

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from receiver.admin.guard import replay_refusal
from receiver.admin.inspection import HandlerState, Inspection, NotAvailable
from receiver.admin.params import (
    MAX_CURSOR,
    BadRequest,
    EventsQuery,
    JobQuery,
    NoParameters,
    Page,
    ReplayRequest,
    from_query,
    text_param,
    validated,
)
from receiver.inbox import InboxUnavailable
from receiver.inbox.as_json import detail_json, rejected_json, summary_json
from receiver.ingest.ingest import IntakeUnavailable
from receiver.sources.http import JsonResponse, error
from receiver.upkeep import presence

# A replay request names at most 10,000 events: well under this.
MAX_BODY_BYTES = 1 << 20
# The reasons of refusals with a status of their own.
REASONS = {
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "undecodable",
}

Endpoint = Callable[[Request], Awaitable[Response]]
# Seconds to wait before asking again while the inbox is away, as /readyz says.
RETRY_AFTER = "5"


def json_answers(endpoint: Endpoint) -> Endpoint:
    """Refusals as JSON errors: a bad parameter (400, or its own status), nothing to
    inspect in this process (404), the inbox away (503, with since when)."""

    @wraps(endpoint)
    async def answer(request: Request) -> Response:
        try:
            response = await endpoint(request)
        except BadRequest as exc:
            return error(exc.status, REASONS.get(exc.status, "bad_request"), exc.detail)
        except NotAvailable as exc:
            return error(404, "not_available", str(exc))
        except InboxUnavailable as exc:
            return _unavailable("inbox_unavailable", exc, exc.since)
        except IntakeUnavailable as exc:  # a callback decoded again, not taken now
            return _unavailable(exc.reason, exc, None)
        response.headers["cache-control"] = "no-store"
        response.headers["x-content-type-options"] = "nosniff"
        return response

    return answer


def _unavailable(reason: str, exc: Exception, since: datetime | None) -> JsonResponse:
    """503 + Retry-After: the inbox away (since when, if known), or the callback not taken."""
    return JsonResponse(
        {"error": reason, "detail": str(exc), "since": since.isoformat() if since else None},
        status_code=503,
        headers={"retry-after": RETRY_AFTER},
    )


def api_routes(inspection: Inspection) -> list[BaseRoute]:
    async def overview(request: Request) -> Response:
        from_query(NoParameters, request.query_params)
        found = await inspection.overview()
        traffic = found.traffic
        totals: dict[str, int] = {}
        for _, outcome, count in traffic.callbacks:
            totals[outcome] = totals.get(outcome, 0) + count
        return JsonResponse(
            {
                "since": found.since.isoformat(),
                "step": traffic.step,
                "callbacks": [
                    {"at": at.isoformat(), "outcome": outcome, "count": count}
                    for at, outcome, count in traffic.callbacks
                ],
                "totals": totals,
                "tags": traffic.tags,
                "states": traffic.states,
                "verdicts": traffic.verdicts,
                "handlers": [_handler_json(h) for h in found.handlers],
            }
        )

    async def handlers(request: Request) -> Response:
        from_query(NoParameters, request.query_params)
        return JsonResponse({"handlers": [_handler_json(h) for h in await inspection.handlers()]})

    async def events(request: Request) -> Response:
        query = from_query(EventsQuery, request.query_params)
        found = await inspection.inbox.events(
            query.event_filter(), limit=query.limit, before=query.before
        )
        following = found[-1].seq if len(found) == query.limit else None
        return JsonResponse(
            {"events": [summary_json(s) for s in found], "next": _next(request, following)}
        )

    async def event(request: Request) -> Response:
        event_id = request.path_params["event_id"]
        detail = await inspection.inbox.event(event_id)
        if detail is None:
            raise BadRequest(f"no event {event_id!r}", status=404)
        names = await presence.names(inspection.inbox, detail.runs)
        return JsonResponse(detail_json(detail, names))

    async def job(request: Request) -> Response:
        job_id = text_param("job", request.path_params["job_id"])
        query = from_query(JobQuery, request.query_params, ignore=("job",))
        chosen = query.event_filter()
        chosen.job_id = job_id
        found = await inspection.inbox.events(chosen, limit=query.limit, before=query.before)
        earlier = found[-1].seq if len(found) == query.limit else None
        return JsonResponse(
            {
                "job_id": job_id,
                "events": [summary_json(s) for s in reversed(found)],  # in order
                "earlier": _next(request, earlier),
            }
        )

    async def refused(request: Request) -> Response:
        page = from_query(Page, request.query_params)
        found = await inspection.inbox.rejected(limit=page.limit, before=page.before)
        following = found[-1].id if len(found) == page.limit else None
        return JsonResponse(
            {"refused": [rejected_json(r) for r in found], "next": _next(request, following)}
        )

    async def receipt(request: Request) -> Response:
        receipt_id = _receipt_id(request)
        found = await inspection.inbox.receipt(receipt_id)
        if found is None:
            raise BadRequest(f"no receipt {receipt_id}", status=404)
        return JsonResponse(
            {
                "id": receipt_id,
                "source": found.source,
                "received_at": found.received_at.isoformat(),
                "request_id": found.request_id or None,
                "headers": found.headers,
                "source_meta": found.source_meta,
                "size": found.cut_from if found.cut_from is not None else len(found.body),
                "kept": len(found.body),
                "body": f"/api/receipts/{receipt_id}/body",
            }
        )

    async def receipt_body(request: Request) -> Response:
        receipt_id = _receipt_id(request)
        found = await inspection.inbox.receipt(receipt_id)
        if found is None:
            raise BadRequest(f"no receipt {receipt_id}", status=404)
        suffix = {b"<": "xml", b"{": "json", b"[": "json"}.get(found.body.lstrip()[:1], "bin")
        return Response(
            found.body,
            media_type="application/octet-stream",  # never rendered by a browser
            headers={
                "content-disposition": f'attachment; filename="receipt-{receipt_id}.{suffix}"'
            },
        )

    async def replay(request: Request) -> Response:
        await _may_write(request)
        body = validated(ReplayRequest, await _json_body(request))
        done = await inspection.replay(body)
        return JsonResponse(
            {
                "events": done.events,
                "runs": done.runs,
                "dry_run": body.dry_run,
                "unrouted": {name: count for name, count in done.unrouted.items() if count},
                "unrun": done.unrun,
            }
        )

    async def replay_receipt(request: Request) -> Response:
        await _may_write(request)
        receipt_id = _receipt_id(request)
        stored = await inspection.replay_receipt(receipt_id)
        return JsonResponse({"ids": stored.ids, "new": stored.new, "duplicates": stored.duplicates})

    return [
        Route("/api/overview", json_answers(overview), methods=["GET"]),
        Route("/api/handlers", json_answers(handlers), methods=["GET"]),
        Route("/api/events", json_answers(events), methods=["GET"]),
        Route("/api/events/{event_id:path}", json_answers(event), methods=["GET"]),
        Route("/api/jobs/{job_id:path}", json_answers(job), methods=["GET"]),
        Route("/api/refused", json_answers(refused), methods=["GET"]),
        Route("/api/receipts/{receipt_id}", json_answers(receipt), methods=["GET"]),
        Route("/api/receipts/{receipt_id}/body", json_answers(receipt_body), methods=["GET"]),
        Route("/api/replay", json_answers(replay), methods=["POST"]),
        Route("/api/receipts/{receipt_id}/replay", json_answers(replay_receipt), methods=["POST"]),
    ]


def _handler_json(handler: HandlerState) -> dict[str, object]:
    return {
        "name": handler.name,
        "status": handler.status,
        "started": handler.started,
        "pending": handler.pending,
        "dead": handler.dead,
        "oldest_due": handler.oldest_due.isoformat() if handler.oldest_due else None,
    }


def _next(request: Request, before: int | None) -> str | None:
    if before is None:
        return None
    url = request.url.include_query_params(before=before)
    return f"{url.path}?{url.query}"


def _receipt_id(request: Request) -> int:
    text = request.path_params["receipt_id"]
    if not (text.isascii() and text.isdigit() and 0 < int(text) <= MAX_CURSOR):
        raise BadRequest(f"receipt id: {text!r} is not a receipt's number")
    return int(text)


async def _may_write(request: Request) -> None:
    reason = replay_refusal(request)
    if reason is not None:
        raise BadRequest(reason, status=403)
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise BadRequest("send the request as JSON (Content-Type: application/json)", status=415)


async def _json_body(request: Request) -> object:
    import orjson

    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(f"the body is over {MAX_BODY_BYTES} bytes", status=413)
    try:
        return orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
