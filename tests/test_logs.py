"""The log's set-up: JSON lines, timestamps in the configured time zone."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sys
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import orjson
import pytest
import structlog

from receiver.config import ConfigError, load_config
from receiver.logs import TimeStamper, configure_logging


def logged(capsys) -> list[dict]:
    return [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize(
    ("zone", "offset"), [("UTC", timedelta(0)), ("Asia/Shanghai", timedelta(hours=8))]
)
def test_timestamps_in_the_configured_zone(capsys, restore_logging, zone, offset):
    configure_logging("info", "json", zone)
    before = datetime.now(timezone.utc)
    structlog.get_logger("test").info("ours")
    logging.getLogger("uvicorn.error").info("the standard library's")
    after = datetime.now(timezone.utc)
    lines = logged(capsys)
    assert [line["event"] for line in lines] == ["ours", "the standard library's"]
    for line in lines:
        stamp = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
        assert stamp.utcoffset() == offset
        assert before <= stamp <= after  # to the microsecond, the time of the line
    if zone == "UTC":
        assert lines[0]["timestamp"].endswith("Z")  # as before: UTC written with a Z


def test_timestamps_across_seconds_and_a_change_of_offset(monkeypatch):
    # Each second's date, time and offset are kept for the lines of that second: a line
    # in the next one, or past the end of summer time, is stamped anew.
    zone = ZoneInfo("Europe/Berlin")
    stamper = TimeStamper(zone)
    moments = [
        datetime(2026, 10, 25, 0, 59, 59, 999_998, tzinfo=timezone.utc),  # +02:00 still
        datetime(2026, 10, 25, 1, 0, 0, 1, tzinfo=timezone.utc),  # +01:00 since 01:00 UTC
        datetime(2026, 10, 25, 1, 0, 0, 500_000, tzinfo=timezone.utc),
    ]
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    for moment in moments:
        nanoseconds = (moment - epoch) // timedelta(microseconds=1) * 1000
        monkeypatch.setattr(time, "time_ns", lambda: nanoseconds)  # noqa: B023
        stamp = datetime.fromisoformat(stamper(None, "info", {})["timestamp"])
        assert stamp == moment
        assert stamp.utcoffset() == moment.astimezone(zone).utcoffset()


def test_an_unknown_zone_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("CI_RECEIVER_CONFIG", raising=False)
    monkeypatch.setenv("CI_RECEIVER_LOG__TIMEZONE", "Mars/Olympus")
    with pytest.raises(ConfigError, match=r"log\.timezone: unknown time zone 'Mars/Olympus'"):
        load_config(None)


def test_lines_of_one_turn_of_the_loop_reach_the_stream_together(monkeypatch, restore_logging):
    reading, writing = os.pipe()
    os.set_blocking(reading, False)
    # Unbuffered, as Python runs in containers (PYTHONUNBUFFERED): every write a write.
    stream = io.TextIOWrapper(open(writing, "wb", buffering=0), write_through=True)  # noqa: SIM115
    monkeypatch.setattr(sys, "stdout", stream)

    def arrived() -> list[str]:
        try:
            return [orjson.loads(line)["event"] for line in os.read(reading, 1 << 16).splitlines()]
        except BlockingIOError:
            return []

    try:
        configure_logging("info", "json")
        log = structlog.get_logger("test")

        async def a_turn() -> tuple[list[str], list[str]]:
            log.info("request")
            log.info("event")
            during = arrived()  # the turn is not over: nothing written yet
            await asyncio.sleep(0)
            return during, arrived()

        during, after = asyncio.run(a_turn())
        assert during == []
        assert after == ["request", "event"]
        log.info("outside a loop")  # no turn to wait for: written at once
        assert arrived() == ["outside a loop"]

        async def beside_the_standard_library() -> None:
            log.info("ours first")
            logging.getLogger("uvicorn.error").info("then the standard library's")

        asyncio.run(beside_the_standard_library())
        assert arrived() == ["ours first", "then the standard library's"]
    finally:
        stream.close()
        os.close(reading)


def test_a_turn_of_many_lines_is_written_in_whole_lines_no_write_past_pipe_buf():
    from receiver.logs import ATOMIC_WRITE_BYTES, _writes

    lines = ["x" * 1000, "é" * 600, "y" * 5000, "z" * 10, "w" * 3000]
    writes = list(_writes(lines))
    assert "".join(writes) == "".join(line + "\n" for line in lines)
    assert all(text.endswith("\n") for text in writes)
    # Only a line longer than PIPE_BUF on its own makes a longer write.
    assert [len(text.encode()) <= ATOMIC_WRITE_BYTES for text in writes] == [True, False, True]


def test_each_level_method_writes_what_structlogs_own_writes(capsys, restore_logging):
    """The configured logger runs the processor chain itself (receiver.logs): every line
    is the one structlog's filtering logger writes for the same call, levels below the
    configured one write nothing, and %-style arguments are interpolated."""
    configure_logging("info", "json")
    config = structlog.get_config()
    ours = structlog.get_logger("same").bind(job="j1")
    theirs = structlog.wrap_logger(
        config["logger_factory"]("same"),
        processors=config["processors"],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    ).bind(job="j1")
    assert type(ours) is not type(theirs)
    structlog.contextvars.bind_contextvars(request_id="r1")

    def calls(logger) -> None:
        logger.debug("hidden", n=0)
        logger.info("plain", n=1, items=[1, "a"])
        logger.warning("warned %s of %d", "one", 2, n=2)
        logger.warn("alias")
        logger.error("failed", n=3)
        logger.critical("critical")
        logger.msg("a msg")
        logger.log(logging.INFO, "by level %s", "info")
        logger.log(logging.DEBUG, "hidden by level")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("caught", n=4)

    try:
        calls(ours)
        sys.stdout.flush()
        mine = logged(capsys)
        calls(theirs)
        sys.stdout.flush()
        reference = logged(capsys)
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    for line in mine + reference:
        del line["timestamp"]
    assert [line["event"] for line in mine] == [
        "plain",
        "warned one of 2",
        "alias",
        "failed",
        "critical",
        "a msg",
        "by level info",
        "caught",
    ]
    assert mine == reference
    assert mine[0] == {
        "event": "plain",
        "n": 1,
        "items": [1, "a"],
        "job": "j1",
        "request_id": "r1",
        "level": "info",
        "logger": "same",
    }
    assert "ValueError: boom" in mine[-1]["exception"]
