"""SIGHUP reloads handlers and routes in a running receiver, as an operator does it: the
config file edited, `kill -HUP`, callbacks posted over loopback all along.

What is checked is what a user relies on: no callback goes unanswered or unstored while
the reload happens, each is routed by the routes in force when it arrived, a handler
taken out finishes what it began, a config that does not load changes nothing, and
`serve --workers` passes the signal to every worker.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.callbacks import job
from tests.support.cli import cli
from tests.support.handler_doubles import recorded
from tests.support.processes import Receiver, logged, start_workers
from tests.support.tcp_proxy import ThreadedProxy
from tests.support.waiting import wait_until


def write_config(tmp_path: Path, handlers: dict[str, str], routes: str, extra: str = "") -> Path:
    """`handlers`: name -> the JSON-lines file its Recorder writes."""
    path = tmp_path / "ci-receiver.toml"
    sections = "".join(
        f'[handlers.{name}]\ntype = "tests.support.handler_doubles:Recorder"\n'
        f'path = "{tmp_path / file}"\n'
        for name, file in handlers.items()
    )
    path.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[log]\nformat = "json"\n[dispatch]\n'
        f"poll_interval = 0.1\n{extra}{sections}{routes}"
    )
    return path


ALL_TO = '[[routes]]\nhandlers = ["{}"]\n'


def callback(n: int) -> bytes:
    return job(f"j{n:024x}")


def job_of(event_id: str) -> int:
    return int(event_id.split(":")[1][1:], 16)


class Sender(threading.Thread):
    """Posts callback after callback until stopped; keeps every answer's status."""

    def __init__(self, receiver: Receiver) -> None:
        super().__init__(daemon=True)
        self.receiver = receiver
        self.statuses: list[int] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stopping.is_set():
                body = callback(len(self.statuses))
                answer = client.post(self.receiver.url + "/callbacks", content=body)
                self.statuses.append(answer.status_code)

    def stop(self) -> list[int]:
        self.stopping.set()
        self.join(15)
        return self.statuses


def reloads(receiver: Receiver, event: str) -> int:
    return len(logged(receiver, event))


def hang_up(receiver: Receiver, applied_before: int) -> None:
    """SIGHUP, and wait until the reload is logged as applied."""
    assert receiver.process is not None
    receiver.process.send_signal(signal.SIGHUP)
    wait_until(lambda: reloads(receiver, "config reloaded") > applied_before, 15, "the reload")


@pytest.fixture
def receiver(tmp_path):
    write_config(tmp_path, {"first": "first.jsonl"}, ALL_TO.format("first"))
    process = Receiver(tmp_path / "ci-receiver.toml").start()
    yield process
    process.stop()


def test_sighup_applies_new_handlers_and_routes_while_callbacks_keep_coming(receiver, tmp_path):
    sender = Sender(receiver)
    sender.start()
    wait_until(lambda: len(sender.statuses) >= 20, what="callbacks before the reload")
    write_config(
        tmp_path,
        {"first": "first.jsonl", "second": "second.jsonl"},
        '[[routes]]\nhandlers = ["first", "second"]\n',
    )
    sent_before_signal = len(sender.statuses)
    hang_up(receiver, 0)
    # The log says what changed: a handler added, the one route changed.
    [reloaded] = logged(receiver, "config reloaded")
    assert (reloaded["handlers"], reloaded["routes"]) == (["+second"], ["~1"])
    routed_after = len(sender.statuses) + 1  # the one in flight may have gone either way
    wait_until(lambda: len(sender.statuses) >= routed_after + 20, what="callbacks after it")
    statuses = sender.stop()
    assert set(statuses) == {200}, "every callback answered 200 through the reload"
    # Every callback stored and handled once by the handler that ran throughout.
    wait_until(lambda: len(recorded(tmp_path / "first.jsonl")) == len(statuses))
    assert sorted(job_of(e) for e in recorded(tmp_path / "first.jsonl")) == list(
        range(len(statuses))
    )

    # The new handler got what arrived after the reload, and nothing from before it.
    def second() -> set[int]:
        return {job_of(e) for e in recorded(tmp_path / "second.jsonl")}

    wait_until(lambda: set(range(routed_after, len(statuses))) <= second(), what="second's")
    assert not second() & set(range(sent_before_signal))
    # The receiver says at once that it has the new handler: a replay for it (which
    # warns when no running receiver has the handler) does not warn.
    replayed = cli(tmp_path, "replay", "--all", "--handler", "second")
    assert replayed.stdout.startswith(b"%d run(s) queued again" % len(statuses))
    assert b"no running receiver" not in replayed.stderr
    assert receiver.terminate() == 0


def test_a_removed_handler_stops_and_a_bad_config_changes_nothing(receiver, tmp_path):
    receiver.post(callback(0))
    wait_until(lambda: recorded(tmp_path / "first.jsonl"))
    # A config that does not load: refused, said why, the running one stays.
    config = tmp_path / "ci-receiver.toml"
    good = config.read_text()
    config.write_text(good + "[handlers.broken]\ntype = 'no.such:Handler'\n")
    assert receiver.process is not None
    receiver.process.send_signal(signal.SIGHUP)
    wait_until(lambda: reloads(receiver, "config not reloaded: the running one stays"))
    refused = logged(receiver, "config not reloaded: the running one stays")[0]
    assert "handlers.broken" in refused["error"]
    receiver.post(callback(1))
    wait_until(lambda: len(recorded(tmp_path / "first.jsonl")) == 2)
    # `first` replaced by `third`, and a section that waits for a restart changed.
    write_config(
        tmp_path,
        {"third": "third.jsonl"},
        ALL_TO.format("third"),
        extra="[retention]\nevents = '10d'\n",
    )
    hang_up(receiver, 0)
    receiver.wait_for_log("handler stopped (config reloaded)")
    sections = [
        line["sections"] for line in logged(receiver, "config changes that take effect on restart")
    ]
    assert sections == [["retention"]]
    receiver.post(callback(2))
    wait_until(lambda: recorded(tmp_path / "third.jsonl"))
    assert [job_of(e) for e in recorded(tmp_path / "third.jsonl")] == [2]
    assert len(recorded(tmp_path / "first.jsonl")) == 2
    metrics = httpx.get(receiver.admin_url + "/metrics").text
    assert 'ci_receiver_config_reloads_total{outcome="applied"} 1.0' in metrics
    assert 'ci_receiver_config_reloads_total{outcome="refused"} 1.0' in metrics
    # The removed handler's series are gone, not left saying it is down.
    up = [line for line in metrics.splitlines() if line.startswith("ci_receiver_handler_up{")]
    assert up == ['ci_receiver_handler_up{handler="third"} 1.0']
    assert receiver.terminate() == 0


class ServiceManager:
    """What systemd listens on for a `Type=notify` unit: a datagram socket, named to the
    service in `NOTIFY_SOCKET`, that it reads `READY=1` and `STOPPING=1` from."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "notify.sock"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(self.path))
        self.env = {"NOTIFY_SOCKET": str(self.path)}

    def told(self, timeout: float = 30) -> bytes:
        self.socket.settimeout(timeout)
        return self.socket.recv(4096)

    def silent(self, seconds: float) -> bool:
        self.socket.settimeout(seconds)
        try:
            self.socket.recv(4096)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.socket.close()


def test_ready_is_told_to_systemd_and_a_reload_asked_while_starting_is_applied(
    tmp_path, postgres_schema
):
    url, schema = postgres_schema
    manager = ServiceManager(tmp_path)
    with ThreadedProxy(int(url.rsplit(":", 1)[1].split("/")[0])) as database:
        database.cut()  # the database is not up yet: the receiver waits for it, starting
        inbox = f'[inbox]\nurl = "postgresql://postgres@127.0.0.1:{database.port}/test"\n'
        inbox += f'postgres_schema = "{schema}"\n'
        write_config(tmp_path, {"first": "first.jsonl"}, ALL_TO.format("first"), extra=inbox)
        receiver = Receiver(tmp_path / "ci-receiver.toml")
        try:
            receiver.start(env=manager.env, wait_http=False)
            receiver.wait_for_log("PostgreSQL inbox unreachable")
            write_config(
                tmp_path,
                {"first": "first.jsonl", "second": "second.jsonl"},
                '[[routes]]\nhandlers = ["first", "second"]\n',
                extra=inbox,
            )
            assert receiver.process is not None
            receiver.process.send_signal(signal.SIGHUP)  # while it starts: remembered
            time.sleep(0.5)
            assert receiver.process.poll() is None
            database.restore()
            assert manager.told() == b"READY=1"
            receiver.wait_for_log("config reloaded")
            assert receiver.post(callback(7)).status_code == 200
            for handler in ("first", "second"):
                wait_until(lambda h=handler: recorded(tmp_path / f"{h}.jsonl"), what=handler)
            receiver.process.send_signal(signal.SIGTERM)
            assert manager.told() == b"STOPPING=1"
            assert receiver.wait(30) == 0
        finally:
            receiver.stop()
            manager.close()


def test_serve_workers_passes_sighup_to_every_worker(tmp_path):
    write_config(tmp_path, {"first": "first.jsonl"}, ALL_TO.format("first"))
    receiver = Receiver(tmp_path / "ci-receiver.toml", args=("--workers", "2"))
    manager = ServiceManager(tmp_path)
    try:
        start_workers(receiver, env=manager.env)
        # The supervisor tells systemd once every worker listens; the workers say nothing.
        assert manager.told() == b"READY=1"
        write_config(tmp_path, {"second": "second.jsonl"}, ALL_TO.format("second"))
        assert receiver.process is not None
        receiver.process.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads(receiver, "config reloaded") == 2, 15, "both reloads")
        reloaded = {line["worker"] for line in logged(receiver, "config reloaded")}
        assert reloaded == {0, 1}
        for n in range(20):  # on connections of their own: both workers take some
            answer = httpx.post(
                receiver.url + "/callbacks", content=callback(n), headers={"connection": "close"}
            )
            assert answer.status_code == 200
        wait_until(lambda: len(recorded(tmp_path / "second.jsonl")) == 20)
        assert not recorded(tmp_path / "first.jsonl")
        # The removed handler's series no longer says anything about it being up.
        metrics = httpx.get(receiver.admin_url + "/metrics").text
        assert 'ci_receiver_handler_up{handler="second"} 1.0' in metrics
        assert 'ci_receiver_handler_up{handler="first"} 1.0' not in metrics
        assert 'ci_receiver_handler_up{handler="first"} 0.0' not in metrics
        assert manager.silent(0.5)
        assert receiver.terminate() == 0
        assert manager.told() == b"STOPPING=1"
    finally:
        receiver.stop()
        manager.close()


def test_a_sighup_while_draining_does_not_cut_the_drain_short(tmp_path):
    write_config(tmp_path, {"slow": "slow.jsonl"}, ALL_TO.format("slow"))
    config = tmp_path / "ci-receiver.toml"
    config.write_text(config.read_text().replace('slow.jsonl"\n', 'slow.jsonl"\ndelay = 1.5\n'))
    receiver = Receiver(config).start()
    try:
        receiver.post(callback(0))
        wait_until(lambda: recorded(tmp_path / "slow.jsonl", "started"))
        assert receiver.process is not None
        receiver.process.send_signal(signal.SIGTERM)
        receiver.wait_for_log("draining handler attempts")
        receiver.process.send_signal(signal.SIGHUP)  # `systemctl reload` at a bad moment
        assert receiver.wait(30) == 0
        assert [job_of(e) for e in recorded(tmp_path / "slow.jsonl")] == [0]
    finally:
        receiver.stop()


def test_route_warnings_are_logged_at_start_and_again_on_reload(tmp_path):
    unrouted = {"first": "first.jsonl", "spare": "spare.jsonl"}
    write_config(tmp_path, unrouted, ALL_TO.format("first"))
    receiver = Receiver(tmp_path / "ci-receiver.toml").start()
    try:

        def warned() -> list[str]:
            return [
                line["warning"] for line in logged(receiver, "config may not do what was meant")
            ]

        wait_until(warned, what="the warning at start")
        assert warned() == ["handlers.spare: no route sends it anything"]
        hang_up(receiver, 0)
        wait_until(lambda: len(warned()) == 2, what="the warning on reload")
        assert receiver.terminate() == 0
    finally:
        receiver.stop()
