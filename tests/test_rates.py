"""Rate limits written and counted (receiver/rates.py): the log of recent starts, taken
from and given back to, without a database."""

from __future__ import annotations

import orjson
import pytest

from receiver.rates import RateLimit, limits, parse_rate, take


@pytest.mark.parametrize(
    ("text", "count", "seconds"),
    [
        ("20/min", 20, 60),
        ("5/s", 5, 1),
        ("5 / second", 5, 1),
        ("100/minute", 100, 60),
        ("1000/h", 1000, 3600),
        ("30/10s", 30, 10),
        ("2/2mins", 2, 120),
        ("3/hours", 3, 3600),
        ("4/secs", 4, 1),
        ("7/DAY", 7, 86400),
    ],
)
def test_rates_are_read(text, count, seconds):
    assert parse_rate(text) == RateLimit(count, seconds)


@pytest.mark.parametrize(
    "text", ["20", "20 per min", "0/min", "5/0s", "5/fortnight", "-1/s", "1/ms", "1/hs", "1/ds"]
)
def test_a_rate_that_cannot_be_read_is_named(text):
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def test_the_config_overrides_the_default_and_off_turns_it_off():
    assert limits(None, ["100/min", "5/s"]) == [RateLimit(100, 60), RateLimit(5, 1)]
    assert limits("20/min", ["100/min"]) == [RateLimit(20, 60)]
    assert limits("off", ["100/min"]) == []
    assert limits([], ["100/min"]) == []


def test_no_window_holds_more_starts_than_the_rate():
    rules = [RateLimit(3, 10)]
    log, turns = take(None, 100.0, 5, rules)
    assert (turns.granted, turns.wait) == (3, 10.0)
    log, turns = take(log, 105.0, 2, rules)
    assert (turns.granted, turns.wait) == (0, 5.0)
    log, turns = take(log, 110.5, 2, rules)  # the three of 100.0 have left the window
    assert turns.granted == 2
    assert orjson.loads(log) == [110.5, 110.5]


def test_every_rule_holds():
    rules = [RateLimit(100, 60), RateLimit(5, 1)]
    log, turns = take(None, 0.0, 8, rules)
    assert (turns.granted, turns.wait) == (5, 1.0)
    log = None
    for second in range(20):
        log, turns = take(log, float(second), 5, rules)
    assert turns.granted == 5
    log, turns = take(log, 20.0, 5, rules)
    assert turns.granted == 0  # 100 in the last minute
    assert turns.wait == pytest.approx(40.0)  # when the five of second 0 leave it


def test_a_clock_set_back_does_not_hold_the_handler():
    rules = [RateLimit(20, 60)]
    log = None
    for _ in range(20):
        log, _ = take(log, 7200.0, 1, rules)
    _, turns = take(log, 3600.0, 1, rules)  # the clock an hour back
    assert turns.granted == 1


@pytest.mark.parametrize("log", ["not json", '{"a": 1}', '["x", null, 1e999]', ""])
def test_a_log_that_cannot_be_read_counts_as_empty(log):
    _, turns = take(log, 10.0, 1, [RateLimit(1, 60)])
    assert turns.granted == 1


@pytest.mark.parametrize("text", ["20/min", "5/s", "30/10s", "2/2min", "1000/h", "7/d", "9/90s"])
def test_a_rate_is_shown_as_it_is_written(text):
    assert str(parse_rate(text)) == text
