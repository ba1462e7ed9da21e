"""The `sql` handler on real databases: every test runs on SQLite (a temp file), the
machine's PostgreSQL and its MariaDB (see the `database_url` fixture)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import sqlite3
import subprocess
import sys
import uuid
from contextlib import closing
from datetime import datetime, timezone

import pytest
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    inspect,
    make_url,
    select,
    text,
)
from sqlalchemy.ext.asyncio import create_async_engine
from structlog.testing import capture_logs

import handlers
from handlers import Fail
from handlers.sql import SqlHandler, async_url
from handlers.sql_schema import REGISTRY, registry_table
from handlers.sql_tables import events_table, job_row, jobs_table
from receiver.ownership import NotOurs
from tests.support.callbacks import load
from tests.support.databases import execute
from tests.support.processes import REPO
from tests.support.sample_events import at_state, event
from tests.support.waiting import eventually


async def started(options) -> SqlHandler:
    handler = SqlHandler(options)
    await handler.start()
    return handler


async def rows(handler: SqlHandler, table) -> list[dict]:
    engine = create_async_engine(async_url(handler.options.url))
    try:
        async with engine.connect() as connection:
            result = await connection.execute(select(table))
            return [dict(row._mapping) for row in result]
    finally:
        await engine.dispose()


async def test_a_job_is_stored_with_every_field(sql_options):
    handler = await started(sql_options)
    smartcover = event("smartcover.xml")
    try:
        await handler(smartcover)
    finally:
        await handler.close()

    [row] = await rows(handler, handler.jobs)
    assert row["job_id"] == smartcover.job_id
    assert (row["kind"], row["tag"], row["state"]) == ("job", "SmartCover", "Success")
    assert row["event_id"] == smartcover.id
    assert row["input_key"] == smartcover.input.key
    assert row["input_bucket"] == smartcover.input.bucket
    assert row["outputs"] == [output.to_dict() for output in smartcover.outputs]
    assert len(row["outputs"]) == 5
    assert row["user_data"] == smartcover.user_data
    assert row["queue_id"] == smartcover.queue_id
    for name in ("created_at", "started_at", "finished_at"):
        assert row[name] == getattr(smartcover, name)
        assert row[name].tzinfo == timezone.utc
    assert row["updated_at"].tzinfo == timezone.utc


async def test_datetimes_are_stored_in_utc(sql_options):
    handler = await started(sql_options)
    smartcover = event("smartcover.xml")  # 15:29:48 +08:00 in the callback
    try:
        await handler(smartcover)
    finally:
        await handler.close()

    # Read around the handler's own type: what is actually in the column.
    engine = create_async_engine(async_url(handler.options.url))
    try:
        async with engine.connect() as connection:
            table = connection.dialect.identifier_preparer.quote(handler.jobs.name)
            stored = (await connection.execute(text(f"SELECT finished_at FROM {table}"))).scalar()
    finally:
        await engine.dispose()
    if isinstance(stored, str):  # SQLite keeps text
        stored = datetime.fromisoformat(stored)
    if stored.tzinfo is None:  # SQLite and MySQL keep no offset: it must be UTC
        assert stored == datetime(2022, 6, 30, 7, 29, 48)
    else:
        assert stored == datetime(2022, 6, 30, 7, 29, 48, tzinfo=timezone.utc)


async def test_replaying_an_event_changes_nothing(sql_options):
    handler = await started(sql_options)
    failed = event("smartcover_failed.xml")
    try:
        await handler(failed)
        [before] = await rows(handler, handler.jobs)
        await handler(failed)
    finally:
        await handler.close()

    [after] = await rows(handler, handler.jobs)
    assert {k: v for k, v in after.items() if k != "updated_at"} == {
        k: v for k, v in before.items() if k != "updated_at"
    }
    assert (after["code"], after["message"]) == (failed.code, failed.message)
    history = await rows(handler, handler.events)
    assert [row["event_id"] for row in history] == [failed.id]


async def test_a_late_event_does_not_move_a_job_backwards(sql_options):
    handler = await started(sql_options)
    success = event("transcode.xml")
    running = at_state(success, "Running")
    try:
        await handler(success)
        await handler(running)  # arrives late, e.g. a retried delivery
    finally:
        await handler.close()

    [row] = await rows(handler, handler.jobs)
    assert (row["state"], row["event_id"]) == ("Success", success.id)
    assert row["outputs"] == [output.to_dict() for output in success.outputs]
    history = await rows(handler, handler.events)
    assert sorted(row["event_id"] for row in history) == sorted([success.id, running.id])


async def test_a_job_moves_forwards(sql_options):
    handler = await started(sql_options)
    success = event("transcode.xml")
    submitted = at_state(success, "Submitted")
    try:
        await handler(submitted)
        await handler(at_state(success, "Running"))
        await handler(success)
    finally:
        await handler.close()

    [row] = await rows(handler, handler.jobs)
    assert (row["state"], row["event_id"], row["state_rank"]) == ("Success", success.id, 2)


async def test_concurrent_events_of_one_job_end_at_its_furthest_state(sql_options):
    handler = await started(sql_options)
    success = event("snapshot.xml")
    states = ["Running", "Submitted", "Success", "Running", "Pause", "Submitted", "Running"]
    try:
        await handler(at_state(success, "Submitted"))
        await asyncio.gather(*(handler(at_state(success, state)) for state in states))
    finally:
        await handler.close()

    [row] = await rows(handler, handler.jobs)
    assert (row["state"], row["event_id"]) == ("Success", f"job:{success.job_id}:Success")
    history = await rows(handler, handler.events)
    assert len(history) == len(set(states))


async def test_workflows_and_verdicts_get_rows_of_their_own(sql_options):
    handler = await started(sql_options)
    workflow = event("workflow_finish.xml")
    verdict = event("moderation_video_detail.json")
    try:
        await handler(workflow)
        await handler(verdict)
    finally:
        await handler.close()

    found = {row["kind"]: row for row in await rows(handler, handler.jobs)}
    assert found["workflow"]["job_id"] == workflow.workflow.run_id
    assert found["workflow"]["workflow"]["workflow_name"] == workflow.workflow.workflow_name
    assert found["moderation"]["job_id"] == verdict.job_id
    assert found["moderation"]["moderation"]["result"] == 1


async def test_missing_columns_are_added_on_start(sql_options):
    # A jobs table as an older version made it, before tables were registered: fewer
    # columns, one row.
    engine = create_async_engine(async_url(sql_options["url"]))
    old = Table(
        sql_options["table"],
        MetaData(),
        Column("job_id", String(128), primary_key=True),
        Column("kind", String(16), nullable=False),
        Column("state", String(32)),
        Column("state_rank", Integer, nullable=False),
        Column("outputs", JSON, nullable=False),
        Column("event_id", String(255), nullable=False),
        Column("updated_at", DateTime, nullable=False),
    )
    try:
        async with engine.begin() as connection:
            await connection.run_sync(old.metadata.create_all)
            await connection.execute(
                old.insert().values(
                    job_id="jold",
                    kind="job",
                    state="Success",
                    state_rank=2,
                    outputs=[],
                    event_id="e",
                    updated_at=datetime(2026, 1, 1),
                )
            )
    finally:
        await engine.dispose()

    handler = await started(sql_options)
    try:
        await handler(event("smartcover.xml"))
    finally:
        await handler.close()

    engine = create_async_engine(async_url(sql_options["url"]))
    try:
        async with engine.connect() as connection:
            columns = await connection.run_sync(
                lambda sync: {c["name"] for c in inspect(sync).get_columns(sql_options["table"])}
            )
    finally:
        await engine.dispose()
    assert columns == {column.name for column in handler.jobs.columns}
    found = {row["job_id"]: row for row in await rows(handler, handler.jobs)}
    assert found["jold"]["state"] == "Success"
    assert found["jold"]["tag"] is None
    assert found[event("smartcover.xml").job_id]["tag"] == "SmartCover"


def bad_credentials(url: str, tmp_path) -> tuple[str, str]:
    """A URL that must fail at start, and what the error has to say."""
    if url.startswith("sqlite"):
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        return f"sqlite:///{blocker}/jobs.db", "FileExistsError"
    if url.startswith("postgresql"):
        # The machine's PostgreSQL trusts local connections: no password can be wrong
        # there, but a login role can be missing.
        return "postgresql://no_such_role_ci:wrongpassword@127.0.0.1:5432/test", (
            'role "no_such_role_ci" does not exist'
        )
    return "mysql://root:wrongpassword@127.0.0.1:3306/test", "Access denied for user 'root'"


async def test_start_fails_with_a_clear_error_on_bad_credentials(database_url, tmp_path):
    url, says = bad_credentials(database_url, tmp_path)
    handler = SqlHandler({"url": url})
    with pytest.raises(RuntimeError) as raised:
        await handler.start()
    message = str(raised.value)
    assert message.startswith("cannot open ")
    assert says in message
    assert "wrongpassword" not in message
    await handler.close()


def test_a_missing_driver_is_named_at_check_config(tmp_path):
    # asyncpg is installed here; a package of that name that fails to import stands in
    # for a machine without it (the only stand-in in these tests).
    shadow = tmp_path / "shadow" / "asyncpg"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named asyncpg')\n")
    config = tmp_path / "ci-receiver.toml"
    config.write_text('[handlers.db]\ntype = "sql"\nurl = "postgresql://u:p@db.example/x"\n')
    result = subprocess.run(
        [sys.executable, "-m", "receiver.cli", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": f"{tmp_path / 'shadow'}{os.pathsep}{REPO}"},
        timeout=60,
    )
    assert result.returncode == 1
    assert "handlers.db: url: the driver for postgresql+asyncpg is not installed" in result.stderr
    assert "pip install 'ci-receiver[postgres]'" in result.stderr


def test_unsupported_databases_are_refused_by_name():
    with pytest.raises(handlers.HandlerConfigError, match="'oracle' is not supported"):
        handlers.build("sql", {"url": "oracle://u:p@h/db"})


def test_check_config_hides_the_database_password(tmp_path):
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        '[handlers.db]\ntype = "sql"\nurl = "postgresql://app:s3cret@db.example/jobs"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "receiver.cli", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout
    assert "postgresql://app:***@db.example/jobs" in result.stdout


# --- only its own tables ------------------------------------------------------------


async def users_jobs_table(
    url: str, schema: str | None, name: str = "jobs", key: str = "id"
) -> Table:
    """A table of the user's that happens to be called `jobs` (or `name`), with a row;
    its primary key `key` (`job_id`: the name ci-receiver's own table keys by)."""
    table = Table(
        name,
        MetaData(),
        Column(key, String(64), primary_key=True),
        Column("name", String(64)),
        Column("created_at", DateTime),
        schema=schema,
    )
    engine = create_async_engine(async_url(url))
    try:
        async with engine.begin() as connection:
            await connection.run_sync(table.metadata.create_all)
            await connection.execute(
                table.insert().values(
                    {key: "7", "name": "theirs", "created_at": datetime(2026, 1, 1)}
                )
            )
    finally:
        await engine.dispose()
    return table


async def snapshot(url: str, table: Table) -> tuple[list, list, list]:
    """A table's columns, indexes and rows: what ci-receiver must leave as they are."""
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as connection:

            def described(sync) -> tuple[list, list]:
                found = inspect(sync)
                columns = found.get_columns(table.name, schema=table.schema)
                indexes = found.get_indexes(table.name, schema=table.schema)
                return [(c["name"], str(c["type"])) for c in columns], indexes

            columns, indexes = await connection.run_sync(described)
            rows = [tuple(row) for row in await connection.execute(select(table))]
    finally:
        await engine.dispose()
    return columns, indexes, rows


async def registered(url: str, schema: str | None) -> dict[str, str]:
    """The registry's tables, by what they hold (none without a registry)."""
    registry = registry_table(MetaData(), schema)
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as connection:
            if not await connection.run_sync(
                lambda sync: inspect(sync).has_table(REGISTRY, schema=schema)
            ):
                return {}
            result = await connection.execute(select(registry.c.table_name, registry.c.holds))
            return dict(result.all())
    finally:
        await engine.dispose()


def place_options(url: str, schema: str | None, **options) -> dict:
    return {"url": url, **({"schema": schema} if schema else {}), **options}


async def test_a_table_it_did_not_create_is_left_as_it_is(sql_place):
    url, schema = sql_place
    theirs = await users_jobs_table(url, schema)
    before = await snapshot(url, theirs)

    handler = SqlHandler(place_options(url, schema, table="jobs", history=True))
    with pytest.raises(NotOurs) as refused:
        await handler.start()
    await handler.close()

    message = str(refused.value)
    assert message.startswith(f"table '{schema + '.' if schema else ''}jobs' in ")
    assert "was not created by ci-receiver" in message
    assert "set `table`" in message
    assert ("`schema`" in message) == (not url.startswith("sqlite"))
    assert await snapshot(url, theirs) == before
    assert "jobs" not in await registered(url, schema)


async def test_by_default_its_tables_are_made_beside_a_users_jobs_table(sql_place):
    url, schema = sql_place
    theirs = await users_jobs_table(url, schema)
    before = await snapshot(url, theirs)

    handler = await started(place_options(url, schema, history=True))
    try:
        await handler(event("smartcover.xml"))
    finally:
        await handler.close()

    assert (handler.jobs.name, handler.events.name) == ("ci_jobs", "ci_events")
    [row] = await rows(handler, handler.jobs)
    assert row["job_id"] == event("smartcover.xml").job_id
    assert await snapshot(url, theirs) == before
    assert await registered(url, schema) == {"ci_jobs": "jobs", "ci_events": "events"}


async def test_the_tables_of_an_earlier_default_are_adopted_with_their_data(sql_place):
    # `jobs` and `events` as an earlier version made them by default, before there was a
    # registry.
    url, schema = sql_place
    metadata = MetaData()
    old = jobs_table(metadata, "jobs", schema)
    events_table(metadata, "events", schema)
    engine = create_async_engine(async_url(url))
    try:
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
            await connection.execute(old.insert(), job_row(event("transcode.xml")))
    finally:
        await engine.dispose()

    for _ in range(2):  # adopted, then found registered
        handler = await started(place_options(url, schema, history=True))
        try:
            await handler(event("smartcover.xml"))
        finally:
            await handler.close()
        assert (handler.jobs.name, handler.events.name) == ("jobs", "events")

    found = {row["job_id"] for row in await rows(handler, handler.jobs)}
    assert found == {event("transcode.xml").job_id, event("smartcover.xml").job_id}
    assert len(await rows(handler, handler.events)) == 1
    assert await registered(url, schema) == {"jobs": "jobs", "events": "events"}
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as connection:
            tables = await connection.run_sync(
                lambda sync: inspect(sync).get_table_names(schema=schema)
            )
    finally:
        await engine.dispose()
    assert not {"ci_jobs", "ci_events"} & set(tables)


@pytest.mark.parametrize("key", ["id", "job_id"])
async def test_a_users_table_in_place_of_a_registered_one_is_left_as_it_is(sql_place, key):
    # ci-receiver made and registered ci_jobs; the user dropped it and made their own
    # under the name, which the registry still lists (keyed as ours was, or not).
    url, schema = sql_place
    handler = await started(place_options(url, schema))
    await handler.close()
    qualified = f"{schema}.ci_jobs" if schema else "ci_jobs"
    await execute(url, f"DROP TABLE {qualified}")
    theirs = await users_jobs_table(url, schema, "ci_jobs", key)
    before = await snapshot(url, theirs)
    assert await registered(url, schema) == {"ci_jobs": "jobs"}

    handler = SqlHandler(place_options(url, schema))
    with pytest.raises(NotOurs) as refused:
        await handler.start()
    await handler.close()

    assert str(refused.value).startswith(f"table '{qualified}' in ")
    assert "was not created by ci-receiver, so it is left as it is; set `table`" in str(
        refused.value
    )
    assert await snapshot(url, theirs) == before


async def users_registry(url: str, schema: str | None) -> Table:
    """A table of the user's under the registry's name."""
    theirs = Table(REGISTRY, MetaData(), Column("id", Integer, primary_key=True), schema=schema)
    engine = create_async_engine(async_url(url))
    try:
        async with engine.begin() as connection:
            await connection.run_sync(theirs.metadata.create_all)
    finally:
        await engine.dispose()
    return theirs


async def test_a_registry_it_did_not_create_is_left_as_it_is(sql_place):
    url, schema = sql_place
    theirs = await users_registry(url, schema)

    handler = SqlHandler(place_options(url, schema))
    with pytest.raises(NotOurs) as refused:
        await handler.start()
    await handler.close()

    # The option that points it elsewhere: a schema on a server, another file on SQLite
    # (which has no schema to set).
    elsewhere = "`schema`" if schema else "`url`"
    assert re.fullmatch(
        f"table '.*{REGISTRY}' in .* was not created by ci-receiver, so it is left as it"
        f" is; set {elsewhere} to use another",
        str(refused.value),
    )
    assert (await snapshot(url, theirs))[0] == [("id", "INTEGER")]


async def test_a_sqlite_handler_names_its_path_for_a_registry_it_did_not_create(tmp_path):
    path = tmp_path / "app.db"
    await users_registry(f"sqlite:///{path}", None)

    handler = handlers.build("sqlite", {"path": str(path)})
    with pytest.raises(NotOurs, match=r"so it is left as it is; set `path` to use another$"):
        await handler.start()
    await handler.close()


def journal_mode(path) -> str:
    with closing(sqlite3.connect(path)) as connection:
        return connection.execute("PRAGMA journal_mode").fetchone()[0]


async def test_a_refused_start_leaves_a_users_sqlite_file_byte_for_byte(tmp_path):
    # The user's file is in SQLite's own default journal mode: WAL would be a change to
    # it that stays.
    path = tmp_path / "app.db"
    await users_jobs_table(f"sqlite:///{path}", None)
    assert journal_mode(path) == "delete"
    before = path.read_bytes()

    handler = SqlHandler({"url": f"sqlite:///{path}", "table": "jobs", "history": True})
    with pytest.raises(NotOurs):
        await handler.start()
    await handler.close()

    assert path.read_bytes() == before  # no registry beside their table either
    assert [found.name for found in tmp_path.iterdir()] == ["app.db"]  # no -wal, -shm
    assert journal_mode(path) == "delete"


async def test_only_a_sqlite_file_of_its_own_tables_is_put_in_wal_mode(tmp_path):
    own, shared = tmp_path / "jobs.db", tmp_path / "app.db"
    theirs = await users_jobs_table(f"sqlite:///{shared}", None)

    async def start_and_store(path) -> None:
        handler = await started({"url": f"sqlite:///{path}", "history": True})
        try:
            await handler(event("smartcover.xml"))
        finally:
            await handler.close()

    for path in (own, shared):
        await start_and_store(path)
    assert journal_mode(own) == "wal"
    assert journal_mode(shared) == "delete"  # their jobs table is beside ours

    # Once the user's table is gone, the file is ci-receiver's alone.
    await execute(f"sqlite:///{shared}", f"DROP TABLE {theirs.name}")
    await start_and_store(shared)
    assert journal_mode(shared) == "wal"


async def test_a_sqlite_file_of_two_handlers_tables_is_theirs(tmp_path):
    # Two `sql` handlers share a file, beside a table of the user's (so it stays in its
    # journal mode); once the user's table is gone, each finds only ci-receiver's tables.
    path = tmp_path / "app.db"
    theirs = await users_jobs_table(f"sqlite:///{path}", None)
    mine = {"url": f"sqlite:///{path}", "history": True}
    other = {"url": f"sqlite:///{path}", "table": "other_jobs"}

    async def start_both() -> None:
        for options in (mine, other):
            handler = await started(options)
            await handler.close()

    await start_both()
    assert journal_mode(path) == "delete"
    await execute(f"sqlite:///{path}", f"DROP TABLE {theirs.name}")
    with capture_logs() as logs:
        await start_both()

    assert not [log for log in logs if "did not create" in log["event"]]
    assert journal_mode(path) == "wal"


@pytest.fixture
async def schema_owner(postgres_schema):
    """A login role of this test's own owning its schema, with no right to create schemas
    (no CREATE on the database, which other tests share): (its URL, the schema). Both are
    dropped after."""
    url, schema = postgres_schema
    role = f"test_{uuid.uuid4().hex[:12]}"
    await execute(
        url, f'CREATE ROLE "{role}" LOGIN', f'CREATE SCHEMA "{schema}" AUTHORIZATION "{role}"'
    )
    yield make_url(url).set(username=role).render_as_string(hide_password=False), schema
    await execute(url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE', f'DROP ROLE "{role}"')


async def test_a_role_owning_its_schema_needs_no_right_to_create_schemas(schema_owner):
    url, schema = schema_owner
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as connection:
            may_create = await connection.scalar(
                text("SELECT has_database_privilege(current_database(), 'CREATE')")
            )
    finally:
        await engine.dispose()
    assert may_create is False

    handler = await started({"url": url, "schema": schema, "history": True})
    try:
        await handler(event("smartcover.xml"))
    finally:
        await handler.close()

    [row] = await rows(handler, handler.jobs)
    assert row["job_id"] == event("smartcover.xml").job_id
    assert await registered(url, schema) == {"ci_jobs": "jobs", "ci_events": "events"}


async def test_a_missing_postgres_schema_is_created(postgres_schema):
    url, schema = postgres_schema
    handler = await started({"url": url, "schema": schema})
    try:
        await handler(event("smartcover.xml"))
    finally:
        await handler.close()
    assert await registered(url, schema) == {"ci_jobs": "jobs"}


def test_sqlite_has_no_schema():
    with pytest.raises(handlers.HandlerConfigError, match="schema: SQLite has none"):
        handlers.build("sql", {"url": "sqlite:///jobs.db", "schema": "x"})


async def test_a_receiver_leaves_a_users_jobs_table_alone_and_fills_its_own(
    sql_place, tmp_path, receivers
):
    url, schema = sql_place
    theirs = await users_jobs_table(url, schema)
    before = await snapshot(url, theirs)
    in_schema = f'schema = "{schema}"\n' if schema else ""
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[dispatch]\npoll_interval = 0.2\n'
        f'[handlers.mine]\ntype = "sql"\nurl = "{url}"\n{in_schema}table = "jobs"\n'
        f'[handlers.db]\ntype = "sql"\nurl = "{url}"\n{in_schema}history = true\n'
    )
    receiver = receivers(config, "serve")

    assert receiver.post(load("smartcover.xml")).status_code == 200
    ours = jobs_table(MetaData(), "ci_jobs", schema)

    async def stored() -> bool:
        # The receiver starts its handlers without waiting for them: the table is there
        # once it is registered.
        return "ci_jobs" in await registered(url, schema) and bool((await snapshot(url, ours))[2])

    await eventually(stored, "the job in ci_jobs")
    receiver.wait_for_log("handler cannot start; its events wait in the inbox")
    log = receiver.log()
    assert f"table '{schema + '.' if schema else ''}jobs' in " in log
    assert "was not created by ci-receiver, so it is left as it is; set `table`" in log
    assert receiver.terminate() == 0
    assert await snapshot(url, theirs) == before
    assert await registered(url, schema) == {"ci_jobs": "jobs", "ci_events": "events"}


async def _batch(handler, events):
    from handlers import BatchContext
    from receiver.dispatch.outcomes import handler_logger

    ctx = BatchContext(handler="sql", deadline=0.0, log=handler_logger, runs={})
    return await handler.handle_batch(events, ctx)


async def test_a_batch_is_written_as_its_events_one_by_one_would_be(sql_options):
    handler = await started(sql_options)
    success = event("snapshot.xml")
    other = event("smartcover.xml")
    states = ["Submitted", "Running", "Success", "Running", "Submitted"]
    try:
        answer = await _batch(handler, [at_state(success, s) for s in states] + [other])
    finally:
        await handler.close()
    assert answer is None
    jobs = {row["job_id"]: row for row in await rows(handler, handler.jobs)}
    assert jobs[success.job_id]["state"] == "Success"
    assert jobs[other.job_id]["event_id"] == other.id
    history = await rows(handler, handler.events)
    assert len(history) == len(set(states)) + 1


async def test_a_batch_the_database_refuses_fails_only_the_events_at_fault(sql_options):
    handler = await started(sql_options)
    good = [event("snapshot.xml"), event("smartcover.xml")]
    # A tag longer than its column (64): refused by PostgreSQL and MariaDB (strict), kept
    # whole by SQLite, which does not enforce lengths.
    bad = dataclasses.replace(event("transcode.xml"), tag="T" * 500)
    try:
        with capture_logs() as logs:
            answer = await _batch(handler, [good[0], bad, good[1]])
    finally:
        await handler.close()
    written = {row["job_id"] for row in await rows(handler, handler.jobs)}
    if sql_options["url"].startswith("sqlite"):
        assert answer is None
        assert written == {e.job_id for e in [*good, bad]}
        return
    assert list(answer) == [bad.id]
    # A dead letter at once (trying again cannot help), said in a line: no statement, no
    # parameters.
    refused = answer[bad.id]
    assert isinstance(refused, Fail)
    assert str(refused).startswith("the database refused the event's row: ")
    assert "too long" in str(refused).lower()
    assert "INSERT" not in str(refused)
    assert len(str(refused)) < 400
    assert written == {e.job_id for e in good}
    assert [line["event"] for line in logs] == [
        "the database refused the batch; writing its events one by one"
    ]
    # Alone, the same.
    handler = await started(sql_options)
    try:
        with pytest.raises(Fail, match="the database refused the event's row"):
            await handler(bad)
    finally:
        await handler.close()


async def test_batches_sharing_jobs_at_once_do_not_deadlock(sql_options):
    """Two batches of the same 300 jobs, in opposite orders, written at once: rows are
    locked in job order whatever the batch's, so neither waits on the other in a cycle."""
    handler = await started(sql_options)
    base = event("snapshot.xml")
    jobs = [
        dataclasses.replace(base, job_id=f"jlock{i:03d}", id=f"job:jlock{i:03d}:Success")
        for i in range(300)
    ]
    try:
        answers = await asyncio.gather(
            *(_batch(handler, order) for order in (jobs, jobs[::-1]) for _ in range(3))
        )
    finally:
        await handler.close()
    assert answers == [None] * 6
    assert len(await rows(handler, handler.jobs)) == 300
