"""The inspector: pages under /inspector on the admin listener, rendered by the server
from the Jinja2 templates beside this file, with no script at all (forms and links;
the charts are inline SVG). Everything shown is escaped (callbacks' values are whatever
a sender wrote), and the pages forbid scripts, frames and outside resources outright.

Replaying is a form: it needs credentials that may write, a page of the inspector's own
(see `guard.py`), and answers with a redirect back to a page that says what was queued.
"""

from __future__ import annotations

from datetime import datetime, timezone
from urllib.parse import parse_qsl, quote, urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from receiver import tracing
from receiver.admin import charts
from receiver.admin.guard import CSRF_FIELD, csrf_valid, replay_refusal
from receiver.admin.inspection import Inspection
from receiver.admin.params import (
    BadRequest,
    EventsQuery,
    JobQuery,
    Page,
    ReplayRequest,
    Strict,
    Text,
    from_query,
    text_param,
    validated,
)
from receiver.admin.rendering import HEADERS, PREFIX, ZONE_COOKIE, Pages
from receiver.callback import vocabulary
from receiver.config import Config
from receiver.inbox import EventFilter, Inbox
from receiver.upkeep import presence

PREVIEW_BYTES = 512
MAX_FORM_BYTES = 16384


def _recent(name: str, value: str) -> str:
    """The events page of the last 24 hours' events whose `name` is `value`."""
    return f"{PREFIX}/events?" + urlencode({name: value, "since": "24h"})


class DetailPage(Strict):
    replayed: int | None = None


class DeadPage(Page):
    handler: Text | None = None
    replayed: int | None = None  # runs just queued again, said on the page


class ZoneChoice(Strict):
    zone: str
    next: str = PREFIX


def inspector_routes(inspection: Inspection, config: Config) -> list[BaseRoute]:
    pages = Pages(inspection, config)

    def inbox() -> Inbox:
        return inspection.inbox  # raises NotAvailable in relay mode

    async def overview(request: Request) -> Response:
        from_query(Strict, request.query_params)
        found = await inspection.overview()
        zone = pages.zone(request)
        # Every whole minute since, and the one under way.
        steps = int((datetime.now(timezone.utc) - found.since).total_seconds() // 60) + 1
        totals = {outcome: 0 for outcome, _ in charts.OUTCOMES}
        for _, outcome, count in found.traffic.callbacks:
            totals[outcome] = totals.get(outcome, 0) + count
        dead = {h.name: h.dead for h in found.handlers if h.dead}
        return pages.render(
            request,
            "overview.html",
            section="overview",
            overview=found,
            totals=totals,
            outcomes=charts.OUTCOMES,
            chart=charts.traffic_chart(found.traffic, found.since, steps, zone),
            states=charts.bars(found.traffic.states),
            tags=charts.bars(found.traffic.tags),
            verdicts=charts.bars(found.traffic.verdicts),
            dead_bars=charts.bars(dead),
            pending=sum(h.pending for h in found.handlers),
            dead_total=sum(dead.values()),
            # An event without a state CI sends (none, or one CI's documents do not list),
            # or whose tag is its kind (it has neither tag nor event name), is in a bar no
            # filter selects.
            state_link=lambda state: (
                _recent("state", state) if state in vocabulary.STATES else None
            ),
            tag_link=lambda tag: None if tag in vocabulary.KINDS else _recent("tag", tag),
            verdict_link=lambda verdict: _recent("verdict", verdict),
            dead_link=lambda name: f"{PREFIX}/dead?" + urlencode({"handler": name}),
        )

    async def events(request: Request) -> Response:
        query = from_query(EventsQuery, request.query_params)
        found = await inbox().events(query.event_filter(), limit=query.limit, before=query.before)
        filters = query.query()
        filters.pop("before", None)
        older = found[-1].seq if len(found) == query.limit else None
        return pages.render(
            request, "events.html", section="events", events=found, query=query,
            filters=filters, older=older,
        )  # fmt: skip

    async def event(request: Request) -> Response:
        flash = from_query(DetailPage, request.query_params)
        event_id = request.path_params["event_id"]
        detail = await inbox().event(event_id)
        if detail is None:
            raise BadRequest(f"No event {event_id!r} is stored.", status=404)
        receipt = await inbox().receipt(detail.receipt_id)
        # The trace it was received in (stored with it when tracing was on), linked when
        # the sampler kept it.
        trace = tracing.trace_of(detail.event.source_meta)
        names = await presence.names(inbox(), detail.runs)
        running = {
            run.handler: presence.holder(run, names)
            for run in detail.runs
            if run.leased_by is not None
        }
        return pages.render(
            request, "event.html", section="events", detail=detail, event=detail.event,
            receipt=receipt, replayed=flash.replayed, running=running,
            waiting=any(run.status == "pending" for run in detail.runs),
            trace=trace, trace_link=trace and trace[1] and config.otel.link(trace[0]),
        )  # fmt: skip

    async def job(request: Request) -> Response:
        job_id = text_param("job", request.path_params["job_id"])
        query = from_query(JobQuery, request.query_params, ignore=("job",))
        chosen = query.event_filter()
        chosen.job_id = job_id
        found = await inbox().events(chosen, limit=query.limit, before=query.before)
        earlier = found[-1].seq if len(found) == query.limit else None
        return pages.render(
            request, "job.html", section="events", job_id=job_id,
            events=list(reversed(found)), earlier=earlier,
        )  # fmt: skip

    async def dead(request: Request) -> Response:
        query = from_query(DeadPage, request.query_params)
        handlers = [h for h in await inspection.handlers() if h.dead]
        chosen = query.handler or (handlers[0].name if handlers else None)
        found = []
        if chosen is not None:
            found = await inbox().events(
                EventFilter(status="dead", handler=chosen), limit=query.limit, before=query.before
            )
        older = found[-1].seq if len(found) == query.limit else None
        return pages.render(
            request, "dead.html", section="dead", handlers=handlers, chosen=chosen,
            events=found, older=older, replayed=query.replayed,
            last_errors={h.name: await inspection.last_error(h.name) for h in handlers},
        )  # fmt: skip

    async def confirm_dead(request: Request) -> Response:
        query = from_query(DeadPage, request.query_params)
        handler = _replayable_handler(inspection, query.handler)
        backlog = (await inbox().backlog()).get(handler)
        return pages.render(
            request, "confirm.html", section="dead", handler=handler,
            count=backlog.dead if backlog else 0,
        )  # fmt: skip

    async def replay_dead(request: Request) -> Response:
        form = await _replay_form(request)
        handler = _replayable_handler(inspection, form.get("handler"))
        chosen = validated(ReplayRequest, {"dead": True, "handlers": [handler]})
        done = await inspection.replay(chosen)
        return _see(f"{PREFIX}/dead?" + urlencode({"handler": handler, "replayed": done.runs}))

    async def replay_event(request: Request) -> Response:
        form = await _replay_form(request)
        event_id = form.get("event")
        if not isinstance(event_id, str) or not event_id:
            raise BadRequest("event: which event to replay")
        handler = form.get("handler") or None
        handlers = [_replayable_handler(inspection, handler)] if handler else []
        # Validated as the API's body is: an id too long or holding a NUL is a 400, not a 500.
        chosen = validated(ReplayRequest, {"events": [event_id], "handlers": handlers})
        done = await inspection.replay(chosen)
        return _see(f"{PREFIX}/events/{quote(event_id, safe='')}?replayed={done.runs}")

    async def refused(request: Request) -> Response:
        page = from_query(Page, request.query_params)
        found = await inbox().rejected(limit=page.limit, before=page.before, preview=PREVIEW_BYTES)
        older = found[-1].id if len(found) == page.limit else None
        return pages.render(
            request, "refused.html", section="refused", receipts=found, older=older,
            limit=page.limit, preview_bytes=PREVIEW_BYTES,
        )  # fmt: skip

    async def choose_zone(request: Request) -> Response:
        choice = from_query(ZoneChoice, request.query_params)
        if choice.zone not in pages.zones:
            raise BadRequest(f"zone: {choice.zone!r} is not one of {', '.join(pages.zones)}")
        # Back to a page of the inspector only: this is no redirect to anywhere else.
        target = choice.next if choice.next.startswith(PREFIX) else PREFIX
        response = _see(target)
        response.set_cookie(ZONE_COOKIE, choice.zone, samesite="strict", path="/",
                            max_age=400 * 86400)  # fmt: skip
        return response

    async def home(request: Request) -> Response:
        return _see(PREFIX)

    page = pages.page
    return [
        Route("/", home, methods=["GET"]),
        Route(PREFIX, page(overview), methods=["GET"]),
        Route(f"{PREFIX}/events", page(events), methods=["GET"]),
        Route(f"{PREFIX}/events/{{event_id:path}}", page(event), methods=["GET"]),
        Route(f"{PREFIX}/jobs/{{job_id:path}}", page(job), methods=["GET"]),
        Route(f"{PREFIX}/dead", page(dead), methods=["GET"]),
        Route(f"{PREFIX}/dead/replay", page(confirm_dead), methods=["GET"]),
        Route(f"{PREFIX}/dead/replay", page(replay_dead), methods=["POST"]),
        Route(f"{PREFIX}/replay", page(replay_event), methods=["POST"]),
        Route(f"{PREFIX}/refused", page(refused), methods=["GET"]),
        Route(f"{PREFIX}/zone", page(choose_zone), methods=["GET"]),
        Mount(f"{PREFIX}/static", StaticFiles(packages=[("receiver.admin", "static")])),
    ]


def _see(target: str) -> Response:
    """To the page that shows what was done (POST, then GET: a reload does not repeat)."""
    return RedirectResponse(target, status_code=303, headers=HEADERS)


def _replayable_handler(inspection: Inspection, name: object) -> str:
    if not isinstance(name, str) or name not in inspection.handler_names:
        known = ", ".join(inspection.handler_names)
        raise BadRequest(f"handler: {name!r} is not a configured handler (known: {known})")
    return name


async def _replay_form(request: Request) -> dict[str, str]:
    """The fields of a replay form, once it is sure the inspector's own page sent it
    with credentials that may write."""
    reason = replay_refusal(request)
    if reason is not None:
        raise BadRequest(f"Refused: {reason}.", status=403)
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind != "application/x-www-form-urlencoded":
        raise BadRequest("Send the inspector's form.", status=415)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise BadRequest("The form is too large.", status=413)
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=True,
                          max_num_fields=10)  # fmt: skip
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("The form cannot be read.") from None
    form = dict(pairs)
    if not csrf_valid(request, form.get(CSRF_FIELD)):
        raise BadRequest(
            "The form's token does not match: reload the page and try again.", status=403
        )
    return form
