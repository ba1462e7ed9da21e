"""What the admin API and the inspector pages take from a request, validated: a bad
parameter is a `BadRequest` naming it and why (a 400), never an error further in.

Filters take the names of the CLI's options (`job`, not `job_id`); an empty value is no
value (an HTML form sends every field); a name given twice, or one not known, is refused,
so that a typing mistake is not silently a filter that selects everything.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from starlette.datastructures import QueryParams

from receiver.callback.matching import FIELDS
from receiver.config import parse_moment
from receiver.inbox import EventFilter, RunStatus

MAX_LIMIT = 500
# Cursors are sequence numbers and ids: the databases' 64-bit integers.
MAX_CURSOR = (1 << 63) - 1
# Longer than any value a callback's field can hold (ids are at most 256 characters).
MAX_TEXT = 1024

Text = Annotated[
    str, Field(min_length=1, max_length=MAX_TEXT), AfterValidator(lambda value: _no_nul(value))
]
Moment = Annotated[datetime, BeforeValidator(lambda value: _moment(value))]

Model = TypeVar("Model", bound=BaseModel)


class BadRequest(Exception):
    """A parameter that cannot be used: `detail` says which and why."""

    def __init__(self, detail: str, status: int = 400) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Filter(Strict):
    """Which events: every field given must match (as `EventFilter`), as a route's key
    of its name matches (without regard to case; `tag` takes an event name too); a
    kind, state or verdict CI never sends is refused, since it could never match."""

    kind: Annotated[Text, AfterValidator(FIELDS["kind"].spell)] | None = None
    event_name: Text | None = None
    tag: Text | None = None
    state: Annotated[Text, AfterValidator(FIELDS["state"].spell)] | None = None
    verdict: Annotated[Text, AfterValidator(FIELDS["verdict"].spell)] | None = None
    job: Text | None = None
    bucket: Text | None = None
    key: Text | None = None
    status: RunStatus | None = None
    handler: Text | None = None
    since: Moment | None = None
    until: Moment | None = None

    def event_filter(self) -> EventFilter:
        if self.since and self.until and self.since >= self.until:
            raise BadRequest("until: must be later than since")
        fields = self.model_dump(include=set(Filter.model_fields) - {"job"})
        return EventFilter(job_id=self.job, **fields)

    def query(self) -> dict[str, str]:
        """The filter as query parameters again (for the links of the next page)."""
        found = {}
        for name, value in self.model_dump(exclude_defaults=True).items():
            found[name] = value.isoformat() if isinstance(value, datetime) else str(value)
        return found


Cursor = Annotated[int, Field(ge=1, le=MAX_CURSOR)]


class EventsQuery(Filter):
    limit: int = Field(50, ge=1, le=MAX_LIMIT)
    before: Cursor | None = None


class JobQuery(EventsQuery):
    """A job's events: all of them at once, as a rule (a job has a handful)."""

    limit: int = Field(MAX_LIMIT, ge=1, le=MAX_LIMIT)


class Page(Strict):
    limit: int = Field(50, ge=1, le=MAX_LIMIT)
    before: Cursor | None = None


class NoParameters(Strict):
    pass


class ReplayRequest(Strict):
    """`POST /api/replay`: what `ci-receiver replay` takes, as JSON."""

    events: list[Text] = Field([], max_length=10_000)
    all: bool = False
    filter: Filter | None = None
    dead: bool = False
    handlers: list[Text] = Field([], max_length=100)
    ignore_routes: bool = False
    dry_run: bool = False


def text_param(name: str, value: str) -> str:
    """A value from a path (an event id, a job id), checked as a filter's text is."""
    found: str = getattr(validated(Filter, {name: value}), name)
    return found


def from_query(model: type[Model], params: QueryParams, ignore: tuple[str, ...] = ()) -> Model:
    """The model from a query string; `ignore`: names a page uses for itself."""
    values: dict[str, str] = {}
    for name, value in params.multi_items():
        if name in ignore:
            continue
        if name in values:
            raise BadRequest(f"{name}: given more than once")
        if value != "":
            values[name] = value
    return validated(model, values)


def validated(model: type[Model], values: Any) -> Model:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise BadRequest(_describe(exc)) from None


def _describe(error: ValidationError) -> str:
    problems = []
    for problem in error.errors(include_url=False):
        where = ".".join(str(part) for part in problem["loc"]) or "body"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "not a parameter this takes"
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("a NUL character is in no stored value")
    return value


def _moment(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("a time is a string: ISO 8601, or a duration back such as 24h")
    return parse_moment(value)
