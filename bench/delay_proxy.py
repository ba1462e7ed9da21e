"""A TCP proxy on loopback that holds every chunk RTT/2 in each direction (this kernel
has no netem), and counts the round trips made through it.

    with DelayProxy(("127.0.0.1", 5432), rtt_ms=1) as proxy:
        ... connect to 127.0.0.1:proxy.port ...
        proxy.round_trips

Threads, not an event loop: asyncio's timers (uvloop's too) round to the millisecond
on epoll, which would turn a 1 ms RTT into 2. Each direction of a connection has a
reader, which stamps a chunk with the moment it is due, and a writer, which sleeps
until then (less the machine's wake-up latency, measured when the proxy starts; with a
1 µs timer slack instead of Linux's default 50 µs) and sends:
chunks leave in the order they came, each RTT/2 late. At RTT 0 the reader sends at
once, a counting pass-through.

A round trip, per connection: the first client chunk, and every client chunk that
arrives after the server has sent something since the previous client chunk (the
client waited for an answer, or at least got one, before writing again).

    python -m bench.delay_proxy [--rtt 1]

measures it: a ping-pong of one byte through the proxy to an echo server, next to the
same without it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import queue
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator

from sqlalchemy import make_url

_PR_SET_TIMERSLACK = 29


def _precise_sleeps() -> None:
    """This thread's sleeps are not stretched to batch wake-ups (Linux's default timer
    slack lets them end up to 50 µs late)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)


def _wake_up_latency() -> float:
    """How late a precise sleep of this machine ends (s), the median of a few: a writer
    sleeps that much less, so that chunks leave when due rather than that much after."""
    lates: list[float] = []

    def measure() -> None:
        _precise_sleeps()
        for _ in range(50):
            began = time.perf_counter()
            time.sleep(0.0002)
            lates.append(time.perf_counter() - began - 0.0002)

    thread = threading.Thread(target=measure)
    thread.start()
    thread.join()
    return statistics.median(lates)


class DelayProxy:
    def __init__(self, upstream: tuple[str, int], rtt_ms: float) -> None:
        self.upstream = upstream
        self.delay = rtt_ms / 2000
        self._late = _wake_up_latency() if self.delay else 0.0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._round_trips = 0
        self._sockets: set[socket.socket] = set()
        # The proxy's own ends toward the server: PostgreSQL knows a backend's client by
        # these ports (pg_stat_activity.client_port).
        self.upstream_ports: set[int] = set()

    @property
    def round_trips(self) -> int:
        with self._lock:
            return self._round_trips

    def __enter__(self) -> DelayProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self._listener.close()
        with self._lock:
            ends = list(self._sockets)
        for end in ends:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed by __exit__
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            for end in (client, server):
                end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets.update((client, server))
                self.upstream_ports.add(server.getsockname()[1])
            _Connection(self, client, server).start()

    def _count(self) -> None:
        with self._lock:
            self._round_trips += 1

    def _forget(self, *ends: socket.socket) -> None:
        with self._lock:
            self._sockets.difference_update(ends)
        for end in ends:
            end.close()


class _Connection:
    def __init__(self, proxy: DelayProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        # True at first, so that the connection's first client chunk counts.
        self.server_spoke = True
        self.directions_open = 2
        self.lock = threading.Lock()

    def start(self) -> None:
        self._direction(self.client, self.server, self._client_chunk)
        self._direction(self.server, self.client, self._server_chunk)

    def _client_chunk(self) -> None:
        if self.server_spoke:
            self.server_spoke = False
            self.proxy._count()

    def _server_chunk(self) -> None:
        self.server_spoke = True

    def _direction(
        self, source: socket.socket, target: socket.socket, seen: Callable[[], None]
    ) -> None:
        delay, late = self.proxy.delay, self.proxy._late
        chunks: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()

        def read() -> None:
            with contextlib.suppress(OSError):
                while data := source.recv(65536):
                    seen()
                    if delay:
                        chunks.put((time.perf_counter() + delay, data))
                    else:
                        target.sendall(data)
            if delay:
                chunks.put(None)
            else:
                self._closed(target)

        def write() -> None:
            _precise_sleeps()
            with contextlib.suppress(OSError):
                while (chunk := chunks.get()) is not None:
                    due, data = chunk
                    if (wait := due - time.perf_counter() - late) > 0:
                        time.sleep(wait)
                    target.sendall(data)
            self._closed(target)

        threading.Thread(target=read, daemon=True).start()
        if delay:
            threading.Thread(target=write, daemon=True).start()

    def _closed(self, target: socket.socket) -> None:
        """One direction is done: pass the end on, and close both ends after the other."""
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)
        with self.lock:
            self.directions_open -= 1
            last = self.directions_open == 0
        if last:
            self.proxy._forget(self.client, self.server)


def ping_pong(port: int, count: int) -> list[float]:
    """Round-trip times (ms) of one byte to the echo at `port`."""
    times = []
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            began = time.perf_counter()
            connection.sendall(b"x")
            connection.recv(1)
            times.append((time.perf_counter() - began) * 1000)
    return times


def _echo(listener: socket.socket) -> None:
    connection, _ = listener.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with connection:
        while data := connection.recv(65536):
            connection.sendall(data)


@contextlib.contextmanager
def database_behind(url: str, rtt_ms: float | None) -> Iterator[tuple[str, DelayProxy | None]]:
    """The database at `url` as a client reaches it: directly (`rtt_ms` None), or through
    a DelayProxy at that RTT (its URL then names the proxy)."""
    if rtt_ms is None:
        yield url, None
        return
    parsed = make_url(url)
    with DelayProxy((parsed.host or "127.0.0.1", parsed.port or 5432), rtt_ms) as proxy:
        through = parsed.set(host="127.0.0.1", port=proxy.port)
        yield through.render_as_string(hide_password=False), proxy


def main() -> None:
    parser = argparse.ArgumentParser(description="RTT through the delay proxy, measured")
    parser.add_argument("--rtt", type=float, default=1.0, help="ms")
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    listener = socket.create_server(("127.0.0.1", 0))
    echo_port = listener.getsockname()[1]
    threading.Thread(target=_echo, args=(listener,), daemon=True).start()
    direct = ping_pong(echo_port, args.count)
    threading.Thread(target=_echo, args=(listener,), daemon=True).start()
    with DelayProxy(("127.0.0.1", echo_port), args.rtt) as proxy:
        proxied = ping_pong(proxy.port, args.count)
        round_trips = proxy.round_trips
    for name, times in (("direct", direct), (f"proxy at {args.rtt:g} ms", proxied)):
        cuts = statistics.quantiles(times, n=100)
        print(
            f"{name:>16}: median {statistics.median(times):.3f} ms, p1 {cuts[0]:.3f},"
            f" p99 {cuts[98]:.3f}, min {min(times):.3f}"
        )
    print(f"{round_trips} round trips counted for {args.count} ping-pongs")


if __name__ == "__main__":
    main()
