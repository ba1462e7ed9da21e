"""Run the service with its sources until SIGTERM or SIGINT, then shut down in order:
sources stop taking work (in-flight requests finish), the dispatcher drains, the inbox
closes. SIGHUP reloads the handlers and routes meanwhile (receiver/runtime/reload.py)."""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import structlog

from receiver.metrics import Metrics
from receiver.runtime.sdnotify import notify
from receiver.sources.backend import Backend
from receiver.sources.http import create_app
from receiver.sources.http_server import (
    BoundedConfig,
    Guard,
    Server,
    ServerLimits,
    connection_limits,
    raise_open_files_limit,
)
from receiver.sources.listen import bind

logger = structlog.get_logger("ci_receiver.runner")

# The admin listener serves operators and monitoring: a few connections are plenty.
ADMIN_CONNECTIONS = 32


class Component(Protocol):
    """A source of callbacks: runs until asked to stop."""

    name: str

    async def run(self) -> None: ...
    def stop(self) -> None: ...


class HttpServer:
    """A uvicorn server, bounded (`receiver.sources.http_server`), as a component: the
    public receiver, or the admin listener."""

    def __init__(
        self,
        name: str,
        app: Any,
        *,
        host: str,
        port: int,
        limits: ServerLimits,
        metrics: Metrics,
        graceful_timeout: float,
        on_listening: Callable[[str, int], None],
        trusted_proxies: Sequence[Any] = (),
        sock: socket.socket | None = None,
    ) -> None:
        self.name = name
        # Bound now, before the service starts (migrations, handlers): a port that cannot
        # be had ends the command at once (CannotListen says which server, the address,
        # why and what to change); connections are taken once it runs. Under `serve
        # --workers`, the supervisor's listening socket.
        self._sockets = [sock if sock is not None else bind(name, host, port)]
        config = BoundedConfig(
            app,
            guard=Guard(name, limits, metrics),
            host=host,
            port=port,
            timeout_graceful_shutdown=graceful_timeout,
            # X-Forwarded-For is read from these peers only (uvicorn walks it from the
            # right, skipping trusted hops); with none, never.
            proxy_headers=bool(trusted_proxies),
            forwarded_allow_ips=[str(network) for network in trusted_proxies] or None,
        )
        self._server = Server(config)
        self._server.on_started = lambda server: on_listening(*server.address)

    @classmethod
    def public(
        cls,
        service: Backend,
        on_listening: Callable[[str, int], None],
        sock: socket.socket | None = None,
    ) -> HttpServer:
        """The port CI posts to: /callbacks, /healthz, a bare /readyz."""
        http = service.config.http
        open_files = raise_open_files_limit()
        connections = connection_limits(open_files, http.max_connections)
        if connections.lowered:
            logger.warning(
                "http.max_connections lowered to fit the open files limit",
                max_connections=connections.serve,
                configured=http.max_connections,
                open_files_limit=open_files,
            )
        limits = ServerLimits(
            max_header_bytes=http.max_header_bytes,
            max_headers=http.max_headers,
            header_timeout=http.header_timeout,
            body_timeout=http.body_timeout,
            keepalive_timeout=http.keepalive_timeout,
            max_connections=connections.serve,
            max_requests=http.max_requests,
            max_open=connections.hold,
        )
        return cls(
            "public",
            create_app(service),
            host=http.host,
            port=http.port,
            limits=limits,
            metrics=service.metrics,
            graceful_timeout=http.graceful_timeout,
            on_listening=on_listening,
            trusted_proxies=http.trusted_proxies,
            sock=sock,
        )

    @classmethod
    def admin(
        cls,
        service: Backend,
        on_listening: Callable[[str, int], None],
        sock: socket.socket | None = None,
    ) -> HttpServer:
        """The admin listener: /metrics, the detailed /readyz (`receiver.admin`)."""
        from receiver.admin.app import create_admin_app

        http, admin = service.config.http, service.config.admin
        limits = ServerLimits(
            header_timeout=http.header_timeout,
            body_timeout=http.body_timeout,
            keepalive_timeout=http.keepalive_timeout,
            max_connections=ADMIN_CONNECTIONS,
            max_requests=ADMIN_CONNECTIONS,
        )
        return cls(
            "admin",
            create_admin_app(service),
            host=admin.host,
            port=admin.port,
            limits=limits,
            metrics=service.metrics,
            graceful_timeout=http.graceful_timeout,
            on_listening=on_listening,
            sock=sock,
        )

    @property
    def requests_served(self) -> int:
        return self._server.server_state.total_requests

    async def run(self) -> None:
        await self._server.serve(self._sockets)

    def stop(self) -> None:
        self._server.should_exit = True


async def run_service(
    service: Backend,
    components: list[Component],
    reload: Callable[[], Awaitable[bool]] | None = None,
    *,
    serving: Sequence[Component] = (),
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Start the service and its components; return the process exit code, or raise what
    made the service's start fail (an inbox it cannot use).

    `serving` (the HTTP servers) start once the service runs, so that what listens is
    ready, or as soon as its start has to wait for the inbox's database: they serve
    meanwhile, `/healthz` saying the process lives, `/readyz` why it is not ready, and
    callbacks getting 503. `components` (consumers, the reconciler) start once the
    service runs, and then the service manager is told it is ready (`on_ready` too: a
    worker's supervisor). SIGTERM or SIGINT stops it at any point. `reload` runs on
    SIGHUP, one at a time (without it, SIGHUP is logged and ignored: it must not end the
    process, as it would by default)."""
    raise_open_files_limit()
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop_requested.set)
    waiting_for_signal = asyncio.create_task(stop_requested.wait())
    must_wait = asyncio.Event()
    starting = asyncio.create_task(service.start(waiting=must_wait.set), name="start")
    waits = asyncio.create_task(must_wait.wait())
    tasks: dict[asyncio.Task[None], Component] = {}
    reloads = _Reloads(reload)
    exit_code = 0
    try:
        ended = await _first(waiting_for_signal, starting, waits)
        listening = ended is waits
        if listening:  # the inbox waits for its database: serve meanwhile
            tasks.update(_run(serving))
            ended = await _first(waiting_for_signal, starting, *tasks)
        if ended is starting and starting.exception() is None:
            if not listening:
                tasks.update(_run(serving))
            _started(reloads)
            if on_ready is not None:
                on_ready()
            tasks.update(_run(components))
            ended = await _first(waiting_for_signal, *tasks)
        if ended is not waiting_for_signal:
            exit_code = 1
            if ended is not starting:
                _log_end(ended)
        logger.info("shutting down")
        notify("STOPPING=1")
        reloads.stop()  # no reload while draining
        service.draining = True
        starting.cancel()  # still waiting for its inbox, say
        for component in tasks.values():
            component.stop()
        for task, outcome in zip(
            tasks, await asyncio.gather(*tasks, return_exceptions=True), strict=True
        ):
            if isinstance(outcome, BaseException) and task is not ended:
                logger.error(
                    "component failed while stopping", component=task.get_name(), error=str(outcome)
                )
    finally:
        waiting_for_signal.cancel()
        waits.cancel()
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await reloads.finish()
        await service.stop()
        for sig in signals:
            loop.remove_signal_handler(sig)
    failure = starting.exception() if starting.done() and not starting.cancelled() else None
    if failure is not None:
        raise failure
    logger.info("stopped")
    return exit_code


async def _first(*tasks: asyncio.Task[Any]) -> asyncio.Task[Any]:
    """The first of `tasks` to end (of several ending together, the first given)."""
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    return next(task for task in tasks if task in done)


def _run(components: Sequence[Component]) -> dict[asyncio.Task[None], Component]:
    return {asyncio.create_task(c.run(), name=c.name): c for c in components}


def _started(reloads: _Reloads) -> None:
    """The service runs: reloads are taken from now on (one asked meanwhile applied), and
    the service manager is told."""
    # What start-up made (modules, config, handlers, pools) lasts as long as the process:
    # frozen, every full collection no longer walks through it (`python -m
    # bench.dispatch_cost --freeze`: the collector's time per callback more than halves).
    gc.collect()
    gc.freeze()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloads.request)
    if _reload_asked_while_starting:
        reloads.request()
    notify("READY=1")


def _log_end(task: asyncio.Task[None]) -> None:
    """Why a component that runs until stopped ended."""
    if task.exception() is not None:
        logger.error("component failed", component=task.get_name(), error=str(task.exception()))
    else:
        logger.error("component stopped on its own", component=task.get_name())


_reload_asked_while_starting = False


def hold_reloads_while_starting() -> None:
    """From the command's first steps until the service runs, a SIGHUP (`systemctl
    reload` as it starts) is remembered and applied once it runs, rather than end the
    process as it would by default, or be lost."""

    def remember(signum: int, frame: object) -> None:
        global _reload_asked_while_starting
        _reload_asked_while_starting = True

    signal.signal(signal.SIGHUP, remember)


class _Reloads:
    """SIGHUPs, each a reload after the one under way (a reload sees the file as it is
    when it starts). Once stopping, a SIGHUP is ignored; its handler stays in place until
    the loop closes (removing it would restore the default action, which ends the
    process)."""

    def __init__(self, reload: Callable[[], Awaitable[bool]] | None) -> None:
        self._reload = reload
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    def request(self) -> None:
        if self._stopping:
            logger.info("SIGHUP ignored: stopping")
            return
        if self._reload is None:
            logger.info("SIGHUP: nothing to reload here (no handlers or routes)")
            return
        task = asyncio.create_task(self._run(), name="reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        assert self._reload is not None
        async with self._lock:
            try:
                await self._reload()
            except Exception:  # a bug of ours must not end the process
                logger.exception("config reload failed; the running config stays")

    def stop(self) -> None:
        self._stopping = True

    async def finish(self) -> None:
        """Stop taking reloads; wait for the one under way."""
        self.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)
