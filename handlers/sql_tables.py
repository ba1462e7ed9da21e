"""The tables of the `sql` handler and one event's rows (sql_schema.py puts the tables
in the database).

Written once in SQLAlchemy Core for SQLite, PostgreSQL and MySQL/MariaDB. Datetimes
are stored in UTC: PostgreSQL as `timestamptz`, the other two, which keep no offset,
as naive UTC (MySQL as `DATETIME(6)`, keeping microseconds), and read back as aware
UTC datetimes on all three.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.types import TypeEngine

from receiver.callback.event import Event

# How far along a job is; an update must not lower it.
STATE_RANK = {"Submitted": 0, "Running": 1, "Pause": 1, "Success": 2, "Failed": 2, "Cancel": 2}
UNKNOWN_STATE_RANK = 1


class UtcDateTime(TypeDecorator[datetime]):
    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(timezone.utc)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def jobs_table(metadata: MetaData, name: str, schema: str | None = None) -> Table:
    """The latest known state of each job: one row per JobId (a workflow's RunId)."""
    return Table(
        name,
        metadata,
        Column("job_id", String(128), primary_key=True),
        Column("kind", String(16), nullable=False),
        Column("event_name", String(64)),
        Column("tag", String(64)),
        Column("state", String(32)),
        Column("state_rank", Integer, nullable=False),
        Column("code", String(128)),
        Column("message", Text),
        Column("queue_id", String(64)),
        Column("input_bucket", String(128)),
        Column("input_region", String(64)),
        Column("input_key", Text),
        Column("outputs", JSON, nullable=False),
        Column("user_data", Text),
        Column("job_level", Integer),
        Column("template_id", String(128)),
        Column("template_name", String(255)),
        Column("workflow", JSON),
        Column("moderation", JSON),
        Column("created_at", UtcDateTime),
        Column("started_at", UtcDateTime),
        Column("finished_at", UtcDateTime),
        Column("event_id", String(255), nullable=False),
        Column("updated_at", UtcDateTime, nullable=False),
        schema=schema,
        mysql_charset="utf8mb4",
    )


def events_table(metadata: MetaData, name: str, schema: str | None = None) -> Table:
    """Every event once, by event id: the history behind the jobs table."""
    return Table(
        name,
        metadata,
        Column("event_id", String(255), primary_key=True),
        Column("job_id", String(128), nullable=False),
        Column("kind", String(16), nullable=False),
        Column("event_name", String(64)),
        Column("tag", String(64)),
        Column("state", String(32)),
        Column("code", String(128)),
        Column("message", Text),
        Column("finished_at", UtcDateTime),
        Column("received_at", UtcDateTime, nullable=False),
        Column("source", String(16), nullable=False),
        # Event.to_dict(), `raw` left out unless asked for.
        Column("event", JSON, nullable=False),
        Index(f"ix_{name}_job_id", "job_id"),
        schema=schema,
        mysql_charset="utf8mb4",
    )


def row_key(event: Event) -> str:
    """The jobs-table key: JobId; a workflow instance's RunId; else the event id."""
    return event.subject


def job_row(event: Event) -> dict[str, Any]:
    return {
        "job_id": row_key(event),
        "kind": event.kind,
        "event_name": event.event_name,
        "tag": event.tag,
        "state": event.state,
        "state_rank": STATE_RANK.get(event.state or "", UNKNOWN_STATE_RANK),
        "code": event.code,
        "message": event.message,
        "queue_id": event.queue_id,
        "input_bucket": event.input.bucket if event.input else None,
        "input_region": event.input.region if event.input else None,
        "input_key": event.input.key if event.input else None,
        "outputs": [output.to_dict() for output in event.outputs],
        "user_data": event.user_data,
        "job_level": event.job_level,
        "template_id": event.template_id,
        "template_name": event.template_name,
        "workflow": event.workflow.to_dict() if event.workflow else None,
        "moderation": event.moderation.to_dict() if event.moderation else None,
        "created_at": event.created_at,
        "started_at": event.started_at,
        "finished_at": event.finished_at,
        "event_id": event.id,
        "updated_at": datetime.now(timezone.utc),
    }


def event_row(event: Event, include_raw: bool) -> dict[str, Any]:
    record = event.to_dict(include_raw=include_raw)
    return {
        "event_id": event.id,
        "job_id": row_key(event),
        "kind": event.kind,
        "event_name": event.event_name,
        "tag": event.tag,
        "state": event.state,
        "code": event.code,
        "message": event.message,
        "finished_at": event.finished_at,
        "received_at": event.received_at,
        "source": event.source,
        "event": record,
    }
