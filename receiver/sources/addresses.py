"""Where the configured listeners are reached: from this host (`send`, `health`), and
from CI (the CallBack URL that `init` and `serve` print)."""

from __future__ import annotations

import ipaddress
import socket

from receiver.config import Config, Listener

# What stands for this host's address in a CallBack URL when it has none CI can reach.
PUBLIC_PLACEHOLDER = "<public-address>"
# A listener on every address is reached on the loopback of its family.
LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def local_base(listener: Listener) -> str:
    """The listener's base URL as seen from this host (scheme, host, port)."""
    return base(listener, LOOPBACK.get(listener.host, listener.host))


def base(listener: Listener, host: str, port: int | None = None) -> str:
    """<scheme>://<host>:<port> of the listener reached at `host` (on `port`: the one it
    is bound to, where the config's is 0)."""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{listener.scheme}://{host}:{listener.port if port is None else port}"


def local_url(config: Config, *, reveal_token: bool = True) -> str:
    """The callback URL of the listener as seen from this host, with the first path
    token (or `<token>`)."""
    return local_base(config.http) + _callbacks(config, reveal_token)


def callback_url(config: Config, host: str, *, reveal_token: bool, port: int | None = None) -> str:
    """<scheme>://<host>:<port>/callbacks[/<token>]: the token itself, or `<token>`."""
    return base(config.http, host, port) + _callbacks(config, reveal_token)


def _callbacks(config: Config, reveal_token: bool) -> str:
    path = "/callbacks"
    if config.http.tokens:
        path += "/" + (config.http.tokens[0].get_secret_value() if reveal_token else "<token>")
    return path


def public_address() -> str | None:
    """This host's own address on the way to the internet, when it is a public one CI can
    call back (CI refuses private addresses); None behind NAT, a proxy or no route."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            # A UDP connect only chooses the route (and so the address): nothing is sent.
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1, routed as any public address
            address = probe.getsockname()[0]
    except OSError:
        return None
    return address if ipaddress.ip_address(address).is_global else None
