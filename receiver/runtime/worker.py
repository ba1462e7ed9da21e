"""One worker process of `serve --workers N` (`receiver.runtime.supervisor` starts them): what it
is given by the supervisor, and its link back to it.

A worker is `serve` as one process runs it, except that its listening sockets come
bound from the supervisor (descriptors inherited at start), only worker 0 serves the
admin listener and runs the reconciler, and a socket pair ties it to the supervisor:
the worker says on it when it is ready (its inbox open), and sees on it when the
supervisor is gone (the supervisor's end closes with it, even on kill -9), then drains
and stops as on SIGTERM (logging the link's end as an error, exit code 1), so that no
worker outlives its supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from dataclasses import dataclass

import structlog

logger = structlog.get_logger("ci_receiver.worker")

READY = b"r"


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """`--worker INDEX:PUBLIC_FD:ADMIN_FD:LINK_FD` (ADMIN_FD `-` when the worker serves
    no admin listener), as the supervisor passes it."""

    index: int
    public_fd: int
    admin_fd: int | None
    link_fd: int

    @classmethod
    def parse(cls, text: str) -> WorkerSpec:
        index, public, admin, link = text.split(":")
        return cls(int(index), int(public), None if admin == "-" else int(admin), int(link))

    def format(self) -> str:
        admin = "-" if self.admin_fd is None else str(self.admin_fd)
        return f"{self.index}:{self.public_fd}:{admin}:{self.link_fd}"

    def public_socket(self) -> socket.socket:
        return socket.socket(fileno=self.public_fd)

    def admin_socket(self) -> socket.socket | None:
        return None if self.admin_fd is None else socket.socket(fileno=self.admin_fd)


class SupervisorLink:
    """The worker's end of its socket pair, run beside the sources as one is: it ends (and
    with it the worker, drained) when the supervisor's end closes."""

    name = "supervisor-link"

    def __init__(self, spec: WorkerSpec) -> None:
        self._sock = socket.socket(fileno=spec.link_fd)
        self._sock.setblocking(False)
        self._stopping = asyncio.Event()

    def listening(self, host: str, port: int) -> None:
        """The public server listens (its inbox may not be open yet): said in the log."""
        logger.info("worker listening", pid=os.getpid(), host=host, port=port)

    def ready(self) -> None:
        """The service runs: say so to the supervisor, which tells systemd once every
        worker is ready, and from then on passes SIGHUP to this one."""
        with contextlib.suppress(OSError):  # a supervisor gone is seen by run()
            self._sock.send(READY)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        closed = asyncio.ensure_future(loop.sock_recv(self._sock, 16))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            stopping.cancel()
            self._sock.close()
        if not self._stopping.is_set():
            # The supervisor never writes: anything here is its end closing.
            logger.error("the supervising process is gone: stopping", pid=os.getpid())

    def stop(self) -> None:
        self._stopping.set()
