"""A readable message about an event, for the chat and e-mail handlers.

A message is a `string.Template` over the fields in `FIELDS` (`$job_id`, `${state}`,
...). The default is `$title` and `$details`: labelled lines that leave out what does
not apply (no error line for a success, no verdict for a transcode). Values are written
for the markup of the target (`handlers.markup`): they come from the callback, which
anyone who can reach the receiver can forge, so a value must not make a link, a mention
or a line of its own in the message. Times are shown in the handler's time zone.
"""

from __future__ import annotations

from datetime import timezone, tzinfo
from string import Template

from handlers.markup import Markup
from receiver.callback.event import Event, ObjectRef
from receiver.callback.vocabulary import VERDICTS
from receiver.timezones import shown

# Every field a template may use, and what it holds (docs/handlers.md: "Message templates").
FIELDS: dict[str, str] = {
    "title": "what happened in a few words: `SmartCover Success`, `Transcode Failed`",
    "details": "the default body: labelled lines, in the target's markup",
    "id": "the event id (dedup key)",
    "kind": "`job`, `workflow` or `moderation`",
    "event_name": "CI's EventName (`TaskFinish`, `WorkflowFinish`, ...)",
    "job_id": "the JobId (workflows: the RunId)",
    "tag": "the job's Tag",
    "state": "`Success`, `Failed`, ...",
    "code": "CI's error code",
    "message": "CI's error message",
    "error": "`code: message` when the job did not succeed, else empty",
    "queue_id": "the queue",
    "input": "the input object, `key (bucket)`",
    "outputs": "the output keys, comma-separated (the first 10, then a count)",
    "output_count": "how many outputs",
    "user_data": "the UserData given when the job was submitted",
    "template_name": "the job's template",
    "workflow_name": "the workflow's name",
    "run_id": "the workflow instance",
    "verdict": "moderation: `violation: Porn (score 99)`, else empty",
    "finished_at": "when the job ended, in the handler's time zone",
    "received_at": "when ci-receiver got the callback, in the handler's time zone",
}
DEFAULT_TEMPLATE = "$title\n$details"
MAX_LISTED_OUTPUTS = 10


def check_template(template: str) -> str:
    """A pydantic validator: the template parses and names only known fields."""
    try:
        Template(template).substitute(dict.fromkeys(FIELDS, ""))
    except KeyError as exc:
        raise ValueError(
            f"unknown field ${exc.args[0]}; known: {', '.join(sorted(FIELDS))}"
        ) from None
    except ValueError as exc:
        raise ValueError(f"not a valid template ($name or ${{name}}): {exc}") from None
    return template


def render(
    template: str,
    event: Event,
    markup: Markup,
    zone: tzinfo = timezone.utc,
    *,
    title_text: str | None = None,
) -> str:
    """The message, its values escaped for `markup`, its times in `zone`; `title_text`
    in place of the event's `$title` (a digest's)."""
    fields = plain_fields(event, zone)
    values = {name: markup.escape(value) for name, value in fields.items()}
    values["title"] = markup.escape(title(event) if title_text is None else title_text)
    values["details"] = details(fields, event, markup)
    # The newlines the user wrote are the target's line breaks too.
    return Template(template.replace("\n", markup.newline)).substitute(values)


def title(event: Event) -> str:
    what = event.tag or event.event_name or event.kind
    return f"{what} {event.state}" if event.state else what


def details(fields: dict[str, str], event: Event, markup: Markup) -> str:
    labelled = [
        ("Workflow run" if event.kind == "workflow" else "Job", fields["job_id"]),
        ("State", fields["state"]),
        ("Error", fields["error"]),
        ("Verdict", fields["verdict"]),
        ("Input", fields["input"]),
        ("Outputs", fields["outputs"]),
        ("Workflow", fields["workflow_name"]),
        ("User data", fields["user_data"]),
        ("Finished", fields["finished_at"]),
    ]
    return markup.newline.join(
        f"{markup.bold(label)}: {markup.escape(value)}" for label, value in labelled if value
    )


def plain_fields(event: Event, zone: tzinfo = timezone.utc) -> dict[str, str]:
    """Every field but `title` and `details`, as unescaped text ("" when absent), times
    in `zone`."""
    workflow = event.workflow
    failed = event.state not in (None, "Success")
    subject = event.subject  # the JobId, a workflow's RunId, else the event id
    return {
        "id": event.id,
        "kind": event.kind,
        "event_name": event.event_name or "",
        "job_id": subject if subject != event.id else "",
        "tag": event.tag or "",
        "state": event.state or "",
        "code": event.code or "",
        "message": event.message or "",
        "error": ": ".join(filter(None, (event.code, event.message))) if failed else "",
        "queue_id": event.queue_id or "",
        "input": _object(event.input) if event.input else "",
        "outputs": _outputs(event.outputs),
        "output_count": str(len(event.outputs)),
        "user_data": event.user_data or "",
        "template_name": event.template_name or "",
        "workflow_name": (workflow.workflow_name or workflow.workflow_id or "") if workflow else "",
        "run_id": (workflow.run_id or "") if workflow else "",
        "verdict": verdict(event),
        "finished_at": shown(event.finished_at, zone),
        "received_at": shown(event.received_at, zone),
    }


def _object(ref: ObjectRef) -> str:
    return f"{ref.key} ({ref.bucket})" if ref.bucket else ref.key


def _outputs(outputs: list[ObjectRef]) -> str:
    keys = [output.key for output in outputs[:MAX_LISTED_OUTPUTS]]
    more = len(outputs) - len(keys)
    return ", ".join(keys) + (f" (+{more} more)" if more else "")


def verdict(event: Event) -> str:
    """`violation: Porn (score 99)`, `suspected ...`, `normal`; "" for no verdict."""
    moderation = event.moderation
    if moderation is None:
        return ""
    result = moderation.result
    text = "unknown" if result is None else VERDICTS.get(result, f"result {result}")
    if moderation.label and moderation.label != "Normal":
        text += f": {moderation.label}"
    if moderation.score is not None:
        text += f" (score {moderation.score})"
    return text
