"""TLS on a listener, with each connection in hand from its accept to the end of its
handshake.

The listener accepts plain TCP. Each connection is counted at once, as a plain one is (and
past the connections held, closed at once, before any handshake); then it takes its TLS
handshake in a task of its own, bounded in time. A handshake that fails, times out or is
cut by the client is uncounted at once; one that succeeds hands the connection to the
HTTP protocol, which counts it from then on; shutdown aborts those still going.

Why not `loop.create_server(ssl=...)`: the event loop's TLS layer then holds a connection
until its handshake is done, out of the server's sight, and says nothing when it fails:
what is open could be neither capped nor shut. Why not `loop.start_tls` on the accepted
transport: the upgrade runs in a task, and until the task runs the transport reads, so
the client's hello, sent at once, would be read as plain bytes and lost. Pausing the
transport in `connection_made` does not stop that: uvloop starts reading right after
`connection_made` whatever it asked, as does asyncio's own loop before Python 3.12
(python/cpython#103607). So the accepted socket is handed, unread, to
`loop.connect_accepted_socket`, which puts the TLS layer under it before its first read:
the descriptor is duplicated and the plain transport that accepted it aborted in its
`connection_made`, before it ever reads (the connection lives on in the duplicate).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any

# A connection's peer address as the transport gives it (None if it has none).
Peer = Any


class TlsAccept:
    """The TLS connections of one listener from their accept to the end of their
    handshake (`len()`: how many), and the `acceptor` protocol its server is made with."""

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        options: Mapping[str, float],
        make_protocol: Callable[[Callable[[], None]], asyncio.Protocol],
        admit: Callable[[Peer], bool],
        failed: Callable[[Peer], None],
    ) -> None:
        """`options`: `connect_accepted_socket`'s timeouts. `make_protocol(over)`: the
        protocol a connection is served with once its handshake is done; it calls
        `over()` in its `connection_made`, when it counts the connection itself.
        `admit(peer)`: whether a connection just accepted (counted in `len()` already) is
        held, or closed at once. `failed(peer)`: a handshake failed or timed out."""
        self.context = context
        self.options = options
        self.make_protocol = make_protocol
        self.admit = admit
        self.failed = failed
        self.handshakes: set[_Handshake] = set()
        self.closed = False

    def __len__(self) -> int:
        return len(self.handshakes)

    def acceptor(self) -> asyncio.Protocol:
        """The protocol factory of the listener (`loop.create_server`)."""
        return _Acceptor(self)

    def close(self) -> None:
        """At shutdown: the handshakes in progress are aborted (no byte of theirs is
        served), and a connection still accepted after this is closed at once."""
        self.closed = True
        for handshake in list(self.handshakes):
            handshake.abort()


class _Acceptor(asyncio.Protocol):
    """A connection just accepted, plain: counted, then its socket handed to its
    handshake, or closed at once."""

    def __init__(self, accept: TlsAccept) -> None:
        self._accept = accept

    # Ignored, override: asyncio.Protocol's takes any BaseTransport; a TCP server's is a
    # Transport (as BoundedHttpProtocol's says too).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        accept = self._accept
        if accept.closed:
            transport.abort()
            return
        peer = transport.get_extra_info("peername")
        handshake = _Handshake(accept, peer)
        accept.handshakes.add(handshake)
        if not accept.admit(peer):
            handshake.over()
            transport.abort()
            return
        # Both before this returns, which is before the transport reads at all: the
        # duplicate keeps the connection open (closing one descriptor of two sends nothing
        # to the client), and its bytes, the hello first, go to the TLS layer only.
        sock = transport.get_extra_info("socket").dup()
        transport.abort()
        handshake.start(sock)


class _Handshake:
    """One connection's TLS handshake, in a task: counted until it is over."""

    __slots__ = ("_accept", "_peer", "_sock", "_task")

    def __init__(self, accept: TlsAccept, peer: Peer) -> None:
        self._accept = accept
        self._peer = peer
        # The socket until the task takes it: a task cancelled before it ran never does.
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, sock: socket.socket) -> None:
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._run())

    def over(self) -> None:
        """Uncounted: made (the protocol counts it now), failed, or aborted."""
        self._accept.handshakes.discard(self)

    def abort(self) -> None:
        self.over()
        if self._sock is not None:
            self._sock.close()
        if self._task is not None:
            self._task.cancel()  # the TLS layer closes the connection

    async def _run(self) -> None:
        accept = self._accept
        sock, self._sock = self._sock, None
        assert sock is not None
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: accept.make_protocol(self.over),
                sock,
                ssl=accept.context,
                **accept.options,
            )
        except OSError:  # failed (ssl.SSLError), timed out, or cut by the client
            # The TLS layer has closed the connection. (Aborted at shutdown: cancelled.)
            accept.failed(self._peer)
        finally:
            self.over()
