"""The log's set-up: JSON lines, timestamps in the configured time zone."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import orjson
import pytest
import structlog

from receiver.config import ConfigError, load_config
from receiver.logs import configure_logging


def logged(capsys) -> list[dict]:
    return [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize(
    ("zone", "offset"), [("UTC", timedelta(0)), ("Asia/Shanghai", timedelta(hours=8))]
)
def test_timestamps_in_the_configured_zone(capsys, restore_logging, zone, offset):
    configure_logging("info", "json", zone)
    structlog.get_logger("test").info("ours")
    logging.getLogger("uvicorn.error").info("the standard library's")
    lines = logged(capsys)
    assert [line["event"] for line in lines] == ["ours", "the standard library's"]
    for line in lines:
        stamp = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
        assert stamp.utcoffset() == offset
    if zone == "UTC":
        assert lines[0]["timestamp"].endswith("Z")  # as before: UTC written with a Z


def test_an_unknown_zone_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("CI_RECEIVER_CONFIG", raising=False)
    monkeypatch.setenv("CI_RECEIVER_LOG__TIMEZONE", "Mars/Olympus")
    with pytest.raises(ConfigError, match=r"log\.timezone: unknown time zone 'Mars/Olympus'"):
        load_config(None)
