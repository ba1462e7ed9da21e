"""How the inspector's pages are rendered: the Jinja2 environment (autoescaping
everything, failing on a name it does not know), the filters that write times, sizes
and durations, and the headers every page carries."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timezone, tzinfo
from functools import wraps
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from handlers.message import verdict
from receiver.admin.guard import CSRF_FIELD, csrf_token, keep_csrf_token
from receiver.admin.inspection import Inspection, NotAvailable
from receiver.admin.params import BadRequest
from receiver.admin.pretty import pretty
from receiver.callback import matching, vocabulary
from receiver.config import Config
from receiver.inbox import RUN_STATUSES, InboxUnavailable
from receiver.timezones import parse_timezone

PREFIX = "/inspector"
ZONE_COOKIE = "ci_receiver_zone"
HEADERS = {
    # Nothing runs, nothing loads from elsewhere, nothing frames these pages, and forms
    # post only here: even a value that escaped its escaping could do nothing.
    "content-security-policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self';"
        " frame-ancestors 'none'; base-uri 'none'"
    ),
    "cache-control": "no-store",
    # Not no-referrer: with it, a browser sends `Origin: null` and the forms look foreign.
    "referrer-policy": "same-origin",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
}

Endpoint = Callable[[Request], Awaitable[Response]]


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("receiver.admin", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        when=_when,
        segment=lambda value: quote(str(value), safe=""),
        size=_size,
        ago=_ago,
        ms=lambda delta: f"{delta.total_seconds() * 1000:,.0f} ms",
        pretty=pretty,
        text=lambda body: body.decode("utf-8", "replace"),
    )
    env.globals.update(
        prefix=PREFIX,
        statuses=RUN_STATUSES,
        url_query=urlencode,
        verdict=verdict,
        verdict_of=matching.verdict,
        vocabulary=vocabulary,
    )
    return env


class Pages:
    """Renders a page for a request: its time zone, its form token, the headers."""

    def __init__(self, inspection: Inspection, config: Config) -> None:
        self.env = environment()
        self.inspection = inspection
        self.local_name = config.log.timezone
        self.zones: dict[str, tzinfo] = {"utc": timezone.utc}
        if config.log.timezone.upper() != "UTC":
            self.zones["local"] = parse_timezone(config.log.timezone)

    def zone_choice(self, request: Request) -> str:
        chosen = request.cookies.get(ZONE_COOKIE, "local")
        return chosen if chosen in self.zones else "utc"

    def zone(self, request: Request) -> tzinfo:
        return self.zones[self.zone_choice(request)]

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        token = csrf_token(request)
        context.setdefault("section", None)
        page = self.env.get_template(name).render(
            request=request,
            path=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            zone=self.zone(request),
            zone_choice=self.zone_choice(request),
            local_name=self.local_name if "local" in self.zones else None,
            csrf_field=CSRF_FIELD,
            csrf=token,
            may_write=request.state.access == "write",
            handler_names=self.inspection.handler_names,
            **context,
        )
        response = HTMLResponse(page, status_code=status, headers=HEADERS)
        keep_csrf_token(response, request, token)
        return response

    def page(self, endpoint: Endpoint) -> Endpoint:
        """Refusals as pages: a bad parameter, nothing to inspect in this process, the
        inbox away (503, since when)."""

        @wraps(endpoint)
        async def answer(request: Request) -> Response:
            try:
                return await endpoint(request)
            except BadRequest as exc:
                return self.render(request, "message.html", exc.status, title="Not so",
                                   message=exc.detail)  # fmt: skip
            except NotAvailable as exc:
                return self.render(request, "message.html", 404, title="Nothing to inspect",
                                   message=str(exc))  # fmt: skip
            except InboxUnavailable as exc:
                return self.render(request, "unreachable.html", 503, message=str(exc),
                                   since=exc.since)  # fmt: skip

        return answer


def _when(moment: datetime | None, zone: tzinfo) -> str:
    return "" if moment is None else f"{moment.astimezone(zone):%Y-%m-%d %H:%M:%S}"


def _ago(moment: datetime | None) -> str:
    """`3 min ago`, `in 20 s`: how far a moment is from now."""
    if moment is None:
        return ""
    seconds = (datetime.now(timezone.utc) - moment).total_seconds()
    span = _span(abs(seconds))
    return f"{span} ago" if seconds >= 0 else f"in {span}"


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    if count < 1 << 20:
        return f"{count / 1024:.1f} KiB"
    return f"{count / (1 << 20):.1f} MiB"
