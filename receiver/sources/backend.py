"""What every source hands its callbacks to: the `Service` (inbox, routes, dispatcher), or
in relay mode a publisher that sends them on to TDMQ instead of keeping them. The HTTP
app, the admin listener and the runner see only this."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from receiver.config import Config
from receiver.ingest.ingest import Intake
from receiver.metrics import Metrics


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
    async def start(self, waiting: Callable[[], None] | None = None) -> None:
        """Start; call `waiting` if it first has to wait (for its inbox's database)."""
        ...

    async def stop(self) -> None: ...
    async def readiness(self) -> tuple[bool, dict[str, str]]: ...
