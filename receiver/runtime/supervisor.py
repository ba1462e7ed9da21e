"""`serve --workers N`: N worker processes behind one port, and the process that keeps
them running.

The supervisor binds the public port (and the admin port) once and starts each worker as
`ci-receiver serve --worker ...` with the listening socket inherited: the workers accept
from the same socket, so the kernel hands each new connection to whichever worker is
free, and a connection waiting in the backlog is never lost with a worker. Each worker
runs ingest and its own dispatcher over the shared inbox (SQLite serializes the writers
of its file; claims are leased, so a run is taken by one worker at a time).

What the supervisor does:
- SIGTERM or SIGINT: passes SIGTERM to every worker, which drains as `serve` does, and
  exits 0 once all of them exited 0 (1 otherwise). The workers sit in a process group of
  their own, so Ctrl-C in a terminal reaches the supervisor alone, and only once.
- A worker that exits while the supervisor is not stopping (kill -9, a crash, a SIGTERM
  sent to it alone) is started again at once. More than `RESTARTS_ALLOWED` of these in
  `RESTART_WINDOW` seconds, or a worker that exits before it was ever ready (a config or
  inbox it cannot open), stop the others and end the command with 1: the service
  manager then restarts it, or an operator reads why.
- SIGHUP: passes it to every worker, each of which reloads its handlers and routes, and
  its listeners' TLS certificates (receiver/runtime/reload.py); a worker still starting
  gets it once it is ready.
- systemd (`Type=notify`): `READY=1` once every worker is ready (it listens from the
  start, and is ready once its inbox is open), `STOPPING=1` when it
  stops them; the workers themselves say nothing to the service manager.
- Metrics: the workers keep their Prometheus values in files of one folder
  (prometheus_client's multiprocess mode), which worker 0's /metrics adds up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable

import structlog

from receiver.metrics import MULTIPROCESS_DIR
from receiver.runtime.sdnotify import ENV as NOTIFY_ENV
from receiver.runtime.sdnotify import notify
from receiver.runtime.worker import READY, WorkerSpec

logger = structlog.get_logger("ci_receiver.supervisor")

RESTARTS_ALLOWED = 5
RESTART_WINDOW = 60.0
# Beyond the workers' own graceful and drain timeouts, how long to wait for them at
# shutdown before they are killed.
STOP_MARGIN = 30.0

Command = Callable[[WorkerSpec], list[str]]


class Supervisor:
    def __init__(
        self,
        count: int,
        command: Command,
        public: socket.socket,
        admin: socket.socket | None,
        stop_timeout: float,
    ) -> None:
        self._count = count
        self._command = command
        self._public = public
        self._admin = admin
        self._stop_timeout = stop_timeout + STOP_MARGIN
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._ready: set[int] = set()
        self._stopping = False
        self._metrics_dir = ""
        self._reloads = 0  # SIGHUPs passed on so far

    async def run(self) -> int:
        """Until SIGTERM / SIGINT, or until a worker cannot be kept running; the exit code."""
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self._pass_reload)
        self._metrics_dir = tempfile.mkdtemp(prefix="ci-receiver-metrics-")
        keepers = [asyncio.create_task(self._keep(index)) for index in range(self._count)]
        waiting_for_signal = asyncio.create_task(stop_requested.wait())
        try:
            done, _ = await asyncio.wait(
                {waiting_for_signal, *keepers}, return_when=asyncio.FIRST_COMPLETED
            )
            gave_up = waiting_for_signal not in done
            logger.info("stopping the workers", pid=os.getpid())
            notify("STOPPING=1")
            self._stopping = True
            for process in list(self._processes.values()):
                _signal(process, signal.SIGTERM)
            done, pending = await asyncio.wait(keepers, timeout=self._stop_timeout)
            for index, process in list(self._processes.items()):
                logger.error("worker did not stop in time: killed", worker=index, pid=process.pid)
                _signal(process, signal.SIGKILL)
            outcomes = await asyncio.gather(*keepers, return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    logger.error("worker could not be kept running", error=repr(outcome))
        finally:
            waiting_for_signal.cancel()
            for sig in signals:
                loop.remove_signal_handler(sig)
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        clean = all(outcome is True for outcome in outcomes)
        exit_code = 0 if clean and not gave_up and not pending else 1
        logger.info("stopped", pid=os.getpid(), exit_code=exit_code)
        return exit_code

    def _pass_reload(self) -> None:
        """To the workers ready, which handle SIGHUP by then; one still starting
        gets it once it is ready (`_wait_ready`), since it may have read the file before
        the change. Not while stopping: the workers are draining."""
        if self._stopping:
            logger.info("SIGHUP ignored: stopping")
            return
        logger.info("SIGHUP: the workers reload their handlers, routes and certificates")
        self._reloads += 1
        for index, process in self._processes.items():
            if index in self._ready:
                _signal(process, signal.SIGHUP)

    async def _keep(self, index: int) -> bool:
        """Keep worker `index` running. Returns, while running, only to give up (False);
        once stopping, whether the worker stopped cleanly."""
        exits: deque[float] = deque()
        while True:
            reloads_before = self._reloads
            process, link = await self._start(index)
            try:
                ready = await self._wait_ready(process, link)
                if ready and self._reloads != reloads_before and not self._stopping:
                    _signal(process, signal.SIGHUP)  # a reload it may have missed
                code = await process.wait()
            finally:
                link.close()
                self._processes.pop(index, None)
                self._ready.discard(index)
                self._forget_metrics(process.pid)
            if self._stopping:
                # Ended by our SIGTERM before it was even ready: it had taken nothing.
                return code == 0 or (not ready and code == -signal.SIGTERM)
            if not ready:
                logger.error(
                    "worker exited before it was ready: stopping", worker=index, exit_code=code
                )
                return False
            now = time.monotonic()
            exits.append(now)
            while exits and exits[0] < now - RESTART_WINDOW:
                exits.popleft()
            if len(exits) > RESTARTS_ALLOWED:
                logger.error(
                    "worker keeps exiting: stopping",
                    worker=index,
                    exits=len(exits),
                    within_seconds=RESTART_WINDOW,
                )
                return False
            logger.warning(
                "worker exited: starting another", worker=index, pid=process.pid, exit_code=code
            )

    async def _start(self, index: int) -> tuple[asyncio.subprocess.Process, socket.socket]:
        ours, theirs = socket.socketpair()
        admin = self._admin if index == 0 else None
        spec = WorkerSpec(
            index,
            self._public.fileno(),
            None if admin is None else admin.fileno(),
            theirs.fileno(),
        )
        inherited = [self._public.fileno(), theirs.fileno()]
        if admin is not None:
            inherited.append(admin.fileno())
        try:
            process = await _spawn(
                self._command(spec),
                inherited,
                {**_worker_environment(), MULTIPROCESS_DIR: self._metrics_dir},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._processes[index] = process
        if self._stopping:  # asked to stop while this one was being started
            _signal(process, signal.SIGTERM)
        logger.info("worker started", worker=index, pid=process.pid)
        return process, ours

    async def _wait_ready(self, process: asyncio.subprocess.Process, link: socket.socket) -> bool:
        """Whether the worker said it is ready before it exited."""
        loop = asyncio.get_running_loop()
        said = asyncio.ensure_future(loop.sock_recv(link, 16))
        exited = asyncio.ensure_future(process.wait())
        try:
            await asyncio.wait({said, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            if not said.done():
                said.cancel()
        ready = said.done() and not said.cancelled() and said.exception() is None
        if ready and said.result().startswith(READY):
            for index, running in self._processes.items():
                if running is process:
                    self._ready.add(index)
            if len(self._ready) == self._count:
                logger.info("all workers listening", workers=self._count)
                notify("READY=1")
            return True
        return False

    def _forget_metrics(self, pid: int) -> None:
        """The gauges of a worker that is gone no longer count (its counters still do)."""
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, self._metrics_dir)


async def _spawn(
    command: list[str], inherited: list[int], env: dict[str, str]
) -> asyncio.subprocess.Process:
    """A worker, in a process group of its own: signals from the terminal reach the
    supervisor only, which passes them on."""
    return await asyncio.create_subprocess_exec(
        *command, pass_fds=inherited, env=env, process_group=0
    )


def _worker_environment() -> dict[str, str]:
    """The supervisor's environment, but for the service manager's socket: it is the
    supervisor that tells systemd it is ready or stopping."""
    return {name: value for name, value in os.environ.items() if name != NOTIFY_ENV}


def _signal(process: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)


def worker_command(config_path: str | None) -> Command:
    """The command line of a worker: `serve` with the same config, and its `--worker`."""

    def command(spec: WorkerSpec) -> list[str]:
        config = [] if config_path is None else ["--config", config_path]
        return [sys.executable, "-m", "receiver.cli", "serve", *config, "--worker", spec.format()]

    return command
