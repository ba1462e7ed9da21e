"""How the `events` commands show the inbox's records to people on a terminal.

Values come from callbacks, which anyone who reaches the receiver can forge: control
characters (a terminal's escape sequences among them) are shown as `\\x1b`, never sent.
"""

from __future__ import annotations

import unicodedata
from datetime import tzinfo

from handlers.message import verdict
from receiver.callback.event import Event, ObjectRef
from receiver.inbox import EventDetail, EventSummary
from receiver.timezones import shown
from receiver.upkeep.presence import holder

_LABEL_WIDTH = 10


def printable(text: str) -> str:
    """`text` with control and format characters written as escapes (`\\x1b`)."""
    if text.isprintable():
        return text
    return "".join(
        character
        if unicodedata.category(character)[0] != "C" or character == " "
        else repr(character)[1:-1]
        for character in text
    )


def summary_row(summary: EventSummary, zone: tzinfo) -> tuple[str, ...]:
    """RECEIVED, ID, EVENT, TAG, STATE, VERDICT, HANDLERS of `events list` and `tail`."""
    handlers = " ".join(f"{r.handler}={r.status}" for r in summary.runs) or "(no route)"
    return (
        f"{summary.received_at.astimezone(zone):%Y-%m-%d %H:%M:%S}",
        printable(summary.id),
        printable(summary.event_name or "-"),
        printable(summary.tag or "-"),
        printable(summary.state or "-"),
        summary.verdict or "-",
        handlers,
    )


def event_lines(detail: EventDetail, zone: tzinfo, names: dict[str, str]) -> list[str]:
    """`events show`: the event in labelled lines, its handlers' runs, every attempt.
    `names`: the processes' (`presence.names`), for the runs being run."""
    event = detail.event
    lines = [printable(event.id)]
    lines += [_field(label, value) for label, value in _fields(event, detail, zone) if value]
    lines += ["", "handlers"]
    if not detail.runs:
        lines.append("  (no route sent it to any)")
    for run in detail.runs:
        text = f"  {run.handler}  {run.status}, {run.attempts} attempt(s)"
        if run.leased_by is not None:
            text = (
                f"  {run.handler}  running on {holder(run, names)} since"
                f" {shown(run.leased_since, zone)}, {run.attempts} attempt(s) before"
            )
        elif run.status == "pending" and run.due_at is not None:
            text += f", next {shown(run.due_at, zone)}"
        if run.last_error:
            text += f", last error: {run.last_error}"
        lines.append(printable(text))
    if detail.attempts:
        lines += ["", "attempts"]
    for attempt in detail.attempts:
        took = (attempt.finished_at - attempt.started_at).total_seconds() * 1000
        text = (
            f"  {shown(attempt.started_at, zone)}  {attempt.handler} #{attempt.number}"
            f"{' (replayed)' if attempt.replayed else ''}  {attempt.outcome} ({took:.0f} ms)"
        )
        lines.append(printable(text + (f": {attempt.error}" if attempt.error else "")))
    return lines


def _fields(event: Event, detail: EventDetail, zone: tzinfo) -> list[tuple[str, str]]:
    failed = event.state not in (None, "Success")
    workflow = event.workflow
    via = f"via {event.source}" + (f", request {detail.request_id}" if detail.request_id else "")
    return [
        ("kind", f"{event.kind} ({event.event_name})" if event.event_name else event.kind),
        ("tag", event.tag or ""),
        ("state", event.state or ""),
        ("job", event.job_id or ""),
        ("error", ": ".join(filter(None, (event.code, event.message))) if failed else ""),
        ("verdict", verdict(event)),
        ("workflow", _workflow(event) if workflow else ""),
        ("tasks", "\n".join(f"{t.type or t.name} {t.job_id or ''} {t.state}" for t in event.tasks)),
        ("queue", event.queue_id or ""),
        ("template", event.template_name or event.template_id or ""),
        ("input", _object(event.input) if event.input else ""),
        ("outputs", "\n".join(_object(ref) for ref in event.outputs)),
        ("user data", event.user_data or ""),
        ("created", shown(event.created_at, zone)),
        ("started", shown(event.started_at, zone)),
        ("finished", shown(event.finished_at, zone)),
        ("received", f"{shown(event.received_at, zone)} {via}, receipt #{detail.receipt_id}"),
    ]


def _field(label: str, value: str) -> str:
    first, *rest = [printable(line) for line in value.split("\n")]
    indent = " " * (_LABEL_WIDTH + 2)
    return "\n".join([f"  {label.ljust(_LABEL_WIDTH)}{first}", *(indent + line for line in rest)])


def _object(ref: ObjectRef) -> str:
    where = ", ".join(filter(None, (ref.bucket, ref.region)))
    return f"{ref.key} ({where})" if where else ref.key


def _workflow(event: Event) -> str:
    workflow = event.workflow
    assert workflow is not None
    name = workflow.workflow_name or workflow.workflow_id or ""
    node = f", node {workflow.name}" if workflow.name else ""
    return f"{name} (run {workflow.run_id}{node})" if workflow.run_id else name
