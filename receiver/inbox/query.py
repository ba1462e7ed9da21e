"""The inbox's SQL, written once for both backends.

Each function here writes one statement (its text and its arguments) on a `Sql`, which
marks parameters as the backend's `Dialect` does: `?` for SQLite, `$n` for PostgreSQL.
Where the two truly differ, the dialect says it in one named place: how a list of values
is matched, what "now" is (this host's clock for SQLite, whose times are seconds since
the epoch; the database's for PostgreSQL, whose are timestamptz), how a glob matches, a
body's length, a whole number of steps since the epoch, and how a write wakes the other
processes. What a backend does alone (PostgreSQL's one-statement store and batched
outcomes, SQLite's claim by rowid) is in its connector.

The rules that put these statements together (what a requeue selects, what retention
removes and in which order, ...) are in `manager.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

import orjson

from receiver.inbox.records import EVENT_COLUMNS, as_datetime
from receiver.inbox.types import (
    VERIFY_RUN,
    Backlog,
    EventFilter,
    Receipt,
    ReceiptOutcome,
    RunStatus,
)

T = TypeVar("T")

# An event with such a run is kept by retention, and so is the body it is rebuilt from.
UNFINISHED_RUN = (
    "EXISTS (SELECT 1 FROM runs r WHERE r.event_id = e.id"
    " AND r.status IN ('pending', 'held', 'dead'))"
)

# An event verification found forged. It keeps its id only until another delivery of
# that id comes (the genuine callback, or the reconciler recovering it from CI's API),
# which replaces it, runs and all, instead of being dropped as its duplicate.
FORGED_EVENT = "EXISTS (SELECT 1 FROM runs f WHERE f.event_id = e.id AND f.status = 'forged')"

# The status a run takes when a handler reports each outcome.
RUN_STATUS = {
    "done": "done",
    "dead": "dead",
    "retry": "pending",
    "released": "pending",
    "forged": "forged",
}

# What a list shows of each event `e`: the columns of `EventSummary`, but its runs.
SUMMARY_COLUMNS = (
    "e.seq, e.id, e.received_at, e.kind, e.event_name, e.tag, e.state, e.job_id, e.bucket,"
    " e.key, (SELECT r.source FROM receipts r WHERE r.id = e.receipt_id)"
)

Fetch = Literal["rows", "row", "value", "count", "many", "none"]


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement to run, and what to give back: every row, the first row (or None),
    its first value, how many rows it changed, or nothing (`none`; `many`: run once per
    arguments in `args`)."""

    text: str
    args: Sequence[Any]
    fetch: Fetch
    # A write whose changed rows may make runs due: the other processes on the inbox are
    # told (PostgreSQL's NOTIFY); its `count` is then the only thing read back.
    wakes: bool = False


# A unit of work: statements yielded one after the other, each answered with its
# result, the last returning what the work gives back. A connector runs it in one
# transaction (a write) or on one snapshot (a read): SQLite on its writer or a reader
# thread, PostgreSQL on one connection of its pool.
Work = Generator[Statement, Any, T]


@dataclass(frozen=True, slots=True)
class Dialect:
    placeholder: Callable[[int], str]  # the n-th parameter (1-based): "?" or "$n"
    glob: Callable[[str, str], str]  # (column, placeholder) -> condition
    glob_pattern: Callable[[str], str]  # the user's glob as the parameter value
    time: Callable[[datetime], Any]  # a datetime as the time columns store it
    # The moment of a unit of work, as a parameter (this host's clock), or None where
    # the database's own `now()` is used.
    clock: Callable[[], float] | None
    # A parameter holding a list: matched as `= ANY($n::type[])`; else `IN (?, ...)`.
    arrays: bool
    no_limit: int | None  # LIMIT's value for "no limit"
    length: str  # the function giving a blob's size in bytes
    greatest: str  # the larger of two values (not an aggregate)
    seconds: Callable[[str], str]  # (a difference of two times) -> seconds, as a number
    steps: Callable[[str, str], str]  # (time column, step param) -> whole steps since 1970
    # How many values one `IN (...)` list may hold; None: one array parameter holds any.
    chunk: int | None
    # Taken at the start of a retention batch: only one process prunes at a time (None:
    # the backend's writer is one at a time already).
    try_lock: str | None
    # What a text value reads back as (PostgreSQL's text refuses NUL: `postgres.text`).
    text: Callable[[str], str]


@dataclass(slots=True)
class Sql:
    """One statement being written: the values of its parameters, in order. Build the
    text in the order it reads (parameters are numbered, or positional, as written)."""

    dialect: Dialect
    now_value: float | None = None
    args: list[Any] = field(default_factory=list)

    def __call__(self, value: Any) -> str:
        """A parameter holding `value`."""
        self.args.append(value)
        return self.dialect.placeholder(len(self.args))

    def time(self, moment: datetime) -> str:
        return self(self.dialect.time(moment))

    @property
    def now(self) -> str:
        """The moment of the unit of work."""
        if self.dialect.clock is None:
            return "now()"
        return self(self.now_value)

    def any(self, values: Sequence[Any], kind: str = "text") -> str:
        """`= ANY(...)` of these values (`IN (...)` where lists are not parameters)."""
        if self.dialect.arrays:
            return f"= ANY({self(list(values))}::{kind}[])"
        return f"IN ({', '.join(self(value) for value in values)})"

    def limit(self, count: int | None) -> str:
        return self(self.dialect.no_limit if count is None else count)

    def rows(self, text: str) -> Statement:
        return Statement(text, self.args, "rows")

    def row(self, text: str) -> Statement:
        return Statement(text, self.args, "row")

    def value(self, text: str) -> Statement:
        return Statement(text, self.args, "value")

    def count(self, text: str, *, wakes: bool = False) -> Statement:
        return Statement(text, self.args, "count", wakes)


class Tx:
    """The statements of one unit of work, at one moment (taken when the work starts)."""

    __slots__ = ("_now", "dialect")

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._now = dialect.clock() if dialect.clock is not None else None

    def sql(self) -> Sql:
        return Sql(self.dialect, self._now)

    def chunks(self, values: Sequence[T]) -> list[Sequence[T]]:
        """`values` in lists of a size one statement takes."""
        size = self.dialect.chunk
        if size is None:
            return [values] if values else []
        return [values[i : i + size] for i in range(0, len(values), size)]


@dataclass(slots=True)
class Delivery:
    """A callback to store, as rows: its receipt, its body packed, and each of its
    events (`records.event_row`) with its new runs (handler, status)."""

    receipt: Receipt
    body: bytes
    events: list[tuple[tuple[Any, ...], list[tuple[str, RunStatus]]]]


@dataclass(slots=True)
class Delivered:
    receipt_id: int
    stored: list[str]  # the ids of the events stored as new (or in place of forged ones)


@dataclass(slots=True)
class Finished:
    """An attempt's outcome to record on its run, while its lease is still held."""

    event_id: str
    handler: str
    lease_token: str
    status: str  # the run's status from now
    counted: bool  # an attempt (not a run released at shutdown)
    retry_at: datetime | None
    error: str | None
    number: int  # the attempt's number
    started_at: datetime
    outcome: str


def where(parts: Sequence[str]) -> str:
    return f"WHERE {' AND '.join(parts)}" if parts else ""


# --- storing ---------------------------------------------------------------------


def accept(tx: Tx, receipt: Receipt, body: bytes, event_ids: Sequence[str]) -> Statement:
    """An accepted callback's receipt (`body` packed); its id back."""
    s = tx.sql()
    return s.value(
        "INSERT INTO receipts (received_at, source, request_id, headers, source_meta, body,"
        f" size, outcome, event_ids) VALUES ({s.time(receipt.received_at)}, {s(receipt.source)},"
        f" {s(receipt.request_id)}, {s(orjson.dumps(receipt.headers))},"
        f" {s(orjson.dumps(receipt.source_meta))}, {s(body)}, {s(len(receipt.body))},"
        f" 'accepted', {s(orjson.dumps(list(event_ids)))}) RETURNING id"
    )


# An event's columns as `records.event_row` gives them.
EVENT_ROW = ("id", "kind", "event_name", "job_id", "tag", "state", "bucket", "key")


def insert_event(
    tx: Tx, columns: Sequence[Any], receipt_id: int, received_at: datetime
) -> Statement:
    """A new event (no JSON: it is rebuilt from the receipt's body); its id back, none
    when an event of its id is stored already."""
    s = tx.sql()
    values = ", ".join(s(value) for value in columns)
    return s.row(
        f"INSERT INTO events ({', '.join(EVENT_ROW)}, receipt_id, received_at) VALUES"
        f" ({values}, {s(receipt_id)}, {s.time(received_at)})"
        " ON CONFLICT (id) DO NOTHING RETURNING id"
    )


def replace_forged(
    tx: Tx, columns: Sequence[Any], receipt_id: int, received_at: datetime
) -> Statement:
    """This delivery in place of the stored event of its id, if verification found that
    one forged: 1 if it was."""
    s = tx.sql()
    event_id, *fields = columns
    assigned = ", ".join(
        f"{name} = {s(value)}" for name, value in zip(EVENT_ROW[1:], fields, strict=True)
    )
    return s.count(
        f"UPDATE events SET {assigned}, data = NULL, receipt_id = {s(receipt_id)},"
        f" received_at = {s.time(received_at)} WHERE id = {s(event_id)}"
        f" AND {FORGED_EVENT.replace('e.id', 'events.id')}"
    )


def delete_runs(tx: Tx, event_id: str) -> Statement:
    s = tx.sql()
    return s.count(f"DELETE FROM runs WHERE event_id = {s(event_id)}")


def insert_runs(tx: Tx, event_id: str, runs: Sequence[tuple[str, str]]) -> Statement:
    """The new runs (handler, status) of an event, due now."""
    s = tx.sql()
    text = (
        "INSERT INTO runs (event_id, handler, status, due_at, updated_at)"
        f" VALUES ({s(event_id)}, {s(None)}, {s(None)}, {s.now}, {s.now})"
    )
    return Statement(text, [(event_id, *run, *s.args[3:]) for run in runs], "many")


def mark_duplicate(tx: Tx, receipt_id: int) -> Statement:
    s = tx.sql()
    return s.count(f"UPDATE receipts SET outcome = 'duplicate' WHERE id = {s(receipt_id)}")


def reject(tx: Tx, receipt: Receipt, kept: bytes, size: int, reason: str, detail: str) -> Statement:
    """A refused callback's receipt, the first bytes of its body kept; its id back."""
    s = tx.sql()
    return s.value(
        "INSERT INTO receipts (received_at, source, request_id, headers, source_meta, body,"
        f" size, outcome, event_ids, error_reason, error_detail) VALUES"
        f" ({s.time(receipt.received_at)}, {s(receipt.source)}, {s(receipt.request_id)},"
        f" {s(orjson.dumps(receipt.headers))}, {s(orjson.dumps(receipt.source_meta))},"
        f" {s(kept)}, {s(size)}, 'rejected', '[]', {s(reason)}, {s(detail)}) RETURNING id"
    )


def settle(tx: Tx, event_id: str, genuine: bool) -> Statement:
    """An event's held runs made pending (genuine: they wake the others) or forged."""
    s = tx.sql()
    status = "pending" if genuine else "forged"
    return s.count(
        f"UPDATE runs SET status = {s(status)}, due_at = {s.now}, updated_at = {s.now}"
        f" WHERE event_id = {s(event_id)} AND status = 'held'",
        wakes=genuine,
    )


def heartbeat(tx: Tx, value: str) -> Statement:
    s = tx.sql()
    return s.count(
        f"INSERT INTO meta VALUES ('heartbeat', {s(value)})"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    )


# --- the run queue ---------------------------------------------------------------


def finish_run(tx: Tx, finished: Finished) -> Statement:
    """The run of an attempt's outcome, if its lease is still held: 1 if it was."""
    s = tx.sql()
    head = (
        f"UPDATE runs SET status = {s(finished.status)},"
        f" attempts = attempts + {s(int(finished.counted))},"
        f" due_at = {s.time(finished.retry_at) if finished.retry_at else s.now},"
        f" lease_until = NULL, lease_token = NULL, last_error = {s(finished.error)},"
        f" updated_at = {s.now}"
    )
    return s.count(
        f"{head} WHERE event_id = {s(finished.event_id)} AND handler = {s(finished.handler)}"
        f" AND lease_token = {s(finished.lease_token)}"
    )


def record_attempt(tx: Tx, finished: Finished) -> Statement:
    s = tx.sql()
    return s.count(
        "INSERT INTO attempts (event_id, handler, number, started_at, finished_at, outcome,"
        f" error) VALUES ({s(finished.event_id)}, {s(finished.handler)}, {s(finished.number)},"
        f" {s.time(finished.started_at)}, {s.now}, {s(finished.outcome)}, {s(finished.error)})"
    )


def events_with_request(tx: Tx, event_ids: Sequence[str]) -> Statement:
    """Rows of `EVENT_COLUMNS` and the receipt's request id, of these events."""
    s = tx.sql()
    return s.rows(
        f"SELECT {EVENT_COLUMNS}, r.request_id FROM events e JOIN receipts r"
        f" ON r.id = e.receipt_id WHERE e.id {s.any(event_ids)}"
    )


def next_due(tx: Tx, handlers: Sequence[str]) -> Statement:
    """Seconds from now until the earliest pending run of these handlers is free."""
    s = tx.sql()
    d = tx.dialect
    free = f"{d.greatest}(due_at, COALESCE(lease_until, due_at))"
    return s.value(
        f"SELECT {d.seconds(f'min({free}) - {s.now}')} FROM runs"
        f" WHERE status = 'pending' AND handler {s.any(handlers)}"
    )


def requeue_runs(tx: Tx, event_ids: Sequence[str] | None, handler: str, release: bool) -> Statement:
    """Create or reset the run of `handler` of these events (None: every event), but
    those leased right now. Released events run whatever verification said; otherwise a
    forged event is left alone, and a held event's new run waits with its others."""
    s = tx.sql()
    status = "'pending'"
    if not release:
        status = (
            "CASE WHEN EXISTS (SELECT 1 FROM runs h WHERE h.event_id = e.id"
            " AND h.status = 'held') THEN 'held' ELSE 'pending' END"
        )
    head = (
        "INSERT INTO runs (event_id, handler, status, due_at, updated_at)"
        f" SELECT e.id, {s(handler)}, {status}, {s.now}, {s.now} FROM events e"
    )
    chosen = []
    if event_ids is not None:
        chosen.append(f"e.id {s.any(event_ids)}")
    if not release:
        chosen.append(f"NOT {FORGED_EVENT}")
    # `WHERE true`: SQLite reads `ON` after a bare FROM as a join's.
    return s.count(
        f"{head} {where(chosen) or 'WHERE true'}"
        " ON CONFLICT (event_id, handler) DO UPDATE SET status = excluded.status,"
        " attempts = 0, due_at = excluded.due_at, last_error = NULL,"
        " lease_until = NULL, lease_token = NULL, updated_at = excluded.updated_at"
        " WHERE runs.lease_until IS NULL OR runs.lease_until <= excluded.due_at",
        wakes=True,
    )


def requeue_existing(
    tx: Tx,
    event_ids: Sequence[str] | None,
    handlers: Sequence[str] | None,
    dead_only: bool,
    release: bool,
) -> Statement:
    """Reset the runs these events already have (of `handlers`; None: every handler but
    the verification step), but those leased right now; `dead_only`: dead ones only;
    without `release`, held and forged runs stay as verification left them."""
    s = tx.sql()
    head = (
        "UPDATE runs SET status = 'pending', attempts = 0,"
        f" due_at = {s.now}, last_error = NULL, lease_until = NULL, lease_token = NULL,"
        f" updated_at = {s.now}"
    )
    conditions = [f"(lease_until IS NULL OR lease_until <= {s.now})"]
    if dead_only:
        conditions.append("status = 'dead'")
    if event_ids is not None:
        conditions.append(f"event_id {s.any(event_ids)}")
    if not release:
        conditions.append("status NOT IN ('held', 'forged')")
    if handlers:
        conditions.append(f"handler {s.any(handlers)}")
    else:
        conditions.append(f"handler <> {s(VERIFY_RUN)}")
    return s.count(f"{head} {where(conditions)}", wakes=True)


# --- reading ---------------------------------------------------------------------


def event_conditions(s: Sql, filter: EventFilter | None) -> list[str]:
    """Conditions over `events e` (and its runs) for a filter."""
    found: list[str] = []
    if filter is None:
        return found
    dialect = s.dialect
    for column in ("kind", "tag", "state", "job_id", "bucket"):
        value = getattr(filter, column)
        if value is not None:
            found.append(f"e.{column} = {s(value)}")
    if filter.key is not None:
        found.append(dialect.glob("e.key", s(dialect.glob_pattern(filter.key))))
    if filter.since is not None:
        found.append(f"e.received_at >= {s.time(filter.since)}")
    if filter.until is not None:
        found.append(f"e.received_at < {s.time(filter.until)}")
    if filter.status is None or filter.status == "done":
        # Most runs end done (and no index holds them by status): testing each event's own
        # runs (by its key) finds the newest matches at once.
        runs = ["r.event_id = e.id"]
        if filter.status is not None:
            runs.append(f"r.status = {s(filter.status)}")
        if filter.handler is not None:
            runs.append(f"r.handler = {s(filter.handler)}")
        if len(runs) > 1:
            found.append(f"EXISTS (SELECT 1 FROM runs r WHERE {' AND '.join(runs)})")
    else:
        # pending, dead, held and forged runs are few: start from them (runs_open, which
        # SQLite uses only when told `status <> 'done'`) rather than test every event's
        # runs, most of which would not match.
        runs = ["r.status <> 'done'", f"r.status = {s(filter.status)}"]
        if filter.handler is not None:
            runs.append(f"r.handler = {s(filter.handler)}")
        found.append(f"e.id IN (SELECT r.event_id FROM runs r WHERE {' AND '.join(runs)})")
    return found


def events(tx: Tx, filter: EventFilter | None, limit: int, before: int | None) -> Statement:
    s = tx.sql()
    conditions = event_conditions(s, filter)
    if before is not None:
        conditions.append(f"e.seq < {s(before)}")
    return s.rows(
        f"SELECT {SUMMARY_COLUMNS} FROM events e {where(conditions)}"
        f" ORDER BY e.seq DESC LIMIT {s(limit)}"
    )


def event_ids(tx: Tx, filter: EventFilter | None, limit: int, after: int) -> Statement:
    s = tx.sql()
    conditions = [*event_conditions(s, filter), f"e.seq > {s(after)}"]
    return s.rows(
        f"SELECT e.seq, e.id FROM events e {where(conditions)} ORDER BY e.seq LIMIT {s(limit)}"
    )


def runs(tx: Tx, event_ids: Sequence[str]) -> Statement:
    s = tx.sql()
    return s.rows(
        "SELECT event_id, handler, status, attempts, due_at, last_error FROM runs"
        f" WHERE event_id {s.any(event_ids)} ORDER BY handler"
    )


def attempts(tx: Tx, event_id: str) -> Statement:
    s = tx.sql()
    return s.rows(
        "SELECT handler, number, started_at, finished_at, outcome, error"
        f" FROM attempts WHERE event_id = {s(event_id)} ORDER BY id"
    )


def known(tx: Tx, event_ids: Sequence[str], forged: bool) -> Statement:
    s = tx.sql()
    unforged = "" if forged else f" AND NOT {FORGED_EVENT}"
    return s.rows(f"SELECT id FROM events e WHERE id {s.any(event_ids)}{unforged}")


def load(tx: Tx, event_ids: Sequence[str]) -> Statement:
    s = tx.sql()
    return s.rows(
        f"SELECT {EVENT_COLUMNS} FROM events e JOIN receipts r ON r.id = e.receipt_id"
        f" WHERE e.id {s.any(event_ids)}"
    )


def receipts(tx: Tx, limit: int, outcome: ReceiptOutcome | None, before: int | None) -> Statement:
    s = tx.sql()
    conditions = []
    if outcome is not None:
        # receipts_unaccepted serves the other outcomes, when told so
        unaccepted = "" if outcome == "accepted" else "outcome <> 'accepted' AND "
        conditions.append(f"{unaccepted}outcome = {s(outcome)}")
    if before is not None:
        conditions.append(f"id < {s(before)}")
    return s.rows(
        "SELECT id, received_at, source, outcome, size, error_reason, error_detail,"
        f" event_ids FROM receipts {where(conditions)} ORDER BY id DESC LIMIT {s(limit)}"
    )


def receipt(tx: Tx, receipt_id: int) -> Statement:
    s = tx.sql()
    return s.row(
        "SELECT body, source, received_at, request_id, headers, source_meta, size, outcome"
        f" FROM receipts WHERE id = {s(receipt_id)}"
    )


def rejected(tx: Tx, limit: int, before: int | None, preview: int) -> Statement:
    s = tx.sql()
    length = tx.dialect.length
    head = (
        f"SELECT id, received_at, source, request_id, size, COALESCE({length}(body), 0),"
        f" error_reason, error_detail, headers, source_meta, substr(body, 1, {s(preview)})"
        " FROM receipts WHERE outcome <> 'accepted' AND outcome = 'rejected'"
    )
    older = f" AND id < {s(before)}" if before is not None else ""
    return s.rows(f"{head}{older} ORDER BY id DESC LIMIT {s(limit)}")


# Pending and dead runs per handler, for the gauges (`backlogs`). `status <> 'done'` lets
# SQLite read them from runs_open, which holds no done run.
def backlog(tx: Tx) -> Statement:
    return tx.sql().rows(
        "SELECT handler, status, count(*), min(due_at) FROM runs"
        " WHERE status <> 'done' AND status IN ('pending', 'dead') GROUP BY status, handler"
    )


def backlogs(rows: Iterable[Sequence[Any]]) -> dict[str, Backlog]:
    """Each handler's backlog, from rows of `backlog`."""
    found: dict[str, Backlog] = {}
    for handler, status, count, oldest in rows:
        entry = found.setdefault(handler, Backlog(0, 0, None))
        if status == "pending":
            entry.pending, entry.oldest_due = count, as_datetime(oldest)
        else:
            entry.dead = count
    return found


def receipts_by_outcome(tx: Tx, since: datetime) -> Statement:
    s = tx.sql()
    return s.rows(
        f"SELECT outcome, count(*) FROM receipts WHERE received_at >= {s.time(since)} GROUP BY 1"
    )


def events_by_tag(tx: Tx, since: datetime) -> Statement:
    s = tx.sql()
    return s.rows(
        "SELECT coalesce(tag, event_name, kind), count(*) FROM events"
        f" WHERE received_at >= {s.time(since)} GROUP BY 1"
    )


def events_by_state(tx: Tx, since: datetime) -> Statement:
    s = tx.sql()
    return s.rows(
        "SELECT coalesce(state, '-'), count(*) FROM events"
        f" WHERE received_at >= {s.time(since)} GROUP BY 1"
    )


def runs_by_status(tx: Tx, since: datetime) -> Statement:
    s = tx.sql()
    return s.rows(
        "SELECT r.handler, r.status, count(*) FROM events e JOIN runs r"
        f" ON r.event_id = e.id WHERE e.received_at >= {s.time(since)} GROUP BY 1, 2"
    )


def callbacks_per_step(tx: Tx, since: datetime, step: int) -> Statement:
    s = tx.sql()
    steps = tx.dialect.steps("received_at", s(step))
    return s.rows(
        f"SELECT {steps}, outcome, count(*) FROM receipts"
        f" WHERE received_at >= {s.time(since)} GROUP BY 1, 2 ORDER BY 1, 2"
    )


def events_by_tag_and_state(tx: Tx, since: datetime) -> Statement:
    s = tx.sql()
    return s.rows(
        "SELECT coalesce(tag, event_name, kind), coalesce(state, '-'), count(*)"
        f" FROM events WHERE received_at >= {s.time(since)} GROUP BY 1, 2"
    )


def tallies(rows: Iterable[Sequence[Any]]) -> tuple[dict[str, int], dict[str, int]]:
    """Counts by tag and by state, from counts by (tag, state)."""
    tags: dict[str, int] = {}
    states: dict[str, int] = {}
    for tag, state, count in rows:
        tags[tag] = tags.get(tag, 0) + count
        states[state] = states.get(state, 0) + count
    return tags, states


# --- retention -------------------------------------------------------------------


def finished_events(tx: Tx, before: datetime, limit: int | None) -> Statement:
    """(id, bytes of its row's JSON) of events received before `before` with no run
    left to do, oldest first."""
    s = tx.sql()
    return s.rows(
        f"SELECT e.id, COALESCE({tx.dialect.length}(e.data), 0) FROM events e"
        f" WHERE e.received_at < {s.time(before)} AND NOT {UNFINISHED_RUN}"
        f" ORDER BY e.received_at LIMIT {s.limit(limit)}"
    )


def delete_of_events(tx: Tx, table: str, event_ids: Sequence[str]) -> Statement:
    s = tx.sql()
    column = "id" if table == "events" else "event_id"
    return s.count(f"DELETE FROM {table} WHERE {column} {s.any(event_ids)}")


def eventless_receipts(tx: Tx, before: datetime, limit: int | None, *, counting: bool) -> Statement:
    """(id, bytes) of accepted and duplicate receipts received before `before` that no
    event refers to any more (`counting`: that none would once the finished events go)."""
    s = tx.sql()
    still = f" AND {UNFINISHED_RUN}" if counting else ""
    return s.rows(
        f"SELECT id, COALESCE({tx.dialect.length}(body), 0) FROM receipts"
        f" WHERE received_at < {s.time(before)} AND outcome != 'rejected' AND NOT EXISTS"
        f" (SELECT 1 FROM events e WHERE e.receipt_id = receipts.id{still})"
        f" ORDER BY received_at LIMIT {s.limit(limit)}"
    )


def refused_receipts(tx: Tx, before: datetime, limit: int | None) -> Statement:
    s = tx.sql()
    return s.rows(
        f"SELECT id, COALESCE({tx.dialect.length}(body), 0) FROM receipts"
        f" WHERE received_at < {s.time(before)} AND outcome = 'rejected'"
        f" ORDER BY received_at LIMIT {s.limit(limit)}"
    )


def delete_receipts(tx: Tx, receipt_ids: Sequence[int]) -> Statement:
    s = tx.sql()
    return s.count(f"DELETE FROM receipts WHERE id {s.any(receipt_ids, 'bigint')}")


def _bodies_to_drop(s: Sql, before: datetime) -> str:
    """Receipts whose bodies retention may drop: kept (not refused) ones received before
    `before`; the caller keeps those an event still has work to do for."""
    return f"received_at < {s.time(before)} AND body IS NOT NULL AND outcome != 'rejected'"


def droppable_bodies(tx: Tx, before: datetime, limit: int | None, *, counting: bool) -> Statement:
    """(id, bytes) of the bodies retention drops next: not a body an event is still
    rebuilt from (`losing_bodies` first gives those events their JSON), unless
    `counting`, where they are about to have it."""
    s = tx.sql()
    lean = "" if counting else " OR e.data IS NULL"
    return s.rows(
        f"SELECT id, {tx.dialect.length}(body) FROM receipts WHERE {_bodies_to_drop(s, before)}"
        " AND NOT EXISTS (SELECT 1 FROM events e WHERE e.receipt_id = receipts.id"
        f" AND ({UNFINISHED_RUN}{lean})) ORDER BY received_at LIMIT {s.limit(limit)}"
    )


def drop_bodies(tx: Tx, receipt_ids: Sequence[int]) -> Statement:
    s = tx.sql()
    return s.count(f"UPDATE receipts SET body = NULL WHERE id {s.any(receipt_ids, 'bigint')}")


def losing_bodies(tx: Tx, before: datetime, limit: int) -> Statement:
    """Rows of `EVENT_COLUMNS` of the events without JSON of the receipts whose bodies
    retention drops next (see `droppable_bodies`)."""
    s = tx.sql()
    return s.rows(
        f"SELECT {EVENT_COLUMNS} FROM events e JOIN receipts r ON r.id = e.receipt_id"
        " WHERE e.data IS NULL AND e.receipt_id IN (SELECT id FROM receipts"
        f" WHERE {_bodies_to_drop(s, before)} AND NOT EXISTS (SELECT 1 FROM events e"
        f" WHERE e.receipt_id = receipts.id AND {UNFINISHED_RUN})"
        f" ORDER BY received_at LIMIT {s(limit)})"
    )


def keep_data(tx: Tx, rows: Sequence[tuple[bytes, str, int]]) -> Statement:
    """Each (data, id, receipt id): the JSON an event keeps once its body is gone."""
    s = tx.sql()
    text = (
        f"UPDATE events SET data = {s(None)} WHERE id = {s(None)}"
        f" AND receipt_id = {s(None)} AND data IS NULL"
    )
    return Statement(text, list(rows), "many")


# --- kept state ------------------------------------------------------------------


def get_state(tx: Tx, key: str) -> Statement:
    s = tx.sql()
    return s.value(f"SELECT value FROM state WHERE key = {s(key)}")


def set_state(tx: Tx, key: str, value: str) -> Statement:
    s = tx.sql()
    return s.count(
        f"INSERT INTO state VALUES ({s(key)}, {s(value)})"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    )


def states(tx: Tx, prefix: str) -> Statement:
    s = tx.sql()
    return s.rows(
        f"SELECT key, value FROM state WHERE substr(key, 1, {s(len(prefix))}) = {s(prefix)}"
    )


def delete_state(tx: Tx, key: str) -> Statement:
    s = tx.sql()
    return s.count(f"DELETE FROM state WHERE key = {s(key)}")


# --- globs -----------------------------------------------------------------------


def glob_to_like(pattern: str) -> str:
    """`*` and `?` as LIKE's `%` and `_`, everything else literal (escaped with `\\`)."""
    out = []
    for char in pattern:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in "%_\\":
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def glob_to_sqlite(pattern: str) -> str:
    """SQLite's GLOB would read `[` as a character class: make it literal, so that both
    backends match `*` and `?` only."""
    return pattern.replace("[", "[[]")
