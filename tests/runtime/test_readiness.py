"""/readyz of a `ci-receiver serve` process whose handler cannot start: the handler's
error shows with its secrets masked, and whether that makes the receiver unready is
the config's choice."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from tests.support.callbacks import load
from tests.support.processes import Receiver
from tests.support.sqlite_lock import HeldLock
from tests.support.waiting import wait_until

TOKEN = "tok-9d2a41c7e3"  # the handler's secret option: never to be shown


def receiver_with(tmp_path, dispatch: str, handler: str) -> Receiver:
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[dispatch]\n{dispatch}\n'
        "[handlers.crm]\n"
        'type = "tests.support.handler_doubles:CannotStart"\n'
        f'token = "{TOKEN}"\n'
        'url = "https://crm-user:crm-pass@crm.example.com/api?key=query-secret"\n'
        f"{handler}\n"
        '[handlers.log]\ntype = "log"\n'
    )
    return Receiver(config)


def readiness(receiver: Receiver) -> httpx.Response:
    return wait_until(
        lambda: (
            (r := httpx.get(receiver.admin_url + "/readyz", timeout=10)).json()["checks"][
                "handler:crm"
            ]
            != "starting"
            and r
        ),
        what="the handler's first start to fail",
    )


@pytest.mark.parametrize(
    ("dispatch", "handler", "status"),
    [
        ("", "", 200),  # by default a handler that cannot start leaves the receiver ready
        ("unready_on_handler_error = true", "", 503),
        ("", "required = true", 503),
        ("unready_on_handler_error = true", "required = false", 200),
    ],
)
def test_a_handler_that_cannot_start_shows_its_error_masked(tmp_path, dispatch, handler, status):
    receiver = receiver_with(tmp_path, dispatch, handler).start()
    try:
        ready = readiness(receiver)
        # callbacks are kept either way: the handler's runs wait for it
        assert receiver.post(load("smartcover.xml")).status_code == 200
    finally:
        receiver.stop()
    assert ready.status_code == status
    assert ready.json()["ready"] is (status == 200)
    assert ready.json()["checks"]["handler:crm"] == (
        "not started: PermissionError: https://crm-user:***@crm.example.com/api?key=*** refused"
        " the login"
        " with token ***"
    )
    assert ready.json()["checks"]["handler:log"] == "started"
    log = receiver.log()
    assert "handler cannot start" in log
    for secret in (TOKEN, "crm-pass", "query-secret"):
        assert secret not in log


def test_a_reload_that_removes_a_required_handler_that_cannot_start_makes_it_ready(tmp_path):
    receiver = receiver_with(tmp_path, "", "required = true").start()
    try:
        assert readiness(receiver).status_code == 503
        config = tmp_path / "ci-receiver.toml"
        without_crm = config.read_text().split("[handlers.crm]")[0]
        config.write_text(without_crm + '[handlers.log]\ntype = "log"\n')
        assert receiver.process is not None
        receiver.process.send_signal(signal.SIGHUP)
        ready = wait_until(
            lambda: (
                (r := httpx.get(receiver.admin_url + "/readyz", timeout=10)).status_code == 200
                and r
            ),
            what="ready without the handler",
        )
        assert "handler:crm" not in ready.json()["checks"]
        assert ready.json()["checks"]["handler:log"] == "started"
    finally:
        receiver.stop()


def test_an_inbox_another_process_keeps_locked_is_unready_at_once_and_ready_again(tmp_path):
    # Another writer (here the test, as `consume` on the same data folder would) holds
    # SQLite's write lock: the probe write waits behind it, and readiness says so within
    # its bound rather than hanging; once the lock goes, ready again.
    receiver = receiver_with(tmp_path, "", "")
    receiver.start()
    try:
        assert receiver.post(load("smartcover.xml")).status_code == 200
        with HeldLock(tmp_path / "data" / "inbox.db"):
            time.sleep(5.5)  # the last write is no longer fresh: readiness writes
            began = time.monotonic()
            locked = httpx.get(receiver.admin_url + "/readyz", timeout=30)
            waited = time.monotonic() - began
        ready = wait_until(
            lambda: (
                (r := httpx.get(receiver.admin_url + "/readyz", timeout=30)).json()["checks"][
                    "inbox"
                ]
                == "writable"
                and r
            ),
            what="the inbox writable again",
        )
    finally:
        receiver.stop()
    assert locked.status_code == 503
    assert locked.json()["checks"]["inbox"].startswith("not writable: no write taken within 5 s")
    assert waited < 8
    assert ready.status_code == 200


def test_an_inbox_file_deleted_under_it_is_refused_not_written_into_the_void(tmp_path):
    # Commits into a deleted file would go on, answered 200, and be lost with it when
    # the process ends: refused instead, said once, until a restart opens it anew.
    config = tmp_path / "ci-receiver.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    receiver = Receiver(config).start()
    try:
        assert receiver.post(load("smartcover.xml")).status_code == 200
        for name in ("inbox.db", "inbox.db-wal", "inbox.db-shm"):
            (tmp_path / "data" / name).unlink(missing_ok=True)
        refused = [receiver.post(load(name)) for name in ("transcode.xml", "snapshot.xml")]
        ready = httpx.get(receiver.admin_url + "/readyz", timeout=30)
    finally:
        receiver.stop()
    assert [r.status_code for r in refused] == [503, 503]
    assert ready.status_code == 503
    assert "was deleted or replaced while this process ran" in ready.json()["checks"]["inbox"]
    log = receiver.log()
    assert log.count("inbox not writable; callbacks are answered 503 until it is") == 1
    assert "Traceback" not in log
    restarted = Receiver(config).start()  # opens a new inbox file
    try:
        assert restarted.post(load("transcode.xml")).status_code == 200
    finally:
        restarted.stop()
