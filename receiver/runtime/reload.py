"""SIGHUP: read the config file again and run its handlers and routes, with no restart.

Handlers and routes are what an operator changes most (a new notification, a route for
failed jobs), and a restart would cut open connections and handler attempts short to
take them in. A reload leaves the listeners, the inbox and the consumers as they are:
callbacks are taken all along, each routed by the routes in force when it arrives.
Every other section takes effect at the next start, which the log says when a reload
changes one. A config that does not load, or a handler whose options are invalid,
leaves the running config in place, and the log says why.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from handlers import HandlerConfigError
from receiver.config import Config, ConfigError
from receiver.ingest.routing import log_warnings
from receiver.metrics import Metrics
from receiver.runtime.service import Service, build_slots

logger = structlog.get_logger("ci_receiver.reload")

# What a reload applies; the rest of the config is read at start only.
RELOADED = ("handlers", "routes")


class Reloader:
    def __init__(self, service: Service, read: Callable[[], Config], *, warn: bool = True) -> None:
        self._service = service
        self._read = read
        # Whether to repeat what in the config is likely a mistake (not in every worker).
        self._warn = warn

    async def reload(self) -> bool:
        """Read the config and apply its handlers and routes; whether it was applied."""
        metrics: Metrics = self._service.metrics
        try:
            config = self._read()
            slots = build_slots(config)
        except (ConfigError, HandlerConfigError) as exc:
            metrics.config_reloads.labels("refused").inc()
            logger.error("config not reloaded: the running one stays", error=str(exc))
            return False
        running = self._service.config
        on_restart = [
            name
            for name in type(config).model_fields
            if name not in RELOADED and getattr(config, name) != getattr(running, name)
        ]
        changes = await self._service.reload(config, slots)
        metrics.config_reloads.labels("applied").inc()
        logger.info("config reloaded", handlers=changes or "unchanged")
        if on_restart:
            logger.warning("config changes that take effect on restart", sections=on_restart)
        if self._warn:
            log_warnings(config)
        return True
