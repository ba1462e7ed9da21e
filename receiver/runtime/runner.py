"""Run the service with its sources until SIGTERM or SIGINT, then shut down in order:
sources stop taking work (in-flight requests finish), the dispatcher drains, the inbox
closes. SIGHUP reloads the handlers and routes meanwhile (receiver/runtime/reload.py)."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog

from receiver.runtime.sdnotify import notify
from receiver.sources.backend import Backend
from receiver.sources.http_server import raise_open_files_limit
from receiver.sources.source import Source

logger = structlog.get_logger("ci_receiver.runner")

# Containers allocated (net of those freed) between two young collections, once started.
YOUNG_COLLECTION_THRESHOLD = 10_000


async def run_service(
    service: Backend,
    sources: Sequence[Source],
    reload: Callable[[], Awaitable[bool]] | None = None,
    *,
    serving: Sequence[Source] = (),
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Start the service and its sources; return the process exit code, or raise what
    made the service's start fail (an inbox it cannot use).

    `serving` (the HTTP servers) start once the service runs, so that what listens is
    ready, or as soon as its start has to wait for the inbox's database: they serve
    meanwhile, `/healthz` saying the process lives, `/readyz` why it is not ready, and
    callbacks getting 503. `sources` (consumers, the reconciler) start once the
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
    tasks: dict[asyncio.Task[None], Source] = {}
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
            tasks.update(_run(sources))
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
        for source in tasks.values():
            source.stop()
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


def _run(sources: Sequence[Source]) -> dict[asyncio.Task[None], Source]:
    return {asyncio.create_task(s.run(), name=s.name): s for s in sources}


def _started(reloads: _Reloads) -> None:
    """The service runs: reloads are taken from now on (one asked meanwhile applied), and
    the service manager is told."""
    # What start-up made (modules, config, handlers, pools) lasts as long as the process:
    # frozen, every full collection no longer walks through it (`python -m
    # bench.dispatch_cost --freeze`: the collector's time per callback more than halves).
    gc.collect()
    gc.freeze()
    # Callbacks in flight hold many small containers at once, nearly all freed by their
    # reference counts as each callback ends; at the default threshold (a young collection
    # every 700 containers more than freed) a burst ran the collector a hundred times a
    # second, to find almost nothing (`python -m bench.peer`, docs/benchmarks.md).
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloads.request)
    if _reload_asked_while_starting:
        reloads.request()
    notify("READY=1")


def _log_end(task: asyncio.Task[None]) -> None:
    """Why a source, which runs until stopped, ended."""
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
