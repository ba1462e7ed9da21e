"""Route matching: every key given must match; lists are any-of; key and user_data glob;
values are checked against what CI sends, and matched without regard to case."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from receiver import parse_callback
from receiver.config import Config, RouteConfig, RouteMatch
from receiver.ingest.routing import Router, changes, warnings
from tests.support.callbacks import load

SMARTCOVER = parse_callback(load("smartcover.xml"))[0]
FAILED = parse_callback(load("smartcover_failed.xml"))[0]
WORKFLOW = parse_callback(load("workflow_finish.xml"))[0]
VERDICT = parse_callback(load("moderation_video_detail.json"))[0]  # violation: Porn
SUSPECTED = parse_callback(load("moderation_image_simple_hit.json"))[0]  # suspected
NORMAL = parse_callback(load("moderation_document_detail.json"))[0]  # normal


def route(handlers: list[str], **match) -> RouteConfig:
    return RouteConfig(match=match, handlers=handlers)


@pytest.mark.parametrize(
    ("match", "event", "expected"),
    [
        ({}, SMARTCOVER, True),
        ({"tag": "SmartCover"}, SMARTCOVER, True),
        ({"tag": ["Animation", "SmartCover"]}, SMARTCOVER, True),
        ({"tag": "Animation"}, SMARTCOVER, False),
        ({"tag": "SmartCover", "state": "Failed"}, SMARTCOVER, False),
        ({"tag": "SmartCover", "state": "Failed"}, FAILED, True),
        ({"kind": "workflow"}, WORKFLOW, True),
        ({"kind": "workflow"}, SMARTCOVER, False),
        ({"event_name": "WorkflowFinish"}, WORKFLOW, True),
        ({"event_name": "ReviewVideo", "kind": "moderation"}, VERDICT, True),
        ({"bucket": "test-123456789"}, SMARTCOVER, True),
        ({"bucket": "other-1250000000"}, SMARTCOVER, False),
        ({"region": ["ap-beijing", "ap-chongqing"]}, SMARTCOVER, True),
        ({"key": "input/*.mp4"}, SMARTCOVER, True),
        ({"key": "input/*.mov"}, SMARTCOVER, False),
        ({"key": "*.mp4"}, WORKFLOW, True),
        ({"user_data": "*SmartCover*"}, SMARTCOVER, True),
        ({"user_data": "*"}, WORKFLOW, False),  # a workflow event carries no user data
        # kind, state and verdict are taken in any case, event_name, tag and label too
        ({"state": "failed"}, FAILED, True),
        ({"state": ["SUCCESS", "cancel"]}, FAILED, False),
        ({"kind": "Workflow"}, WORKFLOW, True),
        ({"tag": "smartcover"}, SMARTCOVER, True),
        ({"event_name": "workflowfinish"}, WORKFLOW, True),
        # a moderation verdict arrives with State=Success: verdict and label route it
        ({"verdict": "violation"}, VERDICT, True),
        ({"verdict": "violation"}, SUSPECTED, False),
        ({"verdict": ["Violation", "suspected"]}, SUSPECTED, True),
        ({"verdict": "normal"}, NORMAL, True),
        ({"verdict": "normal"}, SMARTCOVER, False),  # not a moderation event
        ({"label": "porn"}, VERDICT, True),
        ({"label": "Ads"}, VERDICT, False),
        ({"label": "Normal"}, SMARTCOVER, False),
    ],
)
def test_match(match, event, expected):
    assert Router([route(["h"], **match)], ["h"]).handlers_for(event) == (["h"] if expected else [])


def test_several_routes_may_match_and_each_handler_runs_once_in_route_order():
    router = Router(
        [
            route(["db", "slack"], state="Failed"),
            route(["db"], tag="SmartCover"),
            route(["archive", "db"]),
        ],
        ["db", "slack", "archive"],
    )
    assert router.handlers_for(FAILED) == ["db", "slack", "archive"]
    assert router.handlers_for(SMARTCOVER) == ["db", "archive"]


def test_no_routes_means_every_handler_gets_every_event():
    assert Router(None, ["a", "b"]).handlers_for(WORKFLOW) == ["a", "b"]


def test_an_empty_route_list_routes_nothing():
    assert Router([], ["a"]).handlers_for(SMARTCOVER) == []


@pytest.mark.parametrize(
    ("match", "message"),
    [
        (
            {"state": "Done"},
            "'Done' can never match: CI sends Submitted, Running, Success, Failed, Pause, Cancel",
        ),
        ({"kind": ["job", "task"]}, "'task' can never match: CI sends job, workflow, moderation"),
        ({"verdict": "bad"}, "'bad' can never match: CI sends normal, violation, suspected"),
    ],
)
def test_a_value_that_can_never_match_is_an_error_naming_the_valid_ones(match, message):
    with pytest.raises(ValidationError, match=message):
        route(["h"], **match)


def config(routes, handlers=("db", "chat")) -> Config:
    return Config.model_validate(
        {"handlers": {name: {"type": "log"} for name in handlers}, "routes": routes}
    )


def test_a_handler_no_route_reaches_is_a_warning():
    routes = [{"match": {"state": "Failed"}, "handlers": ["chat"]}]
    assert warnings(config(routes)) == ["handlers.db: no route sends it anything"]
    assert warnings(config(None)) == []  # without routes every handler gets every event
    assert len(warnings(config([]))) == 2


def test_an_event_name_or_tag_ci_is_not_known_to_send_is_a_warning():
    routes = [{"match": {"tag": ["SmartCover", "SmartCovr"]}, "handlers": ["db", "chat"]}]
    (warning,) = warnings(config(routes))
    assert warning.startswith(
        "routes[1].match.tag: CI is not known to send 'SmartCovr' (known: Transcode,"
    )
    routes = [{"match": {"event_name": "workflowstart"}, "handlers": ["db", "chat"]}]
    assert warnings(config(routes)) == []


def test_the_changes_of_routes_a_reload_logs_are_by_route_number():
    first, second, third = (
        RouteConfig(match=RouteMatch(state=state), handlers=["h"])
        for state in ("Failed", "Success", "Cancel")
    )
    assert changes([first, second], [first, second]) == []
    assert changes([first, second], [first, third, second]) == ["~2", "+3"]
    assert changes([first, second, third], [first]) == ["-2", "-3"]
    assert changes(None, [first]) == ["+1"]
    assert changes([first], None) == ["-1"]
    assert changes(None, None) == []
