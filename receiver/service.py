"""Everything behind the sources, put together from the config: inbox, router, handlers,
dispatcher and the ingest path that the HTTP app and the TDMQ consumer share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import handlers as handler_api
from receiver.config import Config
from receiver.dispatch import Dispatcher, Slot
from receiver.inbox import Inbox, open_inbox
from receiver.ingest import Ingestor, Intake
from receiver.metrics import Metrics
from receiver.routing import Router

if TYPE_CHECKING:
    from receiver.ci_api import CiApi

# A readiness check: returns (ok, detail).
Check = Callable[[], Awaitable[tuple[bool, str]]]


def build_slots(config: Config) -> list[Slot]:
    """Make every configured handler (validating its options); raises HandlerConfigError."""
    slots = []
    for name, handler_config in config.handlers.items():
        try:
            handler = handler_api.build(handler_config.type, handler_config.options)
        except handler_api.HandlerConfigError as exc:
            raise handler_api.HandlerConfigError(f"handlers.{name}: {exc}") from exc
        slots.append(Slot(name, handler, handler_config))
    return slots


class Backend(Protocol):
    """What the HTTP app and the runner need behind them: a `Service`, or a relay that
    publishes callbacks to TDMQ instead of keeping them."""

    draining: bool

    @property
    def config(self) -> Config: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def ingestor(self) -> Intake: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def readiness(self) -> tuple[bool, dict[str, str]]: ...


class Service:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.inbox: Inbox = open_inbox(config, wait=True)
        # CI's job API, shared by the reconciler and verification, when [ci] is set.
        self.ci_api: CiApi | None = None
        slots = build_slots(config)
        if config.ci.enabled:
            from receiver.ci_api import CiApi

            self.ci_api = CiApi(config.ci, self.metrics.registry)
        if config.verified_sources():
            from receiver.verify import verify_slot

            assert self.ci_api is not None  # the config says so
            slots.append(
                verify_slot(config.ci, self.ci_api, self.inbox, self.metrics.registry,
                            wake=lambda: self.dispatcher.wake())
            )  # fmt: skip
        self.dispatcher = Dispatcher(
            self.inbox,
            slots,
            self.metrics,
            poll_interval=config.dispatch.poll_interval,
            drain_timeout=config.dispatch.drain_timeout,
        )
        self.ingestor = Ingestor(
            self.inbox,
            Router(config.routes, list(config.handlers)),
            self.metrics,
            config.limits.to_limits(),
            on_stored=self.dispatcher.notify,
            verified_sources=config.verified_sources(),
        )
        self.draining = False
        self._checks: dict[str, Check] = {}

    def add_check(self, name: str, check: Check) -> None:
        """Let a source (the TDMQ consumer) take part in readiness."""
        self._checks[name] = check

    async def start(self) -> None:
        await self.inbox.open()
        await self.dispatcher.start()

    async def stop(self) -> None:
        self.draining = True
        await self.dispatcher.stop()
        await self.inbox.close()

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        checks: dict[str, tuple[bool, str]] = {}
        try:
            await self.inbox.ping()
            checks["inbox"] = (True, "writable")
        except Exception as exc:
            checks["inbox"] = (False, str(exc))
        running = self.dispatcher.running
        checks["dispatcher"] = (running, "running" if running else "stopped")
        checks["draining"] = (not self.draining, "draining" if self.draining else "no")
        for name, check in self._checks.items():
            try:
                checks[name] = await check()
            except Exception as exc:
                checks[name] = (False, str(exc))
        details = {name: detail for name, (_, detail) in checks.items()}
        # Handlers that cannot start do not make the receiver unready: callbacks are still
        # kept, and their runs wait. They show here for the operator.
        for name, status in self.dispatcher.handler_status().items():
            details[f"handler:{name}"] = status
        return all(ok for ok, _ in checks.values()), details
