"""An HTTP server as a source: a uvicorn server, bounded (`receiver.sources.http_server`),
on a socket bound before the service starts. The public receiver is made here; the admin
listener is the same kind of server (`receiver.admin.listener`)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from ipaddress import IPv4Network, IPv6Network

import structlog
from starlette.types import ASGIApp

from receiver.metrics import Metrics
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
from receiver.sources.tls import TlsCertificate

# The runner's logger, as before this class left it: the log lines are the same.
logger = structlog.get_logger("ci_receiver.runner")


class HttpServer:
    """A uvicorn server, bounded (`receiver.sources.http_server`), as a `Source`: the
    public receiver, or the admin listener."""

    def __init__(
        self,
        name: str,
        app: ASGIApp,
        *,
        host: str,
        port: int,
        limits: ServerLimits,
        metrics: Metrics,
        graceful_timeout: float,
        on_listening: Callable[[str, int], None],
        trusted_proxies: Sequence[IPv4Network | IPv6Network] = (),
        sock: socket.socket | None = None,
        tls: TlsCertificate | None = None,
    ) -> None:
        self.name = name
        # Served over TLS with it (reloaded on SIGHUP), or plain HTTP.
        self.tls = tls
        # Bound now, before the service starts (migrations, handlers): a port that cannot
        # be had ends the command at once (CannotListen says which server, the address,
        # why and what to change); connections are taken once it runs. Under `serve
        # --workers`, the supervisor's listening socket.
        self._sockets = [sock if sock is not None else bind(name, host, port)]
        config = BoundedConfig(
            app,
            guard=Guard(name, limits, metrics),
            tls=tls,
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
        """The port CI posts to: /callbacks, /healthz, a bare /readyz. Raises `TlsError`
        when its certificate or key cannot be served."""
        http = service.config.http
        tls = TlsCertificate.of("http", http)
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
            tls=tls,
        )

    @property
    def requests_served(self) -> int:
        return self._server.server_state.total_requests

    async def run(self) -> None:
        # Both servers log through uvicorn's one logger ("Started server process", its
        # shutdown), so each of those lines came twice, alike. Bound in this task, the
        # name goes on them and on every request line it serves (its tasks inherit it).
        structlog.contextvars.bind_contextvars(listener=self.name)
        await self._server.serve(self._sockets)

    def stop(self) -> None:
        self._server.should_exit = True
