"""Whether the PostgreSQL inbox's server can be reached, as its connections and
statements find out.

A failure to reach it becomes `InboxUnavailable` saying where and the error (and, once
it has lasted, since when), which callers answer 503 to, nack, or retry later. However
many callers fail meanwhile (a dispatcher polling every second, every callback, every
readiness probe), a service's log says once that the database went away and once that
it came back; `ci_receiver_inbox_unreachable_total` counts the failed attempts.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from types import TracebackType
from urllib.parse import unquote, urlsplit

import asyncpg  # type: ignore[import-untyped]
import structlog
from prometheus_client import CollectorRegistry, Counter

from receiver.inbox.types import InboxUnavailable

logger = structlog.get_logger("ci_receiver.inbox")

DEFAULT_PORT = "5432"

# A server that cannot be reached, cut off, starting, stopping or full: waiting mends
# these, unlike refused credentials or a bad statement. asyncio.TimeoutError: no answer
# within the command timeout, as a network that drops packets looks.
UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)


@dataclass(frozen=True, slots=True)
class Location:
    """Where a `postgresql://` URL points, without its credentials."""

    host: str
    port: str
    database: str

    @classmethod
    def of(cls, url: str) -> Location:
        parts = urlsplit(url)
        hosts = parts.netloc.rpartition("@")[2] or "localhost"
        host, port = hosts, DEFAULT_PORT
        if "," not in hosts and not hosts.endswith("]") and ":" in hosts:
            host, _, port = hosts.rpartition(":")
        database = unquote(parts.path.lstrip("/")) or unquote(parts.username or "")
        return cls(unquote(host), port, database)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}/{self.database}"


def describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


def cannot_connect(url: str, error: BaseException) -> InboxUnavailable:
    """A command's one connection to the server failed (unreachable, or refused)."""
    return InboxUnavailable(
        f"cannot connect to PostgreSQL at {Location.of(url)}: {describe(error)}"
    )


class _QuietFloor(logging.Filter):
    """asyncpg's pool reconnects in the background to keep its floor of connections, and
    logs every failure with its traceback: while the server is away, `Reach` says so
    once instead. Other failures of it still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        floor = str(record.msg).startswith("Failed to restore the pool connection floor")
        return not (floor and isinstance(error, UNREACHABLE))


def quiet_pool_floor() -> None:
    """Install `_QuietFloor` on asyncpg's pool logger (once, however often called)."""
    logging.getLogger("asyncpg.pool").addFilter(_QUIET_FLOOR)


_QUIET_FLOOR = _QuietFloor()


class Reach:
    """`with reach: <a statement>`: a failure to reach the server is raised as
    `InboxUnavailable`, and the first one of an outage logged (with `log`); the first
    success after it ends the outage, logged too."""

    def __init__(
        self, location: Location, *, log: bool, registry: CollectorRegistry | None = None
    ) -> None:
        self.location = location
        self._log = log
        self._since: datetime | None = None  # when the outage under way began
        self._failures = 0
        self._error = ""
        self._failed = Counter(
            "ci_receiver_inbox_unreachable",
            "Connections and statements that could not reach the inbox's database.",
            registry=registry,
        )

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None:
            if self._since is not None:
                self.reached()
        elif isinstance(error, UNREACHABLE):
            raise self.failed(error) from error

    def failed(self, error: BaseException) -> InboxUnavailable:
        """Count a failure to reach the server; what to raise for it."""
        self._failed.inc()
        self._failures += 1
        self._error = describe(error)
        if self._since is None:
            self._since = datetime.now(timezone.utc)
            if self._log:
                logger.warning(
                    "PostgreSQL inbox unreachable; trying again until it answers",
                    **asdict(self.location),
                    error=self._error,
                )
            return self._unavailable(first=True)
        return self._unavailable(first=False)

    def reached(self) -> None:
        """The server answered: an outage under way is over."""
        if self._since is None:
            return
        if self._log:
            away = datetime.now(timezone.utc) - self._since
            logger.info(
                "PostgreSQL inbox reachable again",
                **asdict(self.location),
                unreachable_seconds=round(away.total_seconds(), 1),
                failed_attempts=self._failures,
            )
        self._since, self._failures = None, 0

    def unavailable(self) -> InboxUnavailable | None:
        """The outage under way, as what to raise; None when there is none."""
        return None if self._since is None else self._unavailable(first=False)

    def _unavailable(self, *, first: bool) -> InboxUnavailable:
        reason = f"PostgreSQL at {self.location} unreachable"
        if not first:
            reason += f" since {self._since:%Y-%m-%d %H:%M:%S} UTC"
        return InboxUnavailable(f"{reason}: {self._error}", since=self._since)
