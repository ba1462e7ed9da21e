"""A burst of honest callbacks against `ci-receiver serve` as a process, over real
sockets: every sender of the burst is answered 200 and its callback stored once; one
that finds no room waits for it, and past `admission_wait` reads a 503 + Retry-After.
CI documents no retry, so a callback refused is a callback lost."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from receiver.sources.listen import LISTEN_BACKLOG
from tests.support.bursts import burst
from tests.support.callbacks import load
from tests.support.processes import Receiver
from tests.support.waiting import wait_until

HEAD = b"POST /callbacks HTTP/1.1\r\nHost: test\r\nContent-Type: application/xml\r\n"
MiB = 1024 * 1024


def serve(tmp_path: Path, extra: str = "") -> Receiver:
    """The embedded default (the log handler on every event), in a folder of the test's."""
    config = tmp_path / "ci-receiver.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n{extra}')
    return Receiver(config).start()


def stored_job_ids_sqlite(tmp_path: Path) -> list[str]:
    with sqlite3.connect(tmp_path / "data" / "inbox.db") as connection:
        return [row[0] for row in connection.execute("SELECT job_id FROM events")]


@pytest.mark.parametrize("inbox", ["sqlite", "postgresql"])
def test_every_sender_of_a_burst_is_answered_200_and_stored_once(tmp_path, inbox, request):
    shared = request.getfixturevalue("shared_inbox") if inbox == "postgresql" else None
    receiver = serve(tmp_path, shared.toml() if shared else "")
    try:
        answers = asyncio.run(burst(receiver.port, 1000))
        assert {answer.status for answer in answers} == {"200"}
        if shared is None:
            stored = stored_job_ids_sqlite(tmp_path)
        else:
            stored = [row[0] for row in shared.query("SELECT job_id FROM events")]
        assert sorted(stored) == sorted(answer.job_id for answer in answers)
    finally:
        receiver.stop()


def hold_the_budget(receiver: Receiver) -> socket.socket:
    """A sender that declares a body of nearly 1 MiB and sends only its first bytes: it
    is admitted, and holds that much of the budget until it ends."""
    sock = socket.create_connection(("127.0.0.1", receiver.port), timeout=10)
    sock.sendall(HEAD + b"Content-Length: %d\r\n\r\n<Response>" % (MiB - 100))
    time.sleep(0.3)
    return sock


def test_a_callback_without_room_waits_for_it_and_is_then_taken(tmp_path):
    # Room for one callback of nearly 1 MiB, and a long wait.
    receiver = serve(tmp_path, f"[http]\nmax_inflight_bytes = {MiB}\nadmission_wait = 20\n")
    try:
        holder = hold_the_budget(receiver)
        with httpx.Client(timeout=30) as client:
            waiting = asyncio.run(_post_soon(client, receiver.url, holder))
        assert waiting.status_code == 200, waiting.text
    finally:
        receiver.stop()


async def _post_soon(client: httpx.Client, url: str, holder: socket.socket) -> httpx.Response:
    """Post while the budget is held; after a second, the holder goes away (its room
    back): the post is answered only then."""
    began = time.monotonic()
    loop = asyncio.get_running_loop()
    posting = loop.run_in_executor(
        None, lambda: client.post(url + "/callbacks", content=load("snapshot.xml"))
    )
    await asyncio.sleep(1.0)
    assert not posting.done(), "answered while there was no room"
    holder.close()
    response = await posting
    assert time.monotonic() - began >= 1.0
    return response


def test_no_room_within_the_wait_is_a_503_with_retry_after_and_nothing_kept(tmp_path):
    receiver = serve(tmp_path, f"[http]\nmax_inflight_bytes = {MiB}\nadmission_wait = 0.5\n")
    try:
        holder = hold_the_budget(receiver)
        began = time.monotonic()
        refused = receiver.post(load("snapshot.xml"))
        assert time.monotonic() - began >= 0.5
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"] == "busy"
        assert "0.5 s" in refused.json()["detail"]
        metrics = httpx.get(receiver.admin_url + "/metrics").text
        assert 'ci_receiver_callbacks_total{outcome="busy",source="http"} 1.0' in metrics
        holder.close()
        assert receiver.post(load("snapshot.xml")).status_code == 200  # room again
        assert len(stored_job_ids_sqlite(tmp_path)) == 1  # the refused one was not kept
    finally:
        receiver.stop()


def test_every_connection_over_the_cap_reads_a_503_not_a_silent_close(tmp_path):
    receiver = serve(tmp_path, "[http]\nmax_connections = 20\n")
    held = [socket.create_connection(("127.0.0.1", receiver.port)) for _ in range(20)]
    try:
        time.sleep(0.3)
        answers = asyncio.run(burst(receiver.port, 100))  # five times the cap, at once
        assert [answer.status for answer in answers] == ["503"] * 100
        assert all(b"retry-after: 1" in answer.headers.lower() for answer in answers)
        for sock in held:
            sock.close()
        assert receiver.post(load("snapshot.xml")).status_code == 200
    finally:
        receiver.stop()


def listen_backlog(port: int) -> int:
    """The backlog of the socket listening on `port`, as the kernel reports it (ss's
    Send-Q of a listening socket)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[2])


@pytest.mark.parametrize("workers", [(), ("--workers", "2")])
def test_the_listen_backlog_is_as_deep_as_the_kernel_allows(tmp_path, workers):
    """Senders connecting at once wait in the backlog rather than being dropped."""
    config = tmp_path / "ci-receiver.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    receiver = Receiver(config, args=workers).start()
    try:
        wait_until(lambda: receiver.post(load("snapshot.xml")).status_code == 200, what="serving")
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
        assert listen_backlog(receiver.port) == min(LISTEN_BACKLOG, somaxconn)
    finally:
        receiver.stop()
