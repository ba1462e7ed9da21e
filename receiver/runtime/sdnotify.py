"""systemd's readiness protocol: one datagram to `$NOTIFY_SOCKET` per state, when the
service manager gave one (a unit of `Type=notify`); without it nothing is sent.

`READY=1` once the service runs and handles its signals, so that `systemctl start`
returns when it is up and a `systemctl reload` never reaches a process still starting
(where SIGHUP would end it); `STOPPING=1` when it begins to drain. The protocol is a
plain datagram (sd_notify(3)): the Python bindings need libsystemd to build, which a
slim image lacks, for what is one `sendto`.
"""

from __future__ import annotations

import os
import socket

import structlog

logger = structlog.get_logger("ci_receiver.sdnotify")

ENV = "NOTIFY_SOCKET"


def notify(state: str) -> None:
    address = os.environ.get(ENV)
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:  # the service manager is not listening: nothing to tell
        logger.warning("cannot notify the service manager", state=state, error=str(exc))
