"""A readable message about an event, for the chat and e-mail handlers.

A message is a `string.Template` over the fields in `FIELDS` (`$job_id`, `${state}`,
...). The default is `$title` and `$details`: labelled lines that leave out what does
not apply (no error line for a success, no verdict for a transcode). Values are escaped
for the markup of the target (the robots' markdown, Slack's mrkdwn, HTML): they come
from the callback, which anyone who can reach the receiver can forge, so a value must
not make a link, a mention or a line of its own in the message.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from string import Template

from receiver.model import Event, ObjectRef

# Every field a template may use, and what it holds (README: "Message templates").
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
    "finished_at": "when the job ended, UTC",
    "received_at": "when ci-receiver got the callback, UTC",
}
DEFAULT_TEMPLATE = "$title\n$details"
MAX_LISTED_OUTPUTS = 10
VERDICTS = {0: "normal", 1: "violation", 2: "suspected"}


@dataclass(frozen=True, slots=True)
class Markup:
    """How a target writes a bold label and a line break, and what it must escape."""

    bold: Callable[[str], str]
    escape: Callable[[str], str]
    newline: str = "\n"


# What makes markup in the robots' markdown (WeCom, DingTalk, Feishu): links and images
# ([ ] ( ) !), emphasis and code (* _ ~ `), headings and quotes (# >), tags and mentions
# (< > @: <font>, WeCom's <@userid>, Feishu's <at>), tables (|), escapes (\) and
# character references (&).
_MARKDOWN_SPECIAL = re.compile(r"[\[\]()!*_~`#>|<@\\&]")
# What makes a list or a heading underline at the start of a line: "-", "+", "=", "1."
# (and "1)", whose ")" is special anywhere).
_MARKDOWN_LINE_START = re.compile(r"^(\s*\d*)([-+=.])")


def _one_line(text: str) -> str:
    """A value's own line breaks would let it start lines that pass for the message's."""
    return " ".join(text.splitlines())


def _reference(character: str) -> str:
    return f"&#{ord(character)};"


def _markdown_escape(text: str) -> str:
    """Each special character as an HTML character reference, which the three robots show
    as the character itself (their markdown takes HTML, e.g. <font>). Backslash escapes
    are not part of every robot's markdown."""
    text = _MARKDOWN_SPECIAL.sub(lambda match: _reference(match.group()), _one_line(text))
    return _MARKDOWN_LINE_START.sub(lambda match: match[1] + _reference(match[2]), text)


def _slack_escape(text: str) -> str:
    """The three characters Slack's mrkdwn asks to escape: links and mentions need < >.
    Slack has no escape for its emphasis (* _ ~ `)."""
    return _one_line(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


TEXT = Markup(bold=lambda label: label, escape=lambda text: text)
MARKDOWN = Markup(bold=lambda label: f"**{label}**", escape=_markdown_escape)
# DingTalk's markdown joins single newlines into one paragraph.
DINGTALK_MARKDOWN = Markup(
    bold=lambda label: f"**{label}**", escape=_markdown_escape, newline="\n\n"
)
SLACK = Markup(bold=lambda label: f"*{label}*", escape=_slack_escape)
HTML = Markup(
    bold=lambda label: f"<b>{label}</b>",
    escape=lambda text: html.escape(text, quote=False),
    newline="<br>\n",
)


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


def render(template: str, event: Event, markup: Markup) -> str:
    values = {name: markup.escape(value) for name, value in plain_fields(event).items()}
    values["title"] = markup.escape(title(event))
    values["details"] = details(event, markup)
    # The newlines the user wrote are the target's line breaks too.
    return Template(template.replace("\n", markup.newline)).substitute(values)


def title(event: Event) -> str:
    what = event.tag or event.event_name or event.kind
    return f"{what} {event.state}" if event.state else what


def details(event: Event, markup: Markup) -> str:
    fields = plain_fields(event)
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


def plain_fields(event: Event) -> dict[str, str]:
    """Every field but `title` and `details`, as unescaped text ("" when absent)."""
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
        "verdict": _verdict(event),
        "finished_at": _utc(event.finished_at),
        "received_at": _utc(event.received_at),
    }


def _object(ref: ObjectRef) -> str:
    return f"{ref.key} ({ref.bucket})" if ref.bucket else ref.key


def _outputs(outputs: list[ObjectRef]) -> str:
    keys = [output.key for output in outputs[:MAX_LISTED_OUTPUTS]]
    more = len(outputs) - len(keys)
    return ", ".join(keys) + (f" (+{more} more)" if more else "")


def _verdict(event: Event) -> str:
    moderation = event.moderation
    if moderation is None:
        return ""
    result = moderation.result
    verdict = "unknown" if result is None else VERDICTS.get(result, f"result {result}")
    if moderation.label and moderation.label != "Normal":
        verdict += f": {moderation.label}"
    if moderation.score is not None:
        verdict += f" (score {moderation.score})"
    return verdict


def _utc(value: datetime | None) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if value else ""
