"""Normalize a decoded callback into `Event`s: pure functions, no I/O.

One `TaskFinish` document gives one event per `JobsDetail` entry; a workflow
callback gives one event carrying its tasks; a moderation callback gives one
event per verdict. Beside each event, a callback gives the names of the fields its
entry sent that only inform but could not be read (kept as sent in `raw`), for the
caller to count (receiver/callback/fields.py says which fields are which).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from receiver.callback import moderation
from receiver.callback.decode import DEFAULT_LIMITS, Document, Limits, PayloadError, decode
from receiver.callback.dedup import dedup_id
from receiver.callback.event import Event, ObjectRef, Source, Task, WorkflowRef
from receiver.callback.fields import (
    entry_document,
    identifying,
    informative,
    items,
    job_level,
    mapping,
    mappings,
    object_ref,
    object_ref_from_url,
    reference,
    text,
    timestamp,
    user_data,
)

# An event, and the fields its entry sent that only inform but could not be read as CI
# documents them (`EndTime`, `UserData`, ...: once per occurrence).
Read = tuple[Event, list[str]]


@dataclass(frozen=True, slots=True)
class Normalized:
    """A callback's events and, for each event in the same order, its warnings: the
    fields it sent that only inform but could not be read."""

    events: list[Event]
    warnings: list[list[str]]


def parse_callback(
    body: bytes,
    headers: Mapping[str, str] | None = None,
    *,
    source: Source = "http",
    source_meta: Mapping[str, Any] | None = None,
    received_at: datetime | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> list[Event]:
    """Decode and normalize one callback body. Raises only `PayloadError`."""
    return read_callback(
        body,
        headers,
        source=source,
        source_meta=source_meta,
        received_at=received_at,
        limits=limits,
    ).events


def read_callback(
    body: bytes,
    headers: Mapping[str, str] | None = None,
    *,
    source: Source = "http",
    source_meta: Mapping[str, Any] | None = None,
    received_at: datetime | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Normalized:
    """`parse_callback`, with the warnings. Raises only `PayloadError`."""
    document = decode(body, headers, limits)
    return normalize(
        document,
        source=source,
        source_meta=source_meta,
        received_at=received_at,
        max_events=limits.max_events,
    )


def normalize(
    document: Document,
    *,
    source: Source = "http",
    source_meta: Mapping[str, Any] | None = None,
    received_at: datetime | None = None,
    max_events: int = DEFAULT_LIMITS.max_events,
) -> Normalized:
    """Turn a decoded document into events, or raise `PayloadError` (`unknown_shape`,
    `bad_id`, `too_many_events`)."""
    document = _without_response_wrapper(document)
    data = document.data
    meta = dict(source_meta or {})
    # An HTTP receipt that a CMQ topic pushed is kept as `cmq-push` (receiver/ingest/ingest.py):
    # decoded again, it is found so again, and its metadata with it.
    if source in ("http", "cmq-push") and _came_through_cmq(document, meta):
        source = "cmq-push"
    common = {
        "format": document.format,
        "source": source,
        "source_meta": meta,
        "received_at": received_at or datetime.now(timezone.utc),
        "raw": data,
    }
    event_name = identifying(data.get("EventName"), "EventName")
    read: list[Read]
    if moderation.is_moderation(document):
        read = moderation.events(document, common)
    elif "WorkflowExecution" in data:
        read = [_workflow_event(mapping(data["WorkflowExecution"]), event_name, common)]
    elif "JobsDetail" in data:
        details = mappings(data["JobsDetail"])
        _check_count(details, max_events)
        read = [
            _job_event(detail, event_name, {**common, "raw": entry_document(data, detail, details)})
            for detail in details
        ]
    else:
        raise PayloadError(
            "unknown_shape", "no JobsDetail, WorkflowExecution or moderation result found"
        )
    if not read:
        raise PayloadError("unknown_shape", "the callback holds no job, workflow or verdict")
    _check_count(read, max_events)
    return Normalized([event for event, _ in read], [warnings for _, warnings in read])


def _without_response_wrapper(document: Document) -> Document:
    """A JSON callback written as `{"Response": {...}}` (the XML root kept, as on the
    WordsGeneralize page) reads as the XML one does: the root unwrapped."""
    data = document.data
    if document.format == "json" and data.keys() == {"Response"}:
        inner = data["Response"]
        if isinstance(inner, dict):
            return dataclasses.replace(document, data=inner)
    return document


def _check_count(entries: list[Any], max_events: int) -> None:
    if len(entries) > max_events:
        raise PayloadError(
            "too_many_events", f"{len(entries)} entries in one callback, the limit is {max_events}"
        )


def _came_through_cmq(document: Document, meta: dict[str, Any]) -> bool:
    """A TDMQ-CMQ topic pushed this: a JSON envelope, or the SIMPLIFIED body + CMQ headers."""
    if document.envelope is not None:
        envelope = document.envelope
        meta.update(
            topic_owner=envelope.get("TopicOwner"),
            topic_name=envelope.get("topicName"),
            subscription_name=envelope.get("subscriptionName"),
            message_id=envelope.get("msgId"),
            publish_time=envelope.get("publishTime"),
        )
        return True
    message_id = document.headers.get("x-cmq-message-id")
    if message_id is not None:
        meta.update(message_id=message_id, message_tag=document.headers.get("x-cmq-message-tag"))
        return True
    return False


# --- jobs ------------------------------------------------------------------------------


def _job_event(detail: dict[str, Any], event_name: str | None, common: dict[str, Any]) -> Read:
    operation = detail.get("Operation")
    op = mapping(operation)
    source_input = mapping(detail.get("Input"))
    job_id = identifying(detail.get("JobId"), "JobId")
    state = identifying(detail.get("State"), "State")
    warnings: list[str] = []
    event = Event(
        id=dedup_id("job", job_id, state, entry=detail),
        kind="job",
        event_name=event_name or "TaskFinish",
        job_id=job_id,
        tag=identifying(detail.get("Tag"), "Tag"),
        state=state,
        code=informative(detail.get("Code"), "Code", warnings),
        message=informative(detail.get("Message"), "Message", warnings),
        queue_id=reference(detail.get("QueueId"), "QueueId", warnings),
        input=object_ref(
            source_input.get("BucketId"), source_input.get("Region"), source_input.get("Object")
        ),
        outputs=_job_outputs(op, succeeded=state == "Success"),
        user_data=user_data(op.get("UserData"), warnings),
        job_level=job_level(op.get("JobLevel"), warnings),
        template_id=reference(op.get("TemplateId"), "TemplateId", warnings),
        template_name=informative(op.get("TemplateName"), "TemplateName", warnings),
        workflow=_workflow_ref(detail.get("Workflow"), warnings),
        tasks=[],
        moderation=None,
        created_at=timestamp(detail.get("CreationTime"), "CreationTime", warnings),
        started_at=timestamp(detail.get("StartTime"), "StartTime", warnings),
        finished_at=timestamp(detail.get("EndTime"), "EndTime", warnings),
        operation=operation if isinstance(operation, dict) else None,
        **common,
    )
    return event, warnings


def _job_outputs(operation: dict[str, Any], *, succeeded: bool) -> list[ObjectRef]:
    """Every file the job produced, as full keys."""
    refs: list[ObjectRef] = []
    media = mapping(operation.get("MediaResult"))
    for output_file in mappings(media.get("OutputFile")):
        refs += _output_file(output_file)
        # Snapshot nests the sprite sheet inside OutputFile; accept it beside it too.
        for sprite in mappings(output_file.get("SpriteOutputFile")):
            refs += _output_file(sprite)
    for sprite in mappings(media.get("SpriteOutputFile")):
        refs += _output_file(sprite)

    target = mapping(operation.get("Output"))
    picture = mapping(operation.get("PicProcessResult"))
    for name in items(picture.get("ObjectName")):
        if ref := object_ref(target.get("Bucket"), target.get("Region"), name):
            refs.append(ref)

    # A job without a result node (file jobs, most AI jobs) wrote its Output.Object,
    # unless that is still a template such as `cover-${Number}.jpg`.
    if not refs and succeeded:
        key = text(target.get("Object"))
        if key and "${" not in key:
            refs.append(ObjectRef(text(target.get("Bucket")), text(target.get("Region")), key))
    if len(refs) > 1:  # the same file named twice (a sprite in both places) is one output
        refs = list({(r.bucket, r.region, r.key): r for r in refs}.values())
    return refs


def _output_file(output_file: dict[str, Any]) -> list[ObjectRef]:
    # Snapshot gives bare names under a prefix (`output/snapshot-` + `0.jpg`); SmartCover
    # gives full keys with an empty prefix. A name that already starts with the prefix is
    # taken as a full key.
    prefix = text(output_file.get("ObjectPrefix")) or ""
    bucket, region = text(output_file.get("Bucket")), text(output_file.get("Region"))
    refs = []
    for name in items(output_file.get("ObjectName")):
        name = text(name)
        if name is None:
            continue
        key = name if name.startswith(prefix) else prefix + name
        refs.append(ObjectRef(bucket, region, key))
    return refs


def _workflow_ref(value: Any, warnings: list[str]) -> WorkflowRef | None:
    workflow = mapping(value)
    if not workflow:
        return None
    return WorkflowRef(
        workflow_id=reference(workflow.get("WorkflowId"), "WorkflowId", warnings),
        workflow_name=text(workflow.get("WorkflowName")),
        name=text(workflow.get("Name")),
        run_id=identifying(workflow.get("RunId"), "RunId"),
    )


# --- workflows -------------------------------------------------------------------------


def _workflow_event(
    execution: dict[str, Any], event_name: str | None, common: dict[str, Any]
) -> Read:
    event_name = event_name or "WorkflowFinish"
    run_id = identifying(execution.get("RunId"), "RunId")
    state = identifying(execution.get("State"), "State")
    bucket = execution.get("BucketId")
    warnings: list[str] = []
    tasks = [_task(task, bucket, warnings) for task in mappings(execution.get("Tasks"))]
    outputs = [ref for task in tasks for ref in task.outputs]
    # WorkflowExecution names no region; the task outputs' URLs do.
    region = next((ref.region for ref in outputs if ref.region), None)
    finished = [task.finished_at for task in tasks if task.finished_at]
    ended = timestamp(execution.get("EndTime"), "EndTime", warnings)
    event = Event(
        id=dedup_id("workflow", run_id, event_name, state, entry=execution),
        kind="workflow",
        event_name=event_name,
        # What a workflow instance is known by, as a job by its JobId.
        job_id=run_id,
        tag=None,
        state=state,
        code=None,
        message=None,
        queue_id=None,
        input=object_ref(bucket, region, execution.get("Object")),
        outputs=outputs,
        user_data=None,
        job_level=None,
        template_id=None,
        template_name=None,
        workflow=WorkflowRef(
            workflow_id=reference(execution.get("WorkflowId"), "WorkflowId", warnings),
            workflow_name=text(execution.get("WorkflowName")),
            name=None,
            run_id=run_id,
        ),
        tasks=tasks,
        moderation=None,
        created_at=timestamp(execution.get("CreateTime"), "CreateTime", warnings),
        started_at=timestamp(execution.get("StartTime"), "StartTime", warnings),
        finished_at=ended or (max(finished) if finished else None),
        operation=None,
        **common,
    )
    return event, warnings


def _task(task: dict[str, Any], bucket: Any, warnings: list[str]) -> Task:
    result = mapping(task.get("ResultInfo"))
    outputs = []
    for info in mappings(result.get("ObjectInfo")):
        name = text(info.get("ObjectName"))
        ref = object_ref_from_url(info.get("ObjectUrl"), bucket) or object_ref(
            bucket, None, name.lstrip("/") if name else None
        )
        if ref:
            outputs.append(ref)
    return Task(
        type=text(task.get("Type")),
        name=text(task.get("Name")),
        job_id=identifying(task.get("JobId"), "JobId"),
        state=identifying(task.get("State"), "State"),
        template_id=reference(task.get("TemplateId"), "TemplateId", warnings),
        template_name=informative(task.get("TemplateName"), "TemplateName", warnings),
        created_at=timestamp(task.get("CreateTime"), "CreateTime", warnings),
        started_at=timestamp(task.get("StartTime"), "StartTime", warnings),
        finished_at=timestamp(task.get("EndTime"), "EndTime", warnings),
        outputs=outputs,
    )
