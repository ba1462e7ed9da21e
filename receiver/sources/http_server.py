"""The HTTP server under the apps: uvicorn's httptools protocol, with the bounds a public
endpoint needs that uvicorn does not have.

uvicorn (with httptools) keeps no limit on the request head, no header or body read
timeout, no cap on open connections apart from requests, and closes a connection with
unread request bytes at once, which makes the kernel answer with a reset that can
overtake the response. `BoundedHttpProtocol` adds, per connection and without a timer per
request (one loop timer per connection, moved only when a deadline comes closer):

- the request line and headers are limited in bytes and count: past either, `431` and the
  connection is closed, before any byte of the body is read;
- the head must arrive within `header_timeout`, the body within `body_timeout` of the
  end of the head; an idle keep-alive connection is closed after `keepalive_timeout`;
- at most `max_connections` are open (one more is answered `503` + `Retry-After` and
  closed) and at most `max_requests` are in the app (`503` + `Retry-After`), a safety
  net: what bounds the callbacks in progress is their memory
  (receiver/sources/admission.py);
- requests pipelined behind one in the app are bounded: at most `MAX_PIPELINED` read
  ahead, and `max_header_bytes` of what arrives while it is in the app; past either the
  connection is closed (no sender of callbacks pipelines; a flood of tiny requests in one
  read would otherwise queue without end). A request read ahead gets the deadlines of
  its head and body as any other;
- a connection closed with request bytes still coming (a body refused early, `413`)
  closes gracefully: our side of the connection is shut after the response, and what the
  client still sends is read and dropped for up to `LINGER_SECONDS`, so that the client
  reads its answer instead of a reset ("lingering close", as Apache and nginx do).

With TLS (`[http] tls_cert`, receiver/sources/tls.py) the listener accepts plain TCP and
each connection takes its handshake on its own (receiver/sources/tls_accept.py): it counts
against `max_connections` from its accept, as a plain one does (past the connections held
it is closed at once, before any handshake), until its handshake fails or times out
(uncounted then, at once) or succeeds and the protocol sees it. The handshake gets
`header_timeout`, and the head's deadline runs from the accept, so that the handshake and
the head together get `header_timeout`. Shutdown aborts the handshakes in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import time
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
import structlog
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from receiver.metrics import Metrics
from receiver.sources.listen import LISTEN_BACKLOG, start_listening
from receiver.sources.tls import TlsCertificate
from receiver.sources.tls_accept import Peer, TlsAccept

logger = structlog.get_logger("ci_receiver.sources.http_server")

# What a refused connection may still send us before it is closed regardless.
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 * 1024 * 1024
# Descriptors kept for everything that is not a client connection: the inbox, handler
# connections, log files, the broker client... (a quarter of a small limit).
RESERVED_FDS = 256
# The most connections taken when `http.max_connections` is unset, whatever descriptors
# are left (a container's limit is often 1,048,576): each open connection holds some
# memory (its buffers, parser and, once it has sent a request, its task), so what a
# burst of senders can open at once stays within a small VM.
MOST_CONNECTIONS = 10_000
# Fewer connections than this for lack of descriptors is worth a warning: a burst of
# callbacks could be refused.
FEW_CONNECTIONS = 1000
# Descriptors are shared out so that a tenth more connections than are served can be
# refused; past the connections served, as many again (at least MIN_REFUSALS) are still
# answered 503, each for at most LINGER_SECONDS, and only past those is a connection
# closed without a word. Without a limit of descriptors (the admin listener): a tenth
# more.
REFUSING_FRACTION = 10
MIN_REFUSALS = 1000
# A refusal of one kind is logged at most this often (with the count since the last).
LOG_EVERY_SECONDS = 10.0

# Requests read ahead of the one in the app (pipelined) at most.
MAX_PIPELINED = 16

# Connection phases: what the connection's deadline is about.
_HEAD, _BODY, _APP, _IDLE, _LINGER = "head", "body", "app", "idle", "linger"


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 5.0
    max_connections: int = 1000
    max_requests: int = 128
    # Connections held at all: past max_connections, up to this many are still answered
    # 503 (then closed); past it, closed without a word. None: a tenth more.
    max_open: int | None = None


class Guard:
    """What the connections of one server share: the limits, and the counting and logging
    of what they refuse (a flood of refusals must not become a flood of log lines)."""

    def __init__(self, name: str, limits: ServerLimits, metrics: Metrics | None) -> None:
        self.name = name
        self.limits = limits
        self.refusing_limit = limits.max_open or limits.max_connections + max(
            16, limits.max_connections // REFUSING_FRACTION
        )
        self._metrics = metrics
        self._logged: dict[str, tuple[float, int]] = {}
        # The TLS connections accepted whose handshake is not over (a `TlsAccept`, once
        # the server listens over TLS): open connections as much as those served.
        self.handshakes: Sized = ()

    def open_connections(self, served: int) -> int:
        """The connections open, `served` (uvicorn's) and those in their handshake."""
        return served + len(self.handshakes)

    def holds(self, open_connections: int, client: Peer) -> bool:
        """Whether a connection, one of `open_connections`, is held (served, or answered
        503); if not, it is counted as refused and is to be closed without a word."""
        if open_connections <= self.refusing_limit:
            return True
        self.refused("too_many_connections", client)
        return False

    def refused(self, reason: str, client: Peer) -> None:
        if self._metrics is not None:
            self._metrics.series(self._metrics.http_refused, self.name, reason).inc()
        now = time.monotonic()
        last, suppressed = self._logged.get(reason, (0.0, 0))
        if now - last < LOG_EVERY_SECONDS:
            self._logged[reason] = (last, suppressed + 1)
            return
        self._logged[reason] = (now, 0)
        logger.warning(
            "http request refused",
            server=self.name,
            reason=reason,
            client=client[0] if client else None,
            more_since_last_logged=suppressed,
        )


class _TooManyPipelined(Exception):
    pass


class _HeadTooLarge(Exception):
    pass


class _ResponseWriter:
    """The transport as a request cycle sees it: `close()` becomes a lingering close, and
    the response head is held back until the body's first write (or, should none come
    in this turn of the loop, the end of the turn), so that a response goes out in one
    system call and one segment, not two: on loopback each write also runs the
    receiving side's TCP work and wakes its reader (`python -m bench.http`)."""

    __slots__ = ("_close", "_cycle", "_held", "_loop", "_transport", "is_closing")

    def __init__(
        self,
        transport: asyncio.Transport,
        close: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._transport = transport
        self.is_closing = transport.is_closing
        self._close = close
        self._loop = loop
        # The request whose head is to be held, until it is written: its state tells a
        # head from a `100 Continue`. A request pipelined behind it takes its place, and
        # the one before then writes straight through (the order of bytes never changes:
        # whatever is held goes out before any later write).
        self._cycle: RequestResponseCycle | None = None
        self._held: bytes | None = None

    def expect_head(self, cycle: RequestResponseCycle) -> None:
        self._cycle = cycle

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
            return
        cycle = self._cycle
        if cycle is not None and cycle.response_started:
            self._cycle = None
            self._held = data
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._close()


def error_response(
    status: int, reason: str, detail: str, *, retry_after: int | None = None
) -> bytes:
    """A complete `Connection: close` response with the apps' JSON error body."""
    body = orjson.dumps({"error": reason, "detail": detail})
    head = [
        STATUS_LINE[status],
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n",
    ]
    if retry_after is not None:
        head.append(b"retry-after: %d\r\n" % retry_after)
    return b"".join([*head, b"\r\n", body])


async def _busy(scope: Scope, receive: Receive, send: Send) -> None:
    """The app for a request over `max_requests`: it leaves the body unread."""
    body = orjson.dumps({"error": "busy", "detail": "too many requests in progress; send again"})
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
                (b"retry-after", b"1"),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits, deadlines and a lingering close."""

    def __init__(
        self,
        config: BoundedConfig,
        *args: Any,
        handshake_over: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        """`handshake_over`: over TLS, what uncounts the connection's handshake (it is
        counted as served from `connection_made` on)."""
        super().__init__(config, *args, **kwargs)
        self.guard = config.guard
        self._limits = config.guard.limits
        self._app = self.app
        self._phase = _HEAD
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._head_bytes = 0  # bytes received while the head was incomplete
        self._ahead = 0  # bytes received while a request was in the app
        self._header_bytes = 0  # of the headers parsed so far, exactly
        self._lingered = 0
        self._writer: _ResponseWriter | None = None
        # Made when the connection is accepted: over TLS, before the handshake.
        self._accepted_at = self.loop.time()
        self._handshake_over = handshake_over

    # --- connection ------------------------------------------------------------------

    # Ignored, override: asyncio.Protocol's takes any BaseTransport; a TCP server's is a
    # Transport, as uvicorn's own override (which carries the same ignore) says.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self._handshake_over is not None:
            self._handshake_over()
        super().connection_made(transport)
        self._writer = _ResponseWriter(transport, self._close_after_response, self.loop)
        open_connections = self.guard.open_connections(len(self.connections))
        if open_connections > self._limits.max_connections:
            if not self.guard.holds(open_connections, self.client):
                transport.abort()
                return
            self.guard.refused("too_many_connections", self.client)
            self._answer_and_close(
                error_response(503, "busy", "too many connections; send again", retry_after=1)
            )
            return
        self._set_deadline(_HEAD, self._accepted_at + self._limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase is _LINGER:
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
                self.transport.close()
            return
        if phase is _HEAD or phase is _IDLE:
            # Counted before parsing: httptools gathers a header's value whole before
            # calling on_header, so a huge one is caught here, while it arrives.
            self._head_bytes += len(data)
        elif phase is _APP:  # pipelined behind the request in the app
            self._ahead += len(data)
            if self._ahead > self._limits.max_header_bytes:
                self._refuse_pipelined("pipelined_too_much")
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._refuse_head()
            elif isinstance(exc.__context__, _TooManyPipelined):
                self._refuse_pipelined("too_many_pipelined")
            else:
                self._bad_request()
        except httptools.HttpParserUpgrade:
            pass  # no upgrade is served: the request goes on as a plain one
        except httptools.HttpParserError:
            self._bad_request()
        else:
            # _IDLE too: a head begun behind the last request goes on after its answer.
            phase = self._phase
            if (phase is _HEAD or phase is _IDLE) and (
                self._head_bytes > self._limits.max_header_bytes
            ):
                self._refuse_head()

    # --- parser callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        if self._phase is _IDLE:
            self._set_deadline(_HEAD, self.loop.time() + self._limits.header_timeout)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        limits = self._limits
        if (
            self._header_bytes + len(self.url) > limits.max_header_bytes
            or len(self.headers) > limits.max_headers
        ):
            raise _HeadTooLarge
        if len(self.pipeline) >= MAX_PIPELINED:
            raise _TooManyPipelined
        if len(self.tasks) >= limits.max_requests:
            self.guard.refused("too_many_requests", self.client)
            self.app = _busy
        else:
            self.app = self._app
        super().on_headers_complete()
        assert self._writer is not None
        self._writer.expect_head(self.cycle)
        # Ignored, assignment: the writer stands in for the transport with what the
        # request cycle calls on it (write, close, is_closing), not a whole Transport.
        self.cycle.transport = self._writer  # type: ignore[assignment]
        # _IDLE: a head begun behind the last request, completed after its answer.
        if self._phase is _HEAD or self._phase is _IDLE:
            self._set_deadline(_BODY, self.loop.time() + limits.body_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._phase is _BODY:
            self._phase = _APP

    def on_response_complete(self) -> None:
        # uvicorn's, with the keep-alive wait on the connection's own deadline instead of
        # a timer per response, and a lingering close when the body was left unread.
        self.server_state.total_requests += 1
        if self.transport.is_closing() or self._phase is _LINGER:
            return
        self._ahead = 0
        if self.pipeline:
            self.flow.resume_reading()
            cycle, app = self.pipeline.pop()
            # Its body may still be coming: then it has the body's deadline, as any.
            if cycle.more_body:
                self._set_deadline(_BODY, self.loop.time() + self._limits.body_timeout)
            self._start_asgi_task(cycle, app)
            return
        if self.cycle.more_body:  # answered before the whole body came: close
            self._linger()
            return
        self.flow.resume_reading()
        self._head_bytes = 0
        self._set_deadline(_IDLE, self.loop.time() + self._limits.keepalive_timeout)

    # --- deadlines -------------------------------------------------------------------

    def _set_deadline(self, phase: str, deadline: float) -> None:
        self._phase = phase
        self._deadline = deadline
        # One timer per connection: moved only when the new deadline comes before it.
        # A later deadline is found by the timer when it fires, and it re-arms itself.
        if self._timer is None or deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_deadline)
            self._timer_at = deadline

    def _on_deadline(self) -> None:
        self._timer = None
        phase = self._phase
        if phase is _APP or self.transport.is_closing():
            return  # the app's time is bounded by graceful shutdown, not here
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._on_deadline)
            self._timer_at = self._deadline
            return
        if phase is _IDLE or phase is _LINGER:
            self.transport.close()
        elif phase is _HEAD:
            if self._head_bytes == 0:  # connected and said nothing
                self.guard.refused("idle_connection", self.client)
                self.transport.close()
                return
            self.guard.refused("header_timeout", self.client)
            self._answer_and_close(error_response(408, "timeout", "the request head took too long"))
        elif phase is _BODY:
            self.guard.refused("body_timeout", self.client)
            if self.cycle.response_started:
                self.transport.close()
            else:  # the app reads the end of the request, and its answer goes nowhere
                self._answer_and_close(
                    error_response(408, "timeout", "the request body took too long")
                )

    # --- refusing and closing --------------------------------------------------------

    def _refuse_pipelined(self, reason: str) -> None:
        """More requests pipelined than served: the connection ends (what is answered
        by then is sent first). No sender of callbacks pipelines."""
        self.guard.refused(reason, self.client)
        self.transport.close()

    def _refuse_head(self) -> None:
        self.guard.refused("headers_too_large", self.client)
        limits = self._limits
        self._answer_and_close(
            error_response(
                431,
                "headers_too_large",
                f"the request line and headers are limited to {limits.max_header_bytes}"
                f" bytes and {limits.max_headers} headers",
            )
        )

    def _bad_request(self) -> None:
        self.guard.refused("bad_request", self.client)
        self._answer_and_close(error_response(400, "bad_request", "invalid HTTP request"))

    def _answer_and_close(self, response: bytes) -> None:
        """Answer for the server itself (a request the app never saw), then close. A
        request of this connection still in the app (pipelined before this one) gets its
        answer nowhere."""
        for cycle in (self.cycle, *(cycle for cycle, _ in self.pipeline)):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self.pipeline.clear()
        if self._writer is not None:  # an earlier response's head still held
            self._writer.flush()
        self.transport.write(response)
        self._linger()

    def _close_after_response(self) -> None:
        """What a request cycle's `transport.close()` does (`Connection: close`)."""
        if self._phase is _LINGER:
            return
        if self.cycle is not None and self.cycle.more_body:
            self._linger()
        else:
            self.transport.close()

    def _linger(self) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        self._phase = _LINGER
        self.flow.resume_reading()
        # Our side ends here (FIN after the response); reading goes on, and the client's
        # own FIN, or the deadline, closes. Over TLS the transport cannot half-close (a
        # FIN under the TLS stream would cut it short, and close_notify ends both ways):
        # the response is followed by nothing until the deadline or the client closes.
        if transport.can_write_eof():
            transport.write_eof()
        self._set_deadline(_LINGER, self.loop.time() + LINGER_SECONDS)


class BoundedConfig(uvicorn.Config):
    """uvicorn's Config, carrying the Guard its connections share."""

    def __init__(
        self, app: ASGIApp, *, guard: Guard, tls: TlsCertificate | None = None, **kwargs: Any
    ) -> None:
        super().__init__(
            app,
            http=BoundedHttpProtocol,
            ws="none",
            lifespan="off",
            access_log=False,
            log_config=None,
            server_header=False,
            date_header=True,
            # uvicorn listens on the socket it is given again, with this backlog.
            backlog=LISTEN_BACKLOG,
            **kwargs,
        )
        self.guard = guard
        self.tls = tls


class Server(uvicorn.Server):
    """uvicorn, minus its own signal handling (the runner owns the signals), telling
    when it listens."""

    on_started: Callable[[Server], None] = staticmethod(lambda server: None)
    # Over TLS: the connections in their handshake, which uvicorn does not see.
    tls_accept: TlsAccept | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's, on the sockets given (the only way it is started here), with TLS
        as `BoundedConfig.tls` says: uvicorn's own TLS settings would leave the handshake
        60 s and the closing handshake 30 s, take its certificate once, and keep the
        connections in their handshake out of sight (receiver/sources/tls_accept.py)."""
        assert sockets is not None
        config = self.config
        assert isinstance(config, BoundedConfig)
        guard = config.guard
        loop = asyncio.get_running_loop()

        def create_protocol(
            handshake_over: Callable[[], None] | None = None,
        ) -> BoundedHttpProtocol:
            return BoundedHttpProtocol(
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                handshake_over=handshake_over,
            )

        def admit(peer: Peer) -> bool:
            return guard.holds(guard.open_connections(len(self.server_state.connections)), peer)

        accept_connection: Callable[[], asyncio.Protocol] = create_protocol
        if config.tls is not None:
            self.tls_accept = guard.handshakes = TlsAccept(
                config.tls.listening,
                options=_tls_options(guard.limits),
                make_protocol=create_protocol,
                admit=admit,
                failed=lambda peer: guard.refused("tls_handshake", peer),
            )
            accept_connection = self.tls_accept.acceptor
        for sock in sockets:
            start_listening(guard.name, sock, config.backlog)
        self.servers = [
            await loop.create_server(accept_connection, sock=sock, backlog=config.backlog)
            for sock in sockets
        ]
        self.started = True
        self.on_started(self)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's, the handshakes in progress aborted first: uvicorn, which asks its
        connections to end and waits for them, does not know of these, and they would
        be served once their handshake is done."""
        if self.tls_accept is not None:
            self.tls_accept.close()
        await super().shutdown(sockets)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        return host, port


def _tls_options(limits: ServerLimits) -> dict[str, float]:
    """The timeouts of a connection's TLS: the handshake within the head's time; the
    closing one (our close_notify, the client's answer) within the lingering close's."""
    return {"ssl_handshake_timeout": limits.header_timeout, "ssl_shutdown_timeout": LINGER_SECONDS}


def raise_open_files_limit() -> int:
    """Raise the soft limit on open descriptors to the hard one (logged, the first time);
    return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or hard == resource.RLIM_INFINITY:
        if not _limit_logged:
            _log_limit(soft, soft)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # pragma: no cover (a sandbox may refuse)
        logger.warning("cannot raise the open files limit", limit=soft, error=str(exc))
        return soft
    _log_limit(hard, soft)
    return hard


_limit_logged = False


def _log_limit(limit: int, before: int) -> None:
    global _limit_logged
    _limit_logged = True
    logger.info("open files limit", limit=limit, raised_from=before)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """How many connections a server takes, as its descriptors allow."""

    serve: int  # max_connections: served
    hold: int  # max_open: served, or being answered 503 (then closed)
    lowered: bool  # fewer served than configured (or than FEW_CONNECTIONS, unset)


def connection_limits(open_files: int, configured: int | None) -> ConnectionLimits:
    """The connections served: `configured`, or unset as many as fit (up to
    `MOST_CONNECTIONS`), and never more than fit in `open_files` descriptors next to the
    reserve and the refusals. Past those, as many again (at least `MIN_REFUSALS`) are
    still answered 503, as far as the descriptors last."""
    reserve = min(RESERVED_FDS, open_files // 4)
    available = max(1, open_files - reserve)
    fitting = max(1, available * REFUSING_FRACTION // (REFUSING_FRACTION + 1) - 16)
    wanted = MOST_CONNECTIONS if configured is None else configured
    serve = min(wanted, fitting)
    lowered = serve < (FEW_CONNECTIONS if configured is None else configured)
    return ConnectionLimits(serve, min(available, serve + max(MIN_REFUSALS, serve)), lowered)
