"""The inbox's SQL, written once for both backends.

A statement of fixed shape is a constant (`Fixed`), written once with `?` for each
argument and `now()` for the moment of its unit of work, and made into each backend's
text once: `?n` for SQLite, whose `now()` is one more argument (this host's clock; its
times are seconds since the epoch), `$n` for PostgreSQL, whose `now()` is the
database's (its times are timestamptz). The statements whose shape depends on what is
asked (filters, replays, lists of ids) are written per call on a `Sql`, the same way.
Where the two truly differ, the `Dialect` says it in one named place: how a list of
values is matched, how a glob matches, a body's length, a whole number of steps since
the epoch.

What a backend does alone is in its connector: the hot path is per backend on purpose.
PostgreSQL stores a callback in one statement and records outcomes in batches; SQLite
stores and records statement by statement on its writer, and claims by rowid. The rules
that put these statements together (what a requeue selects, what retention removes and
in which order, ...) are in `manager.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, NamedTuple, TypeVar

from receiver.callback.matching import FIELDS
from receiver.inbox.records import EVENT_COLUMNS, as_datetime
from receiver.inbox.types import VERIFY_RUN, Backlog, EventFilter, ReceiptOutcome

T = TypeVar("T")

# An event with such a run is kept by retention, and so is the body it is rebuilt from.
UNFINISHED_RUN = (
    "EXISTS (SELECT 1 FROM runs r WHERE r.event_id = e.id"
    " AND r.status IN ('pending', 'held', 'dead'))"
)

# An event verification found forged. It keeps its id only until another delivery of
# that id comes (the genuine callback, or the reconciler recovering it from CI's API),
# which replaces it, runs and all, instead of being dropped as its duplicate. Once a
# replay released any of its handlers' runs, somebody vouched for it and they may have
# run: from then on it is an ordinary event, whose next delivery is a duplicate. (The
# verification step's own run is left out: it ends `forged` only after the verdict.)
FORGED_EVENT = (
    "(EXISTS (SELECT 1 FROM runs f WHERE f.event_id = e.id AND f.status = 'forged')"
    " AND NOT EXISTS (SELECT 1 FROM runs v WHERE v.event_id = e.id"
    f" AND v.handler <> '{VERIFY_RUN}' AND v.status <> 'forged'))"
)

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
    " e.key, e.verdict, (SELECT r.source FROM receipts r WHERE r.id = e.receipt_id)"
)

Fetch = Literal["rows", "row", "value", "count", "many", "none"]


class Statement(NamedTuple):
    """One statement to run, and what to give back: every row, the first row (or None),
    its first value, how many rows it changed, or nothing (`none`; `many`: run once per
    arguments in `args`)."""

    text: str
    args: Sequence[Any]
    fetch: Fetch
    # A write whose changed rows may make runs due: the other processes on the inbox are
    # told (PostgreSQL's NOTIFY); its `count` is then the only thing read back.
    wakes: bool = False


class Offload(NamedTuple):
    """Work for the CPU that a unit of work hands over, its result sent back: PostgreSQL
    runs it on a helper thread, its transaction open meanwhile; SQLite where the unit
    runs (its writer's batch cannot wait for a thread: the rules do not offload there)."""

    function: Callable[[Any], Any]
    argument: Any


# A unit of work: statements yielded one after the other, each answered with its
# result, the last returning what the work gives back. A connector runs it in one
# transaction (a write) or on one snapshot (a read): SQLite on its writer or a reader
# thread, PostgreSQL on one connection of its pool.
Work = Generator[Statement | Offload, Any, T]


@dataclass(frozen=True, slots=True, eq=False)  # eq=False: hashed by identity (`Fixed`)
class Dialect:
    placeholder: Callable[[int], str]  # the n-th parameter (1-based): "?n" or "$n"
    glob: Callable[[str, str], str]  # (column, placeholder) -> condition
    glob_pattern: Callable[[str], str]  # the user's glob as the parameter value
    time: Callable[[datetime], Any]  # a datetime as the time columns store it
    # The moment of a unit of work, as an argument (this host's clock), or None where
    # `now()` is the database's own.
    clock: Callable[[], float] | None
    no_limit: int | None  # LIMIT's value for "no limit"
    length: str  # the function giving a blob's size in bytes
    greatest: str  # the larger of two values (not an aggregate)
    seconds: Callable[[str], str]  # (a difference of two times) -> seconds, as a number
    steps: Callable[[str, str], str]  # (time column, step param) -> whole steps since 1970
    # How many values one `IN (...)` list may hold; None: one array parameter holds any
    # (`= ANY($n::type[])`).
    chunk: int | None
    # Taken at the start of a retention batch: only one process prunes at a time (None:
    # the backend's writer is one at a time already).
    try_lock: str | None
    # What a text value reads back as (PostgreSQL's text refuses NUL: `postgres.text`).
    text: Callable[[str], str]
    # (a text expression) -> it with ASCII letters lowered, as `vocabulary.fold` does.
    fold: Callable[[str], str]


def dialect_text(dialect: Dialect, text: str) -> tuple[str, bool]:
    """`text`, written with `?` and `now()`, as `dialect` runs it; True where its `now()`
    became an argument, after the others (SQLite's clock)."""
    parts = text.split("?")
    numbered = parts[0] + "".join(
        dialect.placeholder(n) + part for n, part in enumerate(parts[1:], 1)
    )
    if dialect.clock is None or "now()" not in numbered:
        return numbered, False
    return numbered.replace("now()", dialect.placeholder(len(parts))), True


class Tx:
    """The statements of one unit of work, at one moment (taken when the work starts)."""

    __slots__ = ("dialect", "now")

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        # `now()`'s argument, where the moment is this host's.
        self.now: tuple[float, ...] = () if dialect.clock is None else (dialect.clock(),)

    def time(self, moment: datetime) -> Any:
        return self.dialect.time(moment)

    def limit(self, count: int | None) -> int | None:
        return self.dialect.no_limit if count is None else count

    def chunks(self, values: Sequence[T]) -> list[Sequence[T]]:
        """`values` in lists of a size one statement takes."""
        size = self.dialect.chunk
        if size is None:
            return [values] if values else []
        return [values[i : i + size] for i in range(0, len(values), size)]


class Fixed:
    """A statement of fixed shape: its text (or its text in a dialect, for the parts
    that differ) written once with `?` and `now()`, made into each dialect's at its
    first use. Called with its arguments in order (`many`: each one the arguments of
    one execution, and no `now()`)."""

    __slots__ = ("_made", "_text", "fetch", "wakes")

    def __init__(
        self, text: str | Callable[[Dialect], str], fetch: Fetch, *, wakes: bool = False
    ) -> None:
        self._text = text
        self.fetch: Fetch = fetch
        self.wakes = wakes
        self._made: dict[Dialect, tuple[str, bool]] = {}

    def __call__(self, tx: Tx, *args: Any) -> Statement:
        made = self._made.get(tx.dialect)
        if made is None:
            text = self._text if isinstance(self._text, str) else self._text(tx.dialect)
            made = self._made[tx.dialect] = dialect_text(tx.dialect, text)
        text, timed = made
        return Statement(text, args + tx.now if timed else args, self.fetch, self.wakes)


@dataclass(slots=True)
class Sql:
    """A statement whose shape depends on what is asked, being written: the values of
    its `?`, in the order the text reads."""

    tx: Tx
    args: list[Any] = field(default_factory=list)

    def __call__(self, value: Any) -> str:
        """A parameter holding `value`."""
        self.args.append(value)
        return "?"

    def time(self, moment: datetime) -> str:
        return self(self.tx.time(moment))

    def any(self, values: Sequence[Any], kind: str = "text") -> str:
        """`= ANY(...)` of these values (`IN (...)` where lists are not parameters)."""
        if self.tx.dialect.chunk is None:
            return f"= ANY({self(list(values))}::{kind}[])"
        return f"IN ({', '.join(self(value) for value in values)})"

    def rows(self, text: str) -> Statement:
        return self._statement(text, "rows")

    def value(self, text: str) -> Statement:
        return self._statement(text, "value")

    def count(self, text: str, *, wakes: bool = False) -> Statement:
        return self._statement(text, "count", wakes)

    def _statement(self, text: str, fetch: Fetch, wakes: bool = False) -> Statement:
        made, timed = dialect_text(self.tx.dialect, text)
        return Statement(made, [*self.args, *self.tx.now] if timed else self.args, fetch, wakes)


def where(parts: Sequence[str]) -> str:
    return f"WHERE {' AND '.join(parts)}" if parts else ""


# --- storing (what both backends share: each stores a callback its own way) ---------

REJECT = Fixed(
    "INSERT INTO receipts (received_at, source, request_id, headers, source_meta, body, size,"
    " outcome, event_ids, error_reason, error_detail)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, 'rejected', '[]', ?, ?) RETURNING id",
    "value",
)

# An event's held runs made pending (they wake the others) or forged.
_SETTLE = (
    "UPDATE runs SET status = '{}', due_at = now(), updated_at = now()"
    " WHERE event_id = ? AND status = 'held'"
)
SETTLE_GENUINE = Fixed(_SETTLE.format("pending"), "count", wakes=True)
SETTLE_FORGED = Fixed(_SETTLE.format("forged"), "count")

# A handler's runs waiting for a retry made due now (they wake the others); those leased
# are being attempted, and their outcome sets when they are due next.
HASTEN = Fixed(
    "UPDATE runs SET due_at = now(), updated_at = now() WHERE handler = ?"
    " AND status = 'pending' AND due_at > now() AND (lease_until IS NULL OR lease_until <= now())",
    "count",
    wakes=True,
)

HEARTBEAT = Fixed(
    "INSERT INTO meta VALUES ('heartbeat', ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    "count",
)


# --- the run queue ---------------------------------------------------------------

# A leased run handed back unattempted: claimable at once.
_UNLEASE = "UPDATE runs SET lease_until = NULL, lease_token = NULL, updated_at = now()"
# Runs leased under a token and not yet ended, handed back (they wake the others).
RELEASE = Fixed(
    f"{_UNLEASE} WHERE lease_token = ? AND status = 'pending'",
    "count",
    wakes=True,
)


def release_runs(tx: Tx, lease_token: str, handler: str, event_ids: Sequence[str]) -> Statement:
    """`RELEASE` of some of a lease's runs: those of these events. It wakes no one: they
    are handed back for a rate limit, which holds every process alike."""
    s = Sql(tx)
    return s.count(
        f"{_UNLEASE} WHERE lease_token = {s(lease_token)} AND handler = {s(handler)}"
        f" AND status = 'pending' AND event_id {s.any(event_ids)}"
    )


def next_due(tx: Tx, handlers: Sequence[str]) -> Statement:
    """Seconds from now until the earliest pending run of these handlers is free."""
    s = Sql(tx)
    d = tx.dialect
    free = f"{d.greatest}(due_at, COALESCE(lease_until, due_at))"
    return s.value(
        f"SELECT {d.seconds(f'min({free}) - now()')} FROM runs"
        f" WHERE status = 'pending' AND handler {s.any(handlers)}"
    )


def requeue_runs(tx: Tx, event_ids: Sequence[str] | None, handler: str, release: bool) -> Statement:
    """Create or reset the run of `handler` of these events (None: every event), but
    those leased right now. Released events run whatever verification said; otherwise a
    forged event is left alone, and a held event's new run waits with its others."""
    s = Sql(tx)
    status = "'pending'"
    if not release:
        status = (
            "CASE WHEN EXISTS (SELECT 1 FROM runs h WHERE h.event_id = e.id"
            " AND h.status = 'held') THEN 'held' ELSE 'pending' END"
        )
    head = (
        "INSERT INTO runs (event_id, handler, status, due_at, updated_at)"
        f" SELECT e.id, {s(handler)}, {status}, now(), now() FROM events e"
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
    s = Sql(tx)
    conditions = ["(lease_until IS NULL OR lease_until <= now())"]
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
    return s.count(
        "UPDATE runs SET status = 'pending', attempts = 0, due_at = now(), last_error = NULL,"
        f" lease_until = NULL, lease_token = NULL, updated_at = now() {where(conditions)}",
        wakes=True,
    )


def runs_by_handler(tx: Tx, event_ids: Sequence[str], dead_only: bool) -> Statement:
    """(handler, how many) of the runs of these events, the verification step's aside."""
    s = Sql(tx)
    conditions = [f"event_id {s.any(event_ids)}", f"handler <> {s(VERIFY_RUN)}"]
    if dead_only:
        conditions.append("status = 'dead'")
    return s.rows(f"SELECT handler, count(*) FROM runs {where(conditions)} GROUP BY handler")


# --- reading ---------------------------------------------------------------------


# The columns holding what a filter matches on, compared as a route compares the event's
# fields (receiver/callback/matching.py).
MATCHED_COLUMNS = {
    "kind": "e.kind",
    "event_name": "e.event_name",
    "tag": "coalesce(e.tag, e.event_name)",
    "state": "e.state",
    "verdict": "e.verdict",
    "bucket": "e.bucket",
    "key": "e.key",
}


def event_conditions(s: Sql, filter: EventFilter | None) -> list[str]:
    """Conditions over `events e` (and its runs) for a filter."""
    found: list[str] = []
    if filter is None:
        return found
    dialect = s.tx.dialect
    for name, column in MATCHED_COLUMNS.items():
        value = getattr(filter, name)
        if value is None:
            continue
        matched = FIELDS[name]
        (wanted,) = matched.wanted([value])
        if matched.comparison == "glob":
            found.append(dialect.glob(column, s(dialect.glob_pattern(wanted))))
        elif matched.comparison == "folded":
            found.append(f"{dialect.fold(column)} = {s(wanted)}")
        else:
            found.append(f"{column} = {s(wanted)}")
    if filter.job_id is not None:
        found.append(f"e.job_id = {s(filter.job_id)}")
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
    s = Sql(tx)
    conditions = event_conditions(s, filter)
    if before is not None:
        conditions.append(f"e.seq < {s(before)}")
    return s.rows(
        f"SELECT {SUMMARY_COLUMNS} FROM events e {where(conditions)}"
        f" ORDER BY e.seq DESC LIMIT {s(limit)}"
    )


def event_ids(
    tx: Tx, filter: EventFilter | None, limit: int, after: int, through: int | None
) -> Statement:
    s = Sql(tx)
    conditions = [*event_conditions(s, filter), f"e.seq > {s(after)}"]
    if through is not None:
        conditions.append(f"e.seq <= {s(through)}")
    return s.rows(
        f"SELECT e.seq, e.id FROM events e {where(conditions)} ORDER BY e.seq LIMIT {s(limit)}"
    )


def matching(tx: Tx, filter: EventFilter | None) -> Statement:
    s = Sql(tx)
    return s.rows(f"SELECT count(*), max(e.seq) FROM events e {where(event_conditions(s, filter))}")


def runs(tx: Tx, event_ids: Sequence[str]) -> Statement:
    s = Sql(tx)
    return s.rows(
        "SELECT event_id, handler, status, attempts, due_at, last_error,"
        " CASE WHEN lease_until > now() THEN lease_token END, updated_at FROM runs"
        f" WHERE event_id {s.any(event_ids)} ORDER BY handler"
    )


ATTEMPTS = Fixed(
    "SELECT handler, number, started_at, finished_at, outcome, error"
    " FROM attempts WHERE event_id = ? ORDER BY id",
    "rows",
)


def known(tx: Tx, event_ids: Sequence[str], forged: bool) -> Statement:
    s = Sql(tx)
    unforged = "" if forged else f" AND NOT {FORGED_EVENT}"
    return s.rows(f"SELECT id FROM events e WHERE id {s.any(event_ids)}{unforged}")


def load(tx: Tx, event_ids: Sequence[str]) -> Statement:
    """Rows of `EVENT_COLUMNS` and the receipt's request id, of these events."""
    s = Sql(tx)
    return s.rows(
        f"SELECT {EVENT_COLUMNS}, r.request_id FROM events e JOIN receipts r"
        f" ON r.id = e.receipt_id WHERE e.id {s.any(event_ids)}"
    )


def receipts(tx: Tx, limit: int, outcome: ReceiptOutcome | None, before: int | None) -> Statement:
    s = Sql(tx)
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


RECEIPT = Fixed(
    "SELECT body, source, received_at, request_id, headers, source_meta, size, outcome"
    " FROM receipts WHERE id = ?",
    "row",
)


def rejected(tx: Tx, limit: int, before: int | None, preview: int) -> Statement:
    s = Sql(tx)
    head = (
        f"SELECT id, received_at, source, request_id, size,"
        f" COALESCE({tx.dialect.length}(body), 0), error_reason, error_detail, headers,"
        f" source_meta, substr(body, 1, {s(preview)})"
        " FROM receipts WHERE outcome <> 'accepted' AND outcome = 'rejected'"
    )
    older = f" AND id < {s(before)}" if before is not None else ""
    return s.rows(f"{head}{older} ORDER BY id DESC LIMIT {s(limit)}")


# Pending and dead runs per handler, for the gauges (`backlogs`). `status <> 'done'` lets
# SQLite read them from runs_open, which holds no done run.
BACKLOG = Fixed(
    "SELECT handler, status, count(*), min(due_at) FROM runs"
    " WHERE status <> 'done' AND status IN ('pending', 'dead') GROUP BY status, handler",
    "rows",
)


def backlogs(rows: Iterable[Sequence[Any]]) -> dict[str, Backlog]:
    """Each handler's backlog, from rows of `BACKLOG`."""
    found: dict[str, Backlog] = {}
    for handler, status, count, oldest in rows:
        entry = found.setdefault(handler, Backlog(0, 0, None))
        if status == "pending":
            entry.pending, entry.oldest_due = count, as_datetime(oldest)
        else:
            entry.dead = count
    return found


# The moderation events received since a moment (the argument) by verdict, from the
# partial index of verdicts.
VERDICTS = Fixed(
    "SELECT verdict, count(*) FROM events WHERE received_at >= ? AND verdict IS NOT NULL"
    " GROUP BY 1",
    "rows",
)

# What was received since a moment (the argument), counted: receipts by outcome, events
# by tag, by state and by verdict (`Counts`).
COUNTS = (
    *(
        Fixed(f"SELECT {key}, count(*) FROM {table} WHERE received_at >= ? GROUP BY 1", "rows")
        for table, key in (
            ("receipts", "outcome"),
            ("events", "coalesce(tag, event_name, kind)"),
            ("events", "coalesce(state, '-')"),
        )
    ),
    VERDICTS,
)

RUNS_BY_STATUS = Fixed(
    "SELECT r.handler, r.status, count(*) FROM events e JOIN runs r ON r.event_id = e.id"
    " WHERE e.received_at >= ? GROUP BY 1, 2",
    "rows",
)

# (step, since)
CALLBACKS_PER_STEP = Fixed(
    lambda d: (
        f"SELECT {d.steps('received_at', '?')}, outcome, count(*) FROM receipts"
        " WHERE received_at >= ? GROUP BY 1, 2 ORDER BY 1, 2"
    ),
    "rows",
)

EVENTS_BY_TAG_AND_STATE = Fixed(
    "SELECT coalesce(tag, event_name, kind), coalesce(state, '-'), count(*)"
    " FROM events WHERE received_at >= ? GROUP BY 1, 2",
    "rows",
)


def tallies(rows: Iterable[Sequence[Any]]) -> tuple[dict[str, int], dict[str, int]]:
    """Counts by tag and by state, from counts by (tag, state)."""
    tags: dict[str, int] = {}
    states: dict[str, int] = {}
    for tag, state, count in rows:
        tags[tag] = tags.get(tag, 0) + count
        states[state] = states.get(state, 0) + count
    return tags, states


# --- retention (each: before, limit) --------------------------------------------------

# (id, bytes of its row's JSON) of events received before `before` with no run left to
# do, oldest first.
FINISHED_EVENTS = Fixed(
    lambda d: (
        f"SELECT e.id, COALESCE({d.length}(e.data), 0) FROM events e"
        f" WHERE e.received_at < ? AND NOT {UNFINISHED_RUN} ORDER BY e.received_at LIMIT ?"
    ),
    "rows",
)


def delete_of_events(tx: Tx, table: str, event_ids: Sequence[str]) -> Statement:
    s = Sql(tx)
    column = "id" if table == "events" else "event_id"
    return s.count(f"DELETE FROM {table} WHERE {column} {s.any(event_ids)}")


def _eventless_receipts(counting: bool) -> Fixed:
    still = f" AND {UNFINISHED_RUN}" if counting else ""
    return Fixed(
        lambda d: (
            f"SELECT id, COALESCE({d.length}(body), 0) FROM receipts"
            " WHERE received_at < ? AND outcome != 'rejected' AND NOT EXISTS"
            f" (SELECT 1 FROM events e WHERE e.receipt_id = receipts.id{still})"
            " ORDER BY received_at LIMIT ?"
        ),
        "rows",
    )


# By `counting`: (id, bytes) of the accepted and duplicate receipts received before
# `before` that no event refers to any more (counting: that none would once the finished
# events go).
EVENTLESS_RECEIPTS = {counting: _eventless_receipts(counting) for counting in (False, True)}

REFUSED_RECEIPTS = Fixed(
    lambda d: (
        f"SELECT id, COALESCE({d.length}(body), 0) FROM receipts"
        " WHERE received_at < ? AND outcome = 'rejected' ORDER BY received_at LIMIT ?"
    ),
    "rows",
)


def delete_receipts(tx: Tx, receipt_ids: Sequence[int]) -> Statement:
    s = Sql(tx)
    return s.count(f"DELETE FROM receipts WHERE id {s.any(receipt_ids, 'bigint')}")


# Receipts whose bodies retention may drop: kept (not refused) ones received before the
# argument; the statements keep those an event still has work to do for.
_BODIES_TO_DROP = "received_at < ? AND body IS NOT NULL AND outcome != 'rejected'"


def _droppable_bodies(counting: bool) -> Fixed:
    lean = "" if counting else " OR e.data IS NULL"
    return Fixed(
        lambda d: (
            f"SELECT id, {d.length}(body) FROM receipts WHERE {_BODIES_TO_DROP}"
            " AND NOT EXISTS (SELECT 1 FROM events e WHERE e.receipt_id = receipts.id"
            f" AND ({UNFINISHED_RUN}{lean})) ORDER BY received_at LIMIT ?"
        ),
        "rows",
    )


# By `counting`: (id, bytes) of the bodies retention drops next: not a body an event is
# still rebuilt from (`LOSING_BODIES` first gives those events their JSON), unless
# counting, where they are about to have it.
DROPPABLE_BODIES = {counting: _droppable_bodies(counting) for counting in (False, True)}


def drop_bodies(tx: Tx, receipt_ids: Sequence[int]) -> Statement:
    s = Sql(tx)
    return s.count(f"UPDATE receipts SET body = NULL WHERE id {s.any(receipt_ids, 'bigint')}")


# Rows of `EVENT_COLUMNS` of the events without JSON of the receipts whose bodies
# retention drops next (see `DROPPABLE_BODIES`).
LOSING_BODIES = Fixed(
    f"SELECT {EVENT_COLUMNS} FROM events e JOIN receipts r ON r.id = e.receipt_id"
    " WHERE e.data IS NULL AND e.receipt_id IN (SELECT id FROM receipts"
    f" WHERE {_BODIES_TO_DROP} AND NOT EXISTS (SELECT 1 FROM events e"
    f" WHERE e.receipt_id = receipts.id AND {UNFINISHED_RUN}) ORDER BY received_at LIMIT ?)",
    "rows",
)

# Each (data, id, receipt id): the JSON an event keeps once its body is gone.
KEEP_DATA = Fixed(
    "UPDATE events SET data = ? WHERE id = ? AND receipt_id = ? AND data IS NULL", "many"
)


# --- kept state ------------------------------------------------------------------

GET_STATE = Fixed("SELECT value FROM state WHERE key = ?", "value")
SET_STATE = Fixed(
    "INSERT INTO state VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    "count",
)
# The value of a key ('' if the row is new), and the moment: the row made if missing, and
# locked (PostgreSQL) until the transaction ends.
LOCK_STATE = Fixed(
    # PostgreSQL's now() is when the transaction began, before the lock was waited for.
    lambda d: (
        "INSERT INTO state VALUES (?, '') ON CONFLICT (key) DO UPDATE"
        f" SET value = state.value RETURNING value, {'now()' if d.clock else 'clock_timestamp()'}"
    ),
    "row",
)
# (length of the prefix, prefix)
STATES = Fixed("SELECT key, value FROM state WHERE substr(key, 1, ?) = ?", "rows")
DELETE_STATE = Fixed("DELETE FROM state WHERE key = ?", "count")


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
