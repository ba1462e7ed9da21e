"""Content-moderation (审核) callbacks: a JSON family of their own, in two variants.

`Simple` (`{"code", "message", "data": {"event", "trace_id", "result", ...}}`) and
`Detail` (`{"EventName": "ReviewVideo", "JobsDetail": {...}}`, numbers as real ints),
told apart by the `X-Ci-Content-Version` header or, without it, by their shape.

What identifies a verdict's job is read as an identifying field (receiver/callback/fields.py):
Detail's `EventName`, `JobId` and `State`, and Simple's own names for the first two,
`event` and `trace_id` (the JobId of the job that gave the verdict). Simple has no
State: it follows `code`.
"""

from __future__ import annotations

from typing import Any

from receiver.callback.decode import Document
from receiver.callback.dedup import dedup_id
from receiver.callback.event import Event, Moderation
from receiver.callback.fields import (
    entry_document,
    identifying,
    informative,
    integer,
    mapping,
    mappings,
    object_ref,
    object_ref_from_url,
    text,
    timestamp,
)


def is_moderation(document: Document) -> bool:
    data = document.data
    if _is_simple(data):
        return True
    event_name = text(data.get("EventName")) or ""
    version = (document.content_version or "").lower()
    return event_name.startswith("Review") or (version == "detail" and "JobsDetail" in data)


def events(document: Document, common: dict[str, Any]) -> list[tuple[Event, list[str]]]:
    """Each verdict's event, with the fields it sent that only inform but could not be
    read (`receiver.callback.normalize.Read`)."""
    data = document.data
    if _is_simple(data):
        return [_simple_event(data, common)]
    event_name = identifying(data.get("EventName"), "EventName")
    details = mappings(data.get("JobsDetail"))
    return [
        _detail_event(detail, event_name, {**common, "raw": entry_document(data, detail, details)})
        for detail in details
    ]


def _is_simple(data: dict[str, Any]) -> bool:
    return "code" in data and isinstance(data.get("data"), dict)


def _simple_event(data: dict[str, Any], common: dict[str, Any]) -> tuple[Event, list[str]]:
    payload = data["data"]
    warnings: list[str] = []
    code = informative(data.get("code"), "code", warnings)
    state = "Success" if integer(code) == 0 else "Failed"
    job_id = identifying(payload.get("trace_id"), "trace_id")
    url = text(payload.get("url"))
    # Simple carries one block per scene (porn_info, ads_info, ...); the first scene that
    # hit gives the label and score.
    label = score = None
    for scene, info in payload.items():
        info = mapping(info)
        if scene.endswith("_info") and integer(info.get("hit_flag")):
            label = text(info.get("label")) or scene.removesuffix("_info").capitalize()
            score = integer(info.get("score"))
            break
    verdict = Moderation(
        result=integer(payload.get("result")),
        label=label,
        score=score,
        forbidden_state=integer(payload.get("forbidden_status")),
        url=url,
        data_id=text(payload.get("data_id")),
    )
    event = _event(
        job_id=job_id,
        state=state,
        event_name=identifying(payload.get("event"), "event"),
        code=code,
        message=informative(data.get("message"), "message", warnings),
        input=object_ref_from_url(url),
        verdict=verdict,
        created_at=None,
        entry=data,
        common=common,
    )
    return event, warnings


def _detail_event(
    detail: dict[str, Any], event_name: str | None, common: dict[str, Any]
) -> tuple[Event, list[str]]:
    warnings: list[str] = []
    result = detail.get("Result")
    url = text(detail.get("Url"))
    verdict = Moderation(
        # Document and web-page moderation call the verdict Suggestion.
        result=integer(result if result is not None else detail.get("Suggestion")),
        label=text(detail.get("Label")),
        score=integer(detail.get("Score")),
        forbidden_state=integer(detail.get("ForbidState")),
        url=url,
        data_id=text(detail.get("DataId")),
    )
    event = _event(
        job_id=identifying(detail.get("JobId"), "JobId"),
        state=identifying(detail.get("State"), "State"),
        event_name=event_name,
        code=informative(detail.get("Code"), "Code", warnings),
        message=informative(detail.get("Message"), "Message", warnings),
        input=object_ref(detail.get("BucketId"), detail.get("Region"), detail.get("Object"))
        or object_ref_from_url(url),
        verdict=verdict,
        created_at=timestamp(detail.get("CreationTime"), "CreationTime", warnings),
        entry=detail,
        common=common,
    )
    return event, warnings


def _event(
    *,
    job_id: str | None,
    state: str | None,
    event_name: str | None,
    code: str | None,
    message: str | None,
    input: Any,
    verdict: Moderation,
    created_at: Any,
    entry: dict[str, Any],
    common: dict[str, Any],
) -> Event:
    return Event(
        # A human re-review can change the verdict of a job in the same state.
        id=dedup_id("moderation", job_id, state, _str(verdict.result), entry=entry),
        kind="moderation",
        event_name=event_name,
        job_id=job_id,
        tag=None,
        state=state,
        code=code,
        message=message,
        queue_id=None,
        input=input,
        outputs=[],
        user_data=None,
        job_level=None,
        template_id=None,
        template_name=None,
        workflow=None,
        tasks=[],
        moderation=verdict,
        created_at=created_at,
        started_at=None,
        finished_at=None,
        operation=None,
        **common,
    )


def _str(value: int | None) -> str | None:
    return None if value is None else str(value)
