"""Route matching: every key given must match; lists are any-of; key and user_data glob."""

from __future__ import annotations

import pytest

from receiver import parse_callback
from receiver.config import RouteConfig
from receiver.routing import Router
from tests.callbacks import load

SMARTCOVER = parse_callback(load("smartcover.xml"))[0]
FAILED = parse_callback(load("smartcover_failed.xml"))[0]
WORKFLOW = parse_callback(load("workflow_finish.xml"))[0]
VERDICT = parse_callback(load("moderation_video_detail.json"))[0]


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
