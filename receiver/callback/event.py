"""The normalized `Event` every callback becomes, whatever its shape or channel."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import orjson

Kind = Literal["job", "workflow", "moderation"]
Source = Literal["http", "tdmq", "cmq", "cmq-push", "reconcile", "replay"]


@dataclass(slots=True)
class ObjectRef:
    """A COS object: bucket (`name-appid`), region (`ap-chongqing`) and full key."""

    bucket: str | None
    region: str | None
    key: str

    def to_dict(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "region": self.region, "key": self.key}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ObjectRef:
        return cls(bucket=data.get("bucket"), region=data.get("region"), key=data["key"])


@dataclass(slots=True)
class WorkflowRef:
    """The workflow a job or an event belongs to; `name` is the node's name."""

    workflow_id: str | None
    workflow_name: str | None
    name: str | None
    run_id: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "workflow_id": self.workflow_id,
            "workflow_name": self.workflow_name,
            "name": self.name,
            "run_id": self.run_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkflowRef:
        return cls(
            workflow_id=data.get("workflow_id"),
            workflow_name=data.get("workflow_name"),
            name=data.get("name"),
            run_id=data.get("run_id"),
        )


@dataclass(slots=True)
class Task:
    """One node of a finished workflow instance (`WorkflowExecution.Tasks`)."""

    type: str | None
    name: str | None
    job_id: str | None
    state: str | None
    template_id: str | None
    template_name: str | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    outputs: list[ObjectRef] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "name": self.name,
            "job_id": self.job_id,
            "state": self.state,
            "template_id": self.template_id,
            "template_name": self.template_name,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "outputs": [o.to_dict() for o in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        return cls(
            type=data.get("type"),
            name=data.get("name"),
            job_id=data.get("job_id"),
            state=data.get("state"),
            template_id=data.get("template_id"),
            template_name=data.get("template_name"),
            created_at=_dt(data.get("created_at")),
            started_at=_dt(data.get("started_at")),
            finished_at=_dt(data.get("finished_at")),
            outputs=[ObjectRef.from_dict(o) for o in data.get("outputs") or ()],
        )


@dataclass(slots=True)
class Moderation:
    """The verdict of a content-moderation (审核) callback.

    `result`: 0 normal, 1 violation, 2 suspected. `forbidden_state`: 0 not frozen,
    1 frozen, 2 moved. `label` is CI's top label (`Normal`, `Porn`, `Ads`, ...).
    """

    result: int | None
    label: str | None
    score: int | None
    forbidden_state: int | None
    url: str | None
    data_id: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "label": self.label,
            "score": self.score,
            "forbidden_state": self.forbidden_state,
            "url": self.url,
            "data_id": self.data_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Moderation:
        return cls(
            result=data.get("result"),
            label=data.get("label"),
            score=data.get("score"),
            forbidden_state=data.get("forbidden_state"),
            url=data.get("url"),
            data_id=data.get("data_id"),
        )


@dataclass(slots=True, kw_only=True)
class Event:
    """One normalized callback: a job result, a workflow instance or a moderation verdict.

    `id` is the dedup key: the same job reaching the same state gets the same id,
    whether it arrived as XML or JSON, over HTTP or TDMQ. docs/concepts.md documents each field.
    """

    id: str
    kind: Kind
    event_name: str | None
    job_id: str | None
    tag: str | None
    state: str | None
    code: str | None
    message: str | None
    queue_id: str | None
    input: ObjectRef | None
    outputs: list[ObjectRef]
    user_data: str | None
    job_level: int | None
    template_id: str | None
    template_name: str | None
    workflow: WorkflowRef | None
    tasks: list[Task]
    moderation: Moderation | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    format: Literal["xml", "json"]
    source: Source
    source_meta: dict[str, Any]
    received_at: datetime
    operation: dict[str, Any] | None
    raw: dict[str, Any]

    @property
    def subject(self) -> str:
        """What the event is about, as a key: its `job_id` (the JobId, a workflow
        instance's RunId), or for a callback without one the event id."""
        return self.job_id or self.id

    def to_dict(self, *, include_raw: bool = True) -> dict[str, Any]:
        """Plain data (str, int, list, dict, None): datetimes as ISO 8601 strings.
        `include_raw=False` leaves out the decoded document."""
        data = {
            "id": self.id,
            "kind": self.kind,
            "event_name": self.event_name,
            "job_id": self.job_id,
            "tag": self.tag,
            "state": self.state,
            "code": self.code,
            "message": self.message,
            "queue_id": self.queue_id,
            "input": self.input.to_dict() if self.input else None,
            "outputs": [o.to_dict() for o in self.outputs],
            "user_data": self.user_data,
            "job_level": self.job_level,
            "template_id": self.template_id,
            "template_name": self.template_name,
            "workflow": self.workflow.to_dict() if self.workflow else None,
            "tasks": [t.to_dict() for t in self.tasks],
            "moderation": self.moderation.to_dict() if self.moderation else None,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "format": self.format,
            "source": self.source,
            "source_meta": self.source_meta,
            "received_at": _iso(self.received_at),
            "operation": self.operation,
            "raw": self.raw,
        }
        if not include_raw:
            del data["raw"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        workflow = data.get("workflow")
        moderation = data.get("moderation")
        job_id = data.get("job_id")
        if job_id is None and data["kind"] == "workflow" and workflow:
            job_id = workflow.get("run_id")  # stored before workflows had their RunId here
        return cls(
            id=data["id"],
            kind=data["kind"],
            event_name=data.get("event_name"),
            job_id=job_id,
            tag=data.get("tag"),
            state=data.get("state"),
            code=data.get("code"),
            message=data.get("message"),
            queue_id=data.get("queue_id"),
            input=ObjectRef.from_dict(data["input"]) if data.get("input") else None,
            outputs=[ObjectRef.from_dict(o) for o in data.get("outputs") or ()],
            user_data=data.get("user_data"),
            job_level=data.get("job_level"),
            template_id=data.get("template_id"),
            template_name=data.get("template_name"),
            workflow=WorkflowRef.from_dict(workflow) if workflow else None,
            tasks=[Task.from_dict(t) for t in data.get("tasks") or ()],
            moderation=Moderation.from_dict(moderation) if moderation else None,
            created_at=_dt(data.get("created_at")),
            started_at=_dt(data.get("started_at")),
            finished_at=_dt(data.get("finished_at")),
            format=data["format"],
            source=data["source"],
            source_meta=data.get("source_meta") or {},
            received_at=datetime.fromisoformat(data["received_at"]),
            operation=data.get("operation"),
            raw=data.get("raw") or {},
        )

    def copy(self) -> Event:
        """A deep copy, nothing shared: what each handler but one of an event is given.
        Through JSON: ~5x faster than `copy.deepcopy` on a callback's event."""
        return Event.from_json(self.to_json())

    def to_json(self, *, include_raw: bool = True) -> bytes:
        """The JSON form of `to_dict()`, as UTF-8 bytes."""
        if not include_raw:
            return orjson.dumps(self.to_dict(include_raw=False))
        # orjson writes the dataclasses and datetimes itself, to the same bytes, faster.
        return orjson.dumps(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> Event:
        return cls.from_dict(orjson.loads(data))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None
