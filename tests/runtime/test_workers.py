"""`serve --workers N` as real processes over loopback: one port, N workers on one SQLite
inbox, under a supervisor.

Which worker did what is read where it shows: every log line names its worker, each
worker logs its pid when it listens and the requests it served when it stops, and the
test handler (`Recorder`) writes its process's pid beside every event it handles.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import sqlite3
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.callbacks import job
from tests.support.handler_doubles import json_lines, recorded
from tests.support.processes import Receiver, listening, log_lines, start_workers
from tests.support.waiting import wait_until

CALLBACKS = 300
SENDERS = 16  # threads posting at once, each request on a connection of its own


def config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "ci-receiver.toml"
    path.write_text(
        f"""
data_dir = "{tmp_path / "data"}"
[log]
format = "json"
[http]
access_log = false
[dispatch]
poll_interval = 0.2
[handlers.recorder]
type = "tests.support.handler_doubles:Recorder"
path = "{tmp_path / "recorded.jsonl"}"
timeout = 2
{extra}
"""
    )
    return path


def callback(n: int, run: str = "a") -> bytes:
    return job(f"j{run}{n:024x}")


def post(receiver: Receiver, body: bytes) -> httpx.Response:
    """On a new connection; sent again when no answer came (a connection a killed worker
    had taken is reset), as CI sends a callback again."""
    for _ in range(5):
        try:
            return httpx.post(
                receiver.url + "/callbacks",
                content=body,
                headers={"connection": "close"},
                timeout=10,
            )
        except httpx.HTTPError:
            pass
    return httpx.post(receiver.url + "/callbacks", content=body, timeout=10)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def inbox(tmp_path: Path, query: str) -> list[tuple[Any, ...]]:
    connection = sqlite3.connect(f"file:{tmp_path / 'data' / 'inbox.db'}?mode=ro", uri=True)
    try:
        return connection.execute(query).fetchall()
    finally:
        connection.close()


def handled(tmp_path: Path) -> Counter[str]:
    return Counter(recorded(tmp_path / "recorded.jsonl"))


@pytest.fixture
def receiver(tmp_path):
    running = Receiver(config(tmp_path), args=("--workers", "2"))
    yield running
    running.stop()


def test_two_workers_share_the_port_and_each_callback_is_stored_and_handled_once(tmp_path):
    receiver = Receiver(config(tmp_path))
    try:
        # [http] workers through the environment, as a container would set it.
        workers = start_workers(receiver, env={"CI_RECEIVER_HTTP__WORKERS": "2"})
        assert sorted(workers) == [0, 1]
        assert len(set(workers.values())) == 2

        with ThreadPoolExecutor(SENDERS) as pool:
            answers = list(pool.map(lambda n: post(receiver, callback(n)), range(CALLBACKS)))
        assert all(answer.status_code == 200 for answer in answers)
        ids = {answer.json()["ids"][0] for answer in answers}
        assert len(ids) == CALLBACKS

        wait_until(lambda: set(handled(tmp_path)) == ids, what="every event handled")
        # worker 0's /metrics adds up both workers' counts
        metrics = httpx.get(receiver.admin_url + "/metrics", timeout=10).text
        assert f'ci_receiver_callbacks_total{{outcome="accepted",source="http"}} {CALLBACKS}.0' in (
            metrics
        )
        assert receiver.terminate() == 0
    finally:
        receiver.stop()

    assert handled(tmp_path) == dict.fromkeys(ids, 1)
    assert inbox(tmp_path, "SELECT count(*) FROM events") == [(CALLBACKS,)]
    assert inbox(tmp_path, "SELECT status, attempts, count(*) FROM runs GROUP BY 1, 2") == [
        ("done", 1, CALLBACKS)
    ]
    # Both workers took callbacks, and both dispatchers ran the handler.
    served = {
        line["worker"]: line["requests"]
        for line in log_lines(receiver)
        if line["event"] == "worker stopped"
    }
    assert sorted(served) == [0, 1]
    assert all(count > 0 for count in served.values()), served
    assert sum(served.values()) >= CALLBACKS
    handlers_pids = {line["pid"] for line in json_lines(tmp_path / "recorded.jsonl")}
    assert handlers_pids <= set(workers.values())
    assert not any(alive(pid) for pid in workers.values())


def test_a_worker_killed_under_load_is_replaced_and_nothing_acknowledged_is_lost(
    tmp_path, receiver
):
    workers = start_workers(receiver)
    victim = workers[1]
    answered: set[str] = set()
    lock = threading.Lock()
    numbers = itertools.count()
    enough = threading.Event()

    def keep_posting() -> None:
        while not enough.is_set():
            answer = post(receiver, callback(next(numbers), "k"))
            assert answer.status_code == 200, answer.text
            with lock:
                answered.add(answer.json()["ids"][0])

    def count() -> int:
        with lock:
            return len(answered)

    with ThreadPoolExecutor(SENDERS) as pool:
        posting = [pool.submit(keep_posting) for _ in range(SENDERS)]
        try:
            wait_until(lambda: count() >= 100, what="callbacks answered")
            os.kill(victim, signal.SIGKILL)
            replaced = wait_until(
                lambda: [pid for worker, pid in listening(receiver)[2:] if worker == 1],
                what="worker 1 started again",
            )
            at_restart = count()
            wait_until(lambda: count() >= at_restart + 100, what="callbacks after the restart")
        finally:
            enough.set()
        for poster in posting:
            poster.result()

    assert replaced[0] != victim
    assert "worker exited: starting another" in receiver.log()
    # Every callback answered 200 was committed, the killed worker's included.
    stored = {row[0] for row in inbox(tmp_path, "SELECT id FROM events")}
    assert stored == answered
    # Runs the victim had leased are taken over once their lease ends.
    wait_until(lambda: set(handled(tmp_path)) == stored, what="every event handled", timeout=90)
    assert receiver.terminate() == 0
    assert not any(alive(pid) for _, pid in listening(receiver))


def test_sigterm_to_one_worker_drains_it_and_another_takes_its_place(tmp_path, receiver):
    workers = start_workers(receiver)
    os.kill(workers[0], signal.SIGTERM)
    replaced = wait_until(
        lambda: [pid for worker, pid in listening(receiver)[2:] if worker == 0],
        what="worker 0 started again",
    )
    assert replaced[0] != workers[0]
    exits = [
        line for line in log_lines(receiver) if line["event"] == "worker exited: starting another"
    ]
    assert [(line["worker"], line["exit_code"]) for line in exits] == [(0, 0)]
    # The new worker 0 serves the admin listener again, on the port the supervisor holds.
    assert httpx.get(receiver.admin_url + "/readyz", timeout=10).status_code == 200
    assert post(receiver, callback(1)).status_code == 200
    assert receiver.terminate() == 0


def test_workers_stop_when_the_supervisor_is_killed(tmp_path, receiver):
    workers = start_workers(receiver)
    receiver.kill()  # kill -9: no SIGTERM reaches the workers
    wait_until(lambda: not any(alive(pid) for pid in workers.values()), what="the workers exited")
    assert receiver.log().count("the supervising process is gone: stopping") == 2


def test_a_worker_that_cannot_start_ends_the_command(tmp_path):
    receiver = Receiver(
        config(tmp_path, '[handlers.broken]\ntype = "jsonl"'), args=("--workers", "2")
    )
    try:
        receiver.start(wait_http=False)
        assert receiver.wait(30) == 1
    finally:
        receiver.stop()
    assert "worker exited before it was ready: stopping" in receiver.log()


@pytest.mark.parametrize("workers", [(), ("--workers", "2")])
def test_a_public_port_in_use_is_named_with_the_key_to_change(tmp_path, workers):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        receiver = Receiver(config(tmp_path), port=port, args=workers)
        try:
            receiver.start(wait_http=False)
            assert receiver.wait(30) == 1
        finally:
            receiver.stop()
    assert (
        f"the public HTTP server cannot listen on 127.0.0.1:{port}: [Errno 98] Address"
        " already in use; set another [http] port (CI_RECEIVER_HTTP__PORT)"
    ) in receiver.log()
