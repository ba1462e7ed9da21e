"""SIGHUP: read the config file again and run its handlers and routes, with no restart.

Handlers and routes are what an operator changes most (a new notification, a route for
failed jobs), and a restart would cut open connections and handler attempts short to
take them in. A reload leaves the listeners, the inbox and the consumers as they are:
callbacks are taken all along, each routed by the routes in force when it arrives.
Every other section takes effect at the next start, which the log says when a reload
changes one. A config that does not load, or a handler whose options are invalid,
leaves the running config in place, and the log says why.

The listeners' TLS certificates (`tls_cert`, `tls_key`) are read again too, from the
paths they were started with (a renewal replaces the files): new connections get the new
certificate, open ones keep theirs. A certificate that cannot be served leaves the
running one in place, and the log says why. A reload is counted refused
(`ci_receiver_config_reloads_total`) when the config or a certificate was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog

from handlers import HandlerConfigError
from receiver.config import Config, ConfigError
from receiver.ingest.routing import changes as route_changes
from receiver.ingest.routing import log_warnings
from receiver.metrics import Metrics
from receiver.runtime.service import Service, build_slots
from receiver.sources.tls import TlsCertificate, TlsError

logger = structlog.get_logger("ci_receiver.reload")

# What a reload applies; the rest of the config is read at start only.
RELOADED = ("handlers", "routes")


class Reloader:
    """What SIGHUP runs. `service`: whose handlers and routes to reload from the config
    `read` returns (None: a relay, which has none); `certificates`: the listeners' to
    read again."""

    def __init__(
        self,
        service: Service | None,
        read: Callable[[], Config] | None,
        metrics: Metrics,
        certificates: Sequence[TlsCertificate] = (),
        *,
        warn: bool = True,
    ) -> None:
        self._service = service
        self._read = read
        self._metrics = metrics
        self._certificates = certificates
        # Whether to repeat what in the config is likely a mistake (not in every worker).
        self._warn = warn

    async def reload(self) -> bool:
        """Apply the config's handlers and routes, and the certificates; whether all of
        them were applied."""
        applied = True if self._service is None else await self._reload_config(self._service)
        for certificate in self._certificates:
            try:
                certificate.reload()
            except TlsError as exc:
                applied = False
                logger.error(
                    "tls certificate not reloaded: the running one stays",
                    server=certificate.name,
                    error=str(exc),
                )
        self._metrics.config_reloads.labels("applied" if applied else "refused").inc()
        return applied

    async def _reload_config(self, service: Service) -> bool:
        assert self._read is not None  # given with the service
        try:
            config = self._read()
            slots = build_slots(config)
        except (ConfigError, HandlerConfigError) as exc:
            logger.error("config not reloaded: the running one stays", error=str(exc))
            return False
        running = service.config
        on_restart = [
            name
            for name in type(config).model_fields
            if name not in RELOADED and getattr(config, name) != getattr(running, name)
        ]
        routes = route_changes(running.routes, config.routes)
        handlers = await service.reload(config, slots)
        logger.info(
            "config reloaded", handlers=handlers or "unchanged", routes=routes or "unchanged"
        )
        if on_restart:
            logger.warning("config changes that take effect on restart", sections=on_restart)
        if self._warn:
            log_warnings(config)
        return True
