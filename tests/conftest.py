from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import pytest
import structlog
from hypothesis import HealthCheck, settings

from tests.support.certificates import Certificates
from tests.support.ci_api_server import SECRET_ID, SECRET_KEY, CiApiServer
from tests.support.databases import drop_tables, execute, require_server, schema_keyword
from tests.support.inbox_places import BACKENDS, InboxPlace, drop_schema
from tests.support.processes import PulsarLite, Receiver
from tests.support.shared_inbox import SharedInbox

# `HYPOTHESIS_PROFILE=deep pytest tests/callback/test_properties.py` for a long fuzzing run.
settings.register_profile(
    "default", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "deep", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def pulsar_broker(tmp_path):
    """A pulsar-lite broker of this test's own; `.stop()` / `.start()` restart it."""
    broker = PulsarLite(tmp_path / "pulsar")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def certificates(tmp_path):
    """A test CA, and server certificate and key files in this test's folder."""
    return Certificates(tmp_path)


@pytest.fixture
def ci():
    """The loopback stand-in for CI's job API (tests/support/ci_api_server.py): it takes
    the tests' key pair, and a temporary key that must bring its session token."""
    server = CiApiServer({SECRET_ID: SECRET_KEY, "AKIDtemporary": "temporary-key"},
                         tokens={"AKIDtemporary": "session-token"}).start()  # fmt: skip
    yield server
    server.stop()


@pytest.fixture
def receivers():
    """`start(config, command, env, ready=text)`: `ci-receiver <command>` as a child
    process, waited for until it logs `ready`. Every one is killed at the test's end,
    even one that never got ready."""
    started: list[Receiver] = []

    def start(
        config: Path, command: str, env: dict | None = None, ready: str | None = None
    ) -> Receiver:
        process = Receiver(config, command)
        started.append(process)
        process.start(env=env, wait_http=command != "consume")
        if ready is not None:
            process.wait_for_log(ready)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture(params=BACKENDS)
async def inbox_place(request, tmp_path):
    """Where this test's inbox lives: SQLite, then PostgreSQL (a schema of its own)."""
    place = InboxPlace(request.param, tmp_path)
    yield place
    await place.close()


@pytest.fixture
async def inbox(inbox_place):
    """An open inbox on each backend."""
    return await inbox_place.open()


@pytest.fixture
async def postgres_schema():
    """The machine's PostgreSQL, and a schema name of this test's own, dropped after:
    (url, schema)."""
    url = require_server("postgresql")
    schema = f"test_{uuid.uuid4().hex[:12]}"
    yield url, schema
    await drop_schema(url, schema)


@pytest.fixture
def shared_inbox():
    """A PostgreSQL inbox schema for several processes of one test, dropped after."""
    inbox = SharedInbox(require_server("postgresql"))
    yield inbox
    inbox.drop()


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def database_url(request, tmp_path):
    """The same test on SQLite (a temp file), PostgreSQL and MySQL/MariaDB (the machine's
    servers). A server that does not answer skips the test, except under CI=true."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'handler.db'}"
    return require_server(request.param)


@pytest.fixture
async def sql_options(database_url):
    """`sql` handler options on tables of this test's own, dropped afterwards."""
    suffix = uuid.uuid4().hex[:10]
    options = {
        "url": database_url,
        "table": f"jobs_{suffix}",
        "history": True,
        "events_table": f"events_{suffix}",
    }
    yield options
    await drop_tables(database_url, [options["table"], options["events_table"]])


@pytest.fixture
async def sql_place(database_url):
    """A database URL and a schema of this test's own, dropped afterwards: (url, schema).
    On MySQL a schema is a database; SQLite has none (its file is the test's own)."""
    if database_url.startswith("sqlite"):
        yield database_url, None
        return
    schema = f"test_{uuid.uuid4().hex[:12]}"
    keyword = schema_keyword(database_url)
    await execute(database_url, f"CREATE {keyword} {schema}")
    yield database_url, schema
    cascade = " CASCADE" if keyword == "SCHEMA" else ""
    await execute(database_url, f"DROP {keyword} IF EXISTS {schema}{cascade}")


@pytest.fixture
def restore_logging():
    """Undo configure_logging after the test: its handler writes to the test's captured
    stdout, which later tests must not inherit, and it sets levels on named loggers."""
    root = logging.getLogger()
    handlers_before, level_before = root.handlers[:], root.level
    named = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    yield
    root.handlers[:] = handlers_before
    root.setLevel(level_before)
    for name, level in named.items():
        logging.getLogger(name).setLevel(level)
    structlog.reset_defaults()
