"""structlog set-up: JSON lines in production, a readable console on a terminal.

The standard library's loggers (uvicorn, SQLAlchemy, ...) go through the same renderer,
and context bound with `structlog.contextvars` (the request id) shows in every line.
structlog's own lines are written straight to stdout, not through `logging`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone, tzinfo
from typing import IO, Any

import orjson
import structlog

from receiver import tracing
from receiver.timezones import parse_timezone


class TimeStamper:
    """`timestamp` in ISO 8601 to the microsecond, with the zone's offset
    (`2026-11-22T15:29:48.123456+08:00`; UTC written with a `Z`). The date, time and
    offset of the current second are formatted once and kept: every callback logs two
    lines, and formatting a datetime for each cost a fifth of a line (structlog's
    `TimeStamper`). Offsets change on whole seconds, so a second's offset is its own."""

    def __init__(self, zone: tzinfo) -> None:
        self.zone = zone
        # (second, its date and time, its offset), replaced whole: any thread may log.
        self._second: tuple[int, str, str] = (-1, "", "")

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        second_now, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
        second, prefix, suffix = self._second
        if second != second_now:
            second = second_now
            moment = datetime.fromtimestamp(second, self.zone)
            prefix = moment.strftime("%Y-%m-%dT%H:%M:%S")
            suffix = "Z" if self.zone is timezone.utc else moment.isoformat()[19:]
            self._second = (second, prefix, suffix)
        event["timestamp"] = f"{prefix}.{nanoseconds // 1000:06d}{suffix}"
        return event


class StaticFields:
    """Fields every line carries (a worker's number under `serve --workers`)."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.update(self.fields)
        return event


def _shared_processors(
    timezone_name: str, fields: dict[str, Any] | None = None, trace_ids: bool = False
) -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        *([StaticFields(fields)] if fields else []),
        *([tracing.add_trace_ids] if trace_ids else []),
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        TimeStamper(parse_timezone(timezone_name)),
    ]


# A write of at most PIPE_BUF bytes to a pipe is never cut by another process's; a longer
# one may be, when the pipe is full (the log collector behind): the workers of `serve
# --workers` share stdout, and their lines would interleave mid-line.
ATOMIC_WRITE_BYTES = getattr(select, "PIPE_BUF", 512)


class _TurnWriter:
    """Lines held until the end of the event loop's turn that logged them, then written
    to the stream together, in one system call (one per `ATOMIC_WRITE_BYTES` of them in a
    burst): a callback logs two lines (its request, its event), each a write of its own
    otherwise (stdout unbuffered, as containers run Python, writes every line at once). A
    line logged outside a running loop (a thread of its own, a command before or after
    its loop) is written at once, after those held, as the standard library's lines are
    (`_OrderedHandler`): the order of lines is the order they were logged. Lines held
    when the process is killed are lost: at most one turn's."""

    __slots__ = ("_held", "_lock", "_pending", "_stream")

    def __init__(self, stream: IO[str], lock: Any) -> None:
        self._stream = stream
        self._lock = lock  # the standard library's handler's, so lines never interleave
        self._held: list[str] = []
        self._pending: asyncio.AbstractEventLoop | None = None  # the loop to write on

    def write(self, line: str) -> None:
        with self._lock:
            self._held.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._pending is not loop:
            self._pending = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self._pending = None
        with self._lock:
            self.write_held()

    def write_held(self) -> None:
        """Write the lines held; under the lock."""
        if not self._held:
            return
        held, self._held = self._held, []
        # stdout gone: the caller must not fail for it
        with contextlib.suppress(OSError, ValueError):
            for text in _writes(held):
                self._stream.write(text)
                self._stream.flush()


def _writes(lines: list[str]) -> Iterator[str]:
    """`lines` as the fewest writes of whole lines each at most `ATOMIC_WRITE_BYTES` (a
    longer line alone in its own)."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        length = (len(line) if line.isascii() else len(line.encode())) + 1
        if chunk and size + length > ATOMIC_WRITE_BYTES:
            yield "\n".join(chunk) + "\n"
            chunk, size = [], 0
        chunk.append(line)
        size += length
    if chunk:
        yield "\n".join(chunk) + "\n"


class _OrderedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The standard library's lines, written after structlog's held ones."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self.turn = _TurnWriter(stream, self.lock)

    def emit(self, record: logging.LogRecord) -> None:
        self.turn.write_held()  # under self.lock, taken by handle()
        super().emit(record)

    def flush(self) -> None:
        """Also the lines held (the standard library flushes every handler at exit)."""
        self.acquire()
        try:
            self.turn.write_held()
        finally:
            self.release()
        super().flush()


class _LineWriter:
    """The end of structlog's chain: the rendered line, written with the others of the
    loop's turn (`_TurnWriter`). No LogRecord, no handler dispatch, no second formatting
    pass: the access log line of every callback costs a fraction of what it did through
    `logging` (bench/stages.py)."""

    __slots__ = ("_turn", "name")

    def __init__(self, name: str, turn: _TurnWriter) -> None:
        self.name = name  # for structlog.stdlib.add_logger_name
        self._turn = turn

    def msg(self, line: str) -> None:
        self._turn.write(line)

    debug = info = warning = warn = error = critical = exception = fatal = failure = msg


def _direct_logger_class(min_level: int) -> type[Any]:
    """structlog's filtering bound logger for `min_level`, whose enabled methods run the
    processor chain themselves. structlog's hand the event's fields on through two more
    calls, unpacking and packing them again at each: a measurable part of every line,
    two of which every callback writes (`python -m bench.stages`, docs/benchmarks.md).
    The chain, and so every line, is the same. A call with %-style arguments takes
    structlog's own method, which interpolates them."""
    base: type[Any] = structlog.make_filtering_bound_logger(min_level)

    def direct(name: str) -> Any:
        interpolating = getattr(base, name)

        def log(self: Any, event: str | None = None, *args: Any, **kw: Any) -> Any:
            if args:
                return interpolating(self, event, *args, **kw)
            event_dict: Any = self._context.copy()
            event_dict.update(kw)
            if event is not None:
                event_dict["event"] = event
            logger = self._logger
            try:
                for processor in self._processors:
                    event_dict = processor(logger, name, event_dict)
            except structlog.DropEvent:
                return None
            if isinstance(event_dict, (str, bytes, bytearray)):
                return getattr(logger, name)(event_dict)
            # What else structlog lets the last processor return, passed on as it does.
            if isinstance(event_dict, tuple):
                args, kw = event_dict
                return getattr(logger, name)(*args, **kw)
            if isinstance(event_dict, dict):
                return getattr(logger, name)(**event_dict)
            raise ValueError(f"the last log processor returned {type(event_dict).__name__}")

        log.__name__ = name
        return log

    enabled = [name for level, name in _LEVEL_NAMES.items() if level >= min_level]
    methods = {name: direct(name) for name in enabled}
    for alias, name in (("warn", "warning"), ("fatal", "critical"), ("msg", "info")):
        if name in methods:
            methods[alias] = methods[name]
    return type(f"Direct{base.__name__}", (base,), methods)


_LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    timezone_name: str = "UTC",
    fields: dict[str, Any] | None = None,
    trace_ids: bool = False,
) -> None:
    """Timestamps in `timezone_name` (UTC by default, written with a `Z`); `fields` in
    every line; `trace_ids` (tracing on): the trace and span ids of a line written in a
    span."""
    shared = _shared_processors(timezone_name, fields, trace_ids)
    console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer()
        if console
        else structlog.processors.JSONRenderer(
            serializer=lambda v, **_: orjson.dumps(v, default=str).decode()
        )
    )
    numeric = logging.getLevelName(level.upper())
    stream = sys.stdout
    # The standard library's loggers (uvicorn, SQLAlchemy, ...) through a handler whose
    # formatter runs the same processors; structlog's own loggers straight to the stream.
    handler = _OrderedHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *([] if console else [structlog.processors.format_exc_info]),
                renderer,
            ],
            foreign_pre_chain=shared,
        )
    )
    # The names structlog.stdlib.LoggerFactory gives (the caller's module when no name
    # is passed); of the `logging.Logger` it makes, only the name is used.
    names = structlog.stdlib.LoggerFactory(ignore_frame_names=[__name__])

    def line_writer(*args: Any) -> _LineWriter:
        return _LineWriter(names(*args).name, handler.turn)

    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=_direct_logger_class(numeric),
        logger_factory=line_writer,
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    for replaced in root.handlers:
        with contextlib.suppress(OSError, ValueError):  # its stream closed meanwhile
            replaced.flush()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).propagate = False
    # httpx logs every request's full URL at INFO ("HTTP Request: POST <url>") and httpcore
    # its exchanges at DEBUG; a robot's URL carries its key or token (WeCom `key=`,
    # DingTalk `access_token` and `sign`, Slack and Feishu hook paths), which must never
    # reach the logs. The handlers report their own outcomes, without the URL.
    for leaky in ("httpx", "httpcore"):
        logging.getLogger(leaky).setLevel(max(numeric, logging.WARNING))
