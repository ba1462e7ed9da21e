"""`sql` / `sqlite`: keep a `jobs` table of the latest state of every job, upserted.

One row per job (JobId; RunId for workflow instances, the moderation job id for
verdicts), written with SQLAlchemy Core. An upsert never moves a job backwards: a late
`Running` after `Success` leaves the row alone, and replaying an event is harmless.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import JSON, Column, DateTime, Integer, MetaData, String, Table, Text
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from receiver.model import Event

# How far along a job is; an update must not lower it.
STATE_RANK = {"Submitted": 0, "Running": 1, "Pause": 1, "Success": 2, "Failed": 2, "Cancel": 2}
UNKNOWN_STATE_RANK = 1


def jobs_table(metadata: MetaData, name: str) -> Table:
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
        Column("created_at", DateTime(timezone=True)),
        Column("started_at", DateTime(timezone=True)),
        Column("finished_at", DateTime(timezone=True)),
        Column("event_id", String(255), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )


def job_row(event: Event) -> dict[str, Any]:
    run_id = event.workflow.run_id if event.workflow else None
    return {
        "job_id": event.job_id or (run_id if event.kind == "workflow" else None) or event.id,
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
        "created_at": _utc(event.created_at),
        "started_at": _utc(event.started_at),
        "finished_at": _utc(event.finished_at),
        "event_id": event.id,
        "updated_at": datetime.now(timezone.utc),
    }


class SqlOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # An async SQLAlchemy URL, e.g. sqlite+aiosqlite:///jobs.db
    url: str
    table: str = "jobs"


class SqliteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Path
    table: str = "jobs"


class SqlHandler:
    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = SqlOptions.model_validate(options)
        self._url = self.options.url
        self._metadata = MetaData()
        self.jobs = jobs_table(self._metadata, self.options.table)
        self._engine: AsyncEngine | None = None

    async def start(self) -> None:
        self._engine = create_async_engine(self._url)
        async with self._engine.begin() as connection:
            await connection.run_sync(self._metadata.create_all)

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()

    async def __call__(self, event: Event) -> None:
        if self._engine is None:
            raise RuntimeError("the sql handler is not started")
        row = job_row(event)
        statement = sqlite_insert(self.jobs).values(row)
        statement = statement.on_conflict_do_update(
            index_elements=[self.jobs.c.job_id],
            set_={name: statement.excluded[name] for name in row if name != "job_id"},
            where=self.jobs.c.state_rank <= statement.excluded.state_rank,
        )
        async with self._engine.begin() as connection:
            await connection.execute(statement)


class SqliteHandler(SqlHandler):
    """`sql` on a SQLite file, named by `path`."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        sqlite = SqliteOptions.model_validate(options)
        super().__init__({"url": f"sqlite+aiosqlite:///{sqlite.path}", "table": sqlite.table})
        self._path = sqlite.path

    async def start(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        await super().start()


def _utc(value: datetime | None) -> datetime | None:
    return value.astimezone(timezone.utc) if value else None
