"""The inbox never takes over what ci-receiver did not create: a user's SQLite file, or
tables of the inbox's names in a PostgreSQL schema a user named. `ci-receiver serve`, a
real process, refuses to start on them and says which option to change; they are left
byte for byte, row for row, as they were."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import asyncpg
import pytest

from receiver.inbox.sqlite_schema import setup
from receiver.ownership import NotOurs
from tests.support.processes import REPO, Receiver


def serve_refused(config) -> str:
    """`ci-receiver serve` on the config: it must end at once, unsuccessfully; its output."""
    receiver = Receiver(config).start(wait_http=False)
    try:
        assert receiver.wait(60) == 1
    finally:
        receiver.stop()
    return receiver.log()


def check_config(config) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "receiver.cli", "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip


def test_a_users_sqlite_file_is_not_made_an_inbox(tmp_path):
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, what TEXT)")
        connection.execute("INSERT INTO events VALUES (1, 'mine')")
    connection.close()
    before = path.read_bytes()
    config = tmp_path / "ci-receiver.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[inbox]\npath = "{path}"\n')

    said = f"the SQLite file {path} (holding events) was not created by ci-receiver"
    log = serve_refused(config)
    assert f"Error: inbox: {said}, so it is left as it is; set inbox.path to use another" in log
    assert "Traceback" not in log
    checked = check_config(config)
    assert checked.returncode == 1
    assert said in checked.stderr
    assert path.read_bytes() == before
    # Not turned to WAL either.
    assert not path.with_name("app.db-wal").exists()


async def test_a_users_tables_in_the_postgres_schema_are_left_alone(tmp_path, postgres_schema):
    url, schema = postgres_schema
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f'CREATE SCHEMA "{schema}"')
        await connection.execute(
            f'CREATE TABLE "{schema}".events (id int PRIMARY KEY, job_id text)'
        )
        await connection.execute(f"INSERT INTO \"{schema}\".events VALUES (1, 'theirs')")
    finally:
        await connection.close()
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[inbox]\nurl = "{url}"\npostgres_schema = "{schema}"\n'
    )

    log = serve_refused(config)
    assert (
        f"Error: inbox: the PostgreSQL schema {schema!r} (holding events) was not created by"
        " ci-receiver, so it is left as it is; set inbox.postgres_schema to use another"
    ) in log
    connection = await asyncpg.connect(url)
    try:
        tables = await connection.fetch(
            "SELECT relname, relkind::text FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = relnamespace WHERE nspname = $1 ORDER BY relname",
            schema,
        )
        rows = await connection.fetch(f'SELECT * FROM "{schema}".events')
    finally:
        await connection.close()
    # The table and its primary key's index: no index of the inbox's, no table beside it.
    assert [tuple(row) for row in tables] == [("events", "r"), ("events_pkey", "i")]
    assert [tuple(row) for row in rows] == [(1, "theirs")]


def test_a_users_table_named_like_sqlites_own_is_still_theirs(tmp_path):
    # SQLite's own tables are named "sqlite_..."; "sqlitedata" only looks like one to a
    # LIKE pattern whose "_" is not escaped.
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE sqlitedata (id INTEGER PRIMARY KEY)")
    connection.close()
    before = path.read_bytes()

    connection = sqlite3.connect(path)
    try:
        with pytest.raises(NotOurs, match=r"holding sqlitedata\) was not created by ci-receiver"):
            setup(connection)
    finally:
        connection.close()
    assert path.read_bytes() == before
    assert not path.with_name("app.db-wal").exists()
