"""Real processes for tests: a free port, the pulsar-lite broker, a ci-receiver."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx
import orjson

from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
# The start-up hooks (sitecustomize.py) a ci-receiver child process imports when this
# folder is on its PYTHONPATH: they stall or reshape it where a test asks.
HOOKS = Path(__file__).resolve().parent / "hooks"


# Ports handed out in this test session: the kernel may give a port just closed to the
# next bind, and two receivers started at once must not both be told to use it.
_handed_out: set[int] = set()


def free_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_for_port(port: int, process: subprocess.Popen | None = None, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port} after {timeout}s")


class PulsarLite:
    """The pulsar-lite broker (real Pulsar binary protocol) on a free port, with its own
    data folder, so that it can be stopped and started again over the same data."""

    def __init__(self, data_dir: Path) -> None:
        from pulsar_lite.binary_finder import find_pulsar_lite_binary

        self.binary = find_pulsar_lite_binary()
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"pulsar://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "broker.log", "ab")  # noqa: SIM115
        address = f"127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                self.binary,
                "--addr",
                address,
                "--db-path",
                str(self.data_dir / "db"),
                "--log-level",
                "warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
        )
        wait_for_port(self.port, self.process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class Receiver:
    """`ci-receiver <command> --config <file>` as a child process, as a user runs it."""

    def __init__(
        self,
        config_file: Path,
        command: str = "serve",
        port: int | None = None,
        args: tuple[str, ...] = (),
        admin_port: int | None = None,
    ) -> None:
        self.config_file = config_file
        self.command = command
        self.args = args  # more options of the command (`--workers 2`)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The admin listener (/metrics, the detailed /readyz) on a port of its own.
        self.admin_port = admin_port or free_port()
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.process: subprocess.Popen | None = None
        self.log_path = config_file.parent / f"{command}-{self.port}.log"
        self._log: IO[bytes] | None = None

    def start(
        self,
        env: dict[str, str] | None = None,
        wait_http: bool = True,
        open_files: int | None = None,
    ) -> Receiver:
        """`open_files`: the process's RLIMIT_NOFILE (soft and hard), as a unit file or
        a container runtime would set it."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        environment = {
            **os.environ,
            "PYTHONPATH": str(REPO),  # so configs can name test handlers by dotted path
            "CI_RECEIVER_HTTP__PORT": str(self.port),
            "CI_RECEIVER_HTTP__HOST": "127.0.0.1",
            "CI_RECEIVER_ADMIN__PORT": str(self.admin_port),
            **(env or {}),
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "receiver.cli",
                self.command,
                "--config",
                str(self.config_file),
                *self.args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=self.config_file.parent,
            preexec_fn=None if open_files is None else lambda: _limit_open_files(open_files),
        )
        if wait_http:
            wait_for_port(self.port, self.process)
        return self

    def post(self, body: bytes, path: str = "/callbacks", **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, content=body, timeout=10, **kwargs)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait: the exit code of a clean shutdown."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        code = self.process.wait(timeout)
        if self._log is not None:
            self._log.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        """Wait until the process has logged `text` (e.g. that it is connected)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not logged after {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def metric(receiver: Receiver, line_start: str) -> float:
    """The value of the sample whose line starts so on the admin listener's /metrics;
    0 when it is not there yet."""
    for line in httpx.get(receiver.admin_url + "/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


def log_lines(receiver: Receiver) -> list[dict[str, Any]]:
    """What the process logged as JSON lines, parsed."""
    lines = []
    for line in receiver.log().splitlines():
        if line.startswith("{"):
            lines.append(orjson.loads(line))
    return lines


def logged(receiver: Receiver, event: str) -> list[dict[str, Any]]:
    """The JSON lines the process logged whose event is `event`, in order."""
    return [line for line in log_lines(receiver) if line["event"] == event]


def listening(receiver: Receiver) -> list[tuple[int, int]]:
    """(worker, pid) of every worker that said it listens, in order."""
    return [(line["worker"], line["pid"]) for line in logged(receiver, "worker listening")]


def start_workers(receiver: Receiver, env: dict[str, str] | None = None) -> dict[int, int]:
    """`serve --workers N`: start, and wait until every worker listens: {worker: pid}.
    The supervisor says so once each worker has told it; each worker's own line is
    written by that worker, and may reach the log a moment later."""
    receiver.start(env=env, wait_http=False)
    receiver.wait_for_log("all workers listening")
    count = logged(receiver, "all workers listening")[0]["workers"]

    def every_worker() -> dict[int, int] | None:
        workers = dict(listening(receiver))
        return workers if len(workers) >= count else None

    return wait_until(every_worker, 10, f"{count} workers saying they listen")


def _limit_open_files(limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
