"""Content-moderation (审核) callbacks: a JSON family of their own, in two variants.

`Simple` (`{"code", "message", "data": {"event", "trace_id", "result", ...}}`) and
`Detail` (`{"EventName": "ReviewVideo", "JobsDetail": {...}}`, numbers as real ints),
told apart by the `X-Ci-Content-Version` header or, without it, by their shape.
"""

from __future__ import annotations

from typing import Any

from receiver.dedup import dedup_id
from receiver.fields import (
    entry_document,
    identifier,
    integer,
    mapping,
    mappings,
    object_ref,
    object_ref_from_url,
    text,
    timestamp,
)
from receiver.model import Event, Moderation
from receiver.payload import Document


def is_moderation(document: Document) -> bool:
    data = document.data
    if _is_simple(data):
        return True
    event_name = text(data.get("EventName")) or ""
    version = (document.content_version or "").lower()
    return event_name.startswith("Review") or (version == "detail" and "JobsDetail" in data)


def events(document: Document, common: dict[str, Any], warnings: list[str]) -> list[Event]:
    data = document.data
    if _is_simple(data):
        return [_simple_event(data, common)]
    event_name = identifier(data.get("EventName"), "EventName")
    details = mappings(data.get("JobsDetail"))
    return [
        _detail_event(
            detail,
            event_name,
            {**common, "raw": entry_document(data, detail, details)},
            warnings,
        )
        for detail in details
    ]


def _is_simple(data: dict[str, Any]) -> bool:
    return "code" in data and isinstance(data.get("data"), dict)


def _simple_event(data: dict[str, Any], common: dict[str, Any]) -> Event:
    payload = data["data"]
    code = integer(data.get("code"))
    state = "Success" if code == 0 else "Failed"
    job_id = identifier(payload.get("trace_id"), "trace_id")
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
    return _event(
        job_id=job_id,
        state=state,
        event_name=identifier(payload.get("event"), "event"),
        code=text(data.get("code")),
        message=text(data.get("message")),
        input=object_ref_from_url(url),
        verdict=verdict,
        created_at=None,
        entry=data,
        common=common,
    )


def _detail_event(
    detail: dict[str, Any], event_name: str | None, common: dict[str, Any], warnings: list[str]
) -> Event:
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
    return _event(
        job_id=identifier(detail.get("JobId"), "JobId"),
        state=identifier(detail.get("State"), "State"),
        event_name=event_name,
        code=text(detail.get("Code")),
        message=text(detail.get("Message")),
        input=object_ref(detail.get("BucketId"), detail.get("Region"), detail.get("Object"))
        or object_ref_from_url(url),
        verdict=verdict,
        created_at=timestamp(detail.get("CreationTime"), "CreationTime", warnings),
        entry=detail,
        common=common,
    )


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
