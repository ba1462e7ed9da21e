"""The Pulsar C++ library's own log, brought into the structured log.

The library logs on its own threads. Handing it a Python `logging.Logger` makes those
threads call into Python, which can deadlock against nacks from other threads and hang
interpreter exit (apache/pulsar-client-python#116); its console logger writes plain
text into the JSON lines on stdout. So the library writes with its file logger into a
named pipe, never touching Python, and a thread of ours reads the lines and logs each
as a structured line of the logger `pulsar` (level, message, source), URLs' secrets
masked. `client_log_level = "off"` sends the library's lines nowhere.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import threading
from typing import IO, Any

import pulsar
import structlog

from receiver.masking import Masker

logger = structlog.get_logger("pulsar")

CLIENT_LOG_LEVELS = {
    "debug": pulsar.LoggerLevel.Debug,
    "info": pulsar.LoggerLevel.Info,
    "warn": pulsar.LoggerLevel.Warn,
    "error": pulsar.LoggerLevel.Error,
}
# "2021-03-24 17:35:46.571 INFO  [0x10a951e00] ConnectionPool:85 | Created connection ..."
# (the console logger adds the zone's offset after the time).
_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[.,]\d+(?: [+-]\d{4})? (?P<level>DEBUG|INFO|WARN|ERROR)"
    r"\s+\[[^\]]*\] (?P<source>\S+) \| (?P<message>.*)$"
)
_METHODS = {"DEBUG": "debug", "INFO": "info", "WARN": "warning", "ERROR": "error"}
_mask_urls = Masker()


def client_logger(level: str) -> Any:
    """The `logger=` for `pulsar.Client` at this level (`debug` .. `error`, or `off`)."""
    if level == "off":
        return pulsar.FileLogger(pulsar.LoggerLevel.Error, os.devnull)
    pipe = _shared_pipe()
    if pipe is None:  # no named pipes here (Windows): the library's own console output
        return pulsar.ConsoleLogger(CLIENT_LOG_LEVELS[level])
    return pulsar.FileLogger(CLIENT_LOG_LEVELS[level], pipe.path)


def forward(line: str) -> None:
    """Log one line of the library's as a structured one."""
    match = _LINE.match(line)
    if match is None:  # a continuation or a line of another shape: keep it as it is
        logger.info(_mask_urls(line))
        return
    log = getattr(logger, _METHODS[match["level"]])
    log(_mask_urls(match["message"]), source=match["source"])


class _Pipe:
    """A named pipe in a private folder, and the thread that reads it, for the process."""

    def __init__(self) -> None:
        folder = tempfile.mkdtemp(prefix="ci-receiver-pulsar-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        self.path = os.path.join(folder, "client.log")
        os.mkfifo(self.path, 0o600)
        # Opened for reading first, so that the library's open for writing does not block;
        # our own write end keeps the pipe open between clients (no end of file).
        reading = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._keep_open = os.open(self.path, os.O_WRONLY)
        os.set_blocking(reading, True)
        self._lines: IO[bytes] = os.fdopen(reading, "rb")
        threading.Thread(target=self._forward_all, name="pulsar-client-log", daemon=True).start()

    def _forward_all(self) -> None:
        for raw in self._lines:
            try:
                forward(raw.decode(errors="replace").rstrip("\r\n"))
            except Exception:  # never let one odd line end the reading
                continue


_pipe: _Pipe | None = None
_pipe_lock = threading.Lock()


def _shared_pipe() -> _Pipe | None:
    global _pipe
    if not hasattr(os, "mkfifo"):
        return None
    with _pipe_lock:
        if _pipe is None:
            _pipe = _Pipe()
        return _pipe
