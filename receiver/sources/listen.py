"""The listening sockets of the public and admin HTTP servers, bound here rather than by
uvicorn: one way to bind for `serve` and for the supervisor of `serve --workers`, and a
port that cannot be had is an error saying which server, the address, the system's
reason and the settings to change (uvicorn logs the OS error and exits with 3)."""

from __future__ import annotations

import socket

from receiver.envvars import PREFIX

# Connections not yet accepted that the kernel keeps (it caps this at net.core.somaxconn):
# a burst of senders connecting at once waits there rather than being refused.
LISTEN_BACKLOG = 65535
# Where each server's address is set: the config section (and so its environment keys).
SECTIONS = {"public": "http", "admin": "admin"}


class CannotListen(Exception):
    """A server's address cannot be listened on; the message says what to do."""


def listen(server: str, host: str, port: int) -> socket.socket:
    """A listening TCP socket for the `public` or `admin` server, as uvicorn would bind
    it, or `CannotListen` naming the address, the OS error and the keys to change."""
    sock = bind(server, host, port)
    try:
        start_listening(server, sock)
    except CannotListen:
        sock.close()
        raise
    return sock


def bind(server: str, host: str, port: int) -> socket.socket:
    """`listen`, but bound only: the port is had (or `CannotListen`) and connections are
    still refused until the server starts (uvicorn listens on the socket it is given)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CannotListen(_cannot(server, host, port, exc)) from None
    return sock


def start_listening(server: str, sock: socket.socket, backlog: int = LISTEN_BACKLOG) -> None:
    """Listen on a socket `bind` made. SO_REUSEADDR lets sockets share an address until
    one of them listens, so another process that bound the same port meanwhile (two
    started at once with the same config) may have taken it: the second then gets
    `CannotListen`, not a server with no socket (what uvloop's create_server makes of a
    socket it cannot listen on)."""
    try:
        sock.listen(backlog)
    except OSError as exc:
        host, port = sock.getsockname()[:2]
        raise CannotListen(_cannot(server, host, port, exc)) from None


def _cannot(server: str, host: str, port: int, error: OSError) -> str:
    section = SECTIONS[server]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    env = f"{PREFIX}{section.upper()}__"
    return (
        f"the {server} HTTP server cannot listen on {address}: {error}; set another"
        f" [{section}] port ({env}PORT) or host ({env}HOST)"
    )
