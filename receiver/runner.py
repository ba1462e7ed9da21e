"""Run the service with its sources until SIGTERM or SIGINT, then shut down in order:
sources stop taking work (in-flight requests finish), the dispatcher drains, the inbox
closes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Protocol

import structlog
import uvicorn

from receiver.service import Backend
from receiver.sources.http import create_app

logger = structlog.get_logger("ci_receiver.runner")


class Component(Protocol):
    """A source of callbacks: runs until asked to stop."""

    name: str

    async def run(self) -> None: ...
    def stop(self) -> None: ...


class _Server(uvicorn.Server):
    """uvicorn, minus its own signal handling (the runner owns the signals), telling
    when it listens."""

    on_started: Callable[[_Server], None] = staticmethod(lambda server: None)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        await super().startup(sockets)
        if self.started:
            self.on_started(self)


class HttpServer:
    name = "http"

    def __init__(self, service: Backend, on_listening: Callable[[str, int], None]) -> None:
        http = service.config.http
        config = uvicorn.Config(
            create_app(service),
            host=http.host,
            port=http.port,
            lifespan="off",
            access_log=False,
            log_config=None,
            server_header=False,
            timeout_graceful_shutdown=http.graceful_timeout,
        )
        self._server = _Server(config)

        def announce(server: _Server) -> None:
            host, port = server.servers[0].sockets[0].getsockname()[:2]
            on_listening(host, port)

        self._server.on_started = announce

    async def run(self) -> None:
        try:
            await self._server.serve()
        except SystemExit as exc:  # uvicorn exits when it cannot bind
            raise RuntimeError(f"the HTTP server could not start on its port ({exc})") from None

    def stop(self) -> None:
        self._server.should_exit = True


async def run_service(service: Backend, components: list[Component]) -> int:
    """Start the service and its components; return the process exit code."""
    await service.start()
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop_requested.set)
    tasks = {asyncio.create_task(c.run(), name=c.name): c for c in components}
    waiting_for_signal = asyncio.create_task(stop_requested.wait())
    exit_code = 0
    try:
        done, _ = await asyncio.wait(
            {*tasks, waiting_for_signal}, return_when=asyncio.FIRST_COMPLETED
        )
        if waiting_for_signal not in done:
            exit_code = 1
            for task in done:
                if task.exception() is not None:
                    logger.error(
                        "component failed", component=task.get_name(), error=str(task.exception())
                    )
                else:
                    logger.error("component stopped on its own", component=task.get_name())
        logger.info("shutting down")
        service.draining = True
        for component in components:
            component.stop()
        for task, outcome in zip(
            tasks, await asyncio.gather(*tasks, return_exceptions=True), strict=True
        ):
            if isinstance(outcome, BaseException) and task not in done:
                logger.error(
                    "component failed while stopping", component=task.get_name(), error=str(outcome)
                )
    finally:
        waiting_for_signal.cancel()
        await service.stop()
        for sig in signals:
            loop.remove_signal_handler(sig)
    logger.info("stopped")
    return exit_code
