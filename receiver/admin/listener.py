"""The admin listener: the admin app (/metrics, the detailed /readyz, the JSON API, the
inspector) on its own port, served as the public receiver is, with bounds of its own."""

from __future__ import annotations

import socket
from collections.abc import Callable

from receiver.admin.app import create_admin_app
from receiver.sources.backend import Backend
from receiver.sources.http_server import ServerLimits
from receiver.sources.http_source import HttpServer
from receiver.sources.tls import TlsCertificate

# The admin listener serves operators and monitoring: a few connections are plenty.
ADMIN_CONNECTIONS = 32


def admin_listener(
    service: Backend,
    on_listening: Callable[[str, int], None],
    sock: socket.socket | None = None,
) -> HttpServer:
    http, admin = service.config.http, service.config.admin
    limits = ServerLimits(
        header_timeout=http.header_timeout,
        body_timeout=http.body_timeout,
        keepalive_timeout=http.keepalive_timeout,
        max_connections=ADMIN_CONNECTIONS,
        max_requests=ADMIN_CONNECTIONS,
    )
    return HttpServer(
        "admin",
        create_admin_app(service),
        host=admin.host,
        port=admin.port,
        limits=limits,
        metrics=service.metrics,
        graceful_timeout=http.graceful_timeout,
        on_listening=on_listening,
        sock=sock,
        tls=TlsCertificate.of("admin", admin),
    )
