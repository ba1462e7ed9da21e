"""The JSON admin API of a real `ci-receiver serve`, over loopback HTTP: filters and
cursor paging, one event whole, a job's history, refused callbacks and their bytes,
replay with its dry run, the checks of every parameter, and who may do what.

The events are real callbacks posted to the public port; handler `db` fails its first
attempt of every event and has one attempt only (`tests/support/inspector_site.py`), so each
event is dead-lettered for it at once and succeeds when replayed.
"""

from __future__ import annotations

import httpx
import pytest

from receiver import parse_callback
from receiver.testing import sample_body
from tests.support.callbacks import job, load
from tests.support.handler_doubles import PLANNED, recorded
from tests.support.inbox_places import InboxPlace
from tests.support.inspector_site import start
from tests.support.processes import Receiver
from tests.support.waiting import wait_until


def dead_for_db(receiver: Receiver, count: int) -> None:
    wait_until(
        lambda: len(get(receiver, "/api/events", status="dead").json()["events"]) == count,
        what=f"{count} events dead-lettered for db",
    )


def get(receiver: Receiver, path: str, headers=None, **params) -> httpx.Response:
    return httpx.get(receiver.admin_url + path, params=params, headers=headers, timeout=10)


def post(receiver: Receiver, path: str, body: object, **kwargs) -> httpx.Response:
    return httpx.post(receiver.admin_url + path, json=body, timeout=30, **kwargs)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    place = InboxPlace(request.param, tmp_path)
    yield place
    import asyncio

    asyncio.run(place.close())


@pytest.fixture
def receiver(tmp_path, backend):
    process = start(tmp_path, env=backend.settings())
    yield process
    process.stop()


def test_off_unless_configured(tmp_path):
    receiver = start(tmp_path, inspector=False)
    try:
        for path in ("/api/events", "/inspector", "/inspector/events"):
            answer = get(receiver, path)
            assert answer.status_code == 404, path
            assert "set [admin] inspector = true" in answer.json()["detail"]
        assert get(receiver, "/metrics").status_code == 200
    finally:
        receiver.stop()


def test_events_by_every_filter_and_page_by_cursor(receiver):
    receiver.post(job("j1", key="videos/a.mp4"))
    receiver.post(job("j2", state="Failed", tag="Snapshot", key="videos/b.mov"))
    receiver.post(load("workflow_finish.xml"))
    for n in range(5):
        receiver.post(job(f"jpage{n}", key=f"other/{n}.mp4"))
    dead_for_db(receiver, 8)
    workflow = parse_callback(load("workflow_finish.xml"))[0]

    def jobs(**params) -> list[str]:
        answer = get(receiver, "/api/events", **params)
        assert answer.status_code == 200, answer.text
        return [event["job_id"] for event in answer.json()["events"]]

    assert jobs(state="Failed") == ["j2"]
    assert jobs(tag="Snapshot") == ["j2"]
    # As routes match: without regard to case, and an event name where a tag is asked.
    assert jobs(state="failed") == jobs(state="FAILED") == ["j2"]
    assert jobs(tag="snapshot") == ["j2"]
    assert jobs(tag="workflowfinish") == jobs(event_name="WorkflowFinish") == [workflow.job_id]
    assert jobs(verdict="violation") == []
    assert jobs(kind="workflow") == [workflow.job_id]
    assert jobs(job="j1") == ["j1"]
    assert jobs(key="videos/*.mp4") == ["j1"]
    assert jobs(bucket="media-1250000000", key="videos/*") == ["j2", "j1"]
    assert jobs(status="dead", handler="db", tag="Transcode", key="videos/*") == ["j1"]
    assert jobs(status="done", handler="log", state="Failed") == ["j2"]
    assert jobs(status="pending") == []
    assert jobs(status="forged") == []
    assert jobs(since="1h", until="2999-01-01T00:00:00") == jobs()
    assert jobs(until="2000-01-01") == []
    assert jobs(state="") == jobs()  # an empty field of a form is no filter

    pages, url = [], "/api/events?limit=3&key=other/*"
    while url:
        answer = httpx.get(receiver.admin_url + url).json()
        pages.append([event["job_id"] for event in answer["events"]])
        url = answer["next"]
    assert pages == [["jpage4", "jpage3", "jpage2"], ["jpage1", "jpage0"]]
    first = get(receiver, "/api/events", limit=1).json()["events"][0]
    assert first["handlers"] == {
        "db": {"status": "dead", "attempts": 1, "error": PLANNED.format(1, 1)},
        "log": {"status": "done", "attempts": 1, "error": None},
    }
    assert (first["bucket"], first["key"]) == ("media-1250000000", "other/4.mp4")


def test_moderation_verdicts_listed_filtered_and_counted(receiver):
    for name in ("moderation-simple", "moderation-detail", "moderation-suspected"):
        assert receiver.post(sample_body(name)).status_code == 200
    dead_for_db(receiver, 3)

    def verdicts(**params) -> list[str | None]:
        answer = get(receiver, "/api/events", **params)
        assert answer.status_code == 200, answer.text
        return [event["verdict"] for event in answer.json()["events"]]

    assert sorted(map(str, verdicts(kind="moderation"))) == ["normal", "suspected", "violation"]
    assert verdicts(verdict="Violation") == ["violation"]
    assert verdicts(verdict="suspected", tag="reviewimage") == ["suspected"]
    overview = get(receiver, "/api/overview").json()
    assert overview["verdicts"] == {"normal": 1, "suspected": 1, "violation": 1}
    page = httpx.get(receiver.admin_url + "/inspector/events", params={"verdict": "violation"})
    assert page.text.count('<span class="verdict violation"') == 1
    assert "verdict suspected" not in page.text
    front = httpx.get(receiver.admin_url + "/inspector").text
    assert "Moderation verdicts" in front
    assert "/inspector/events?verdict=violation&amp;since=24h" in front


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"before": "-1"}, "before"),
        ({"before": str(1 << 64)}, "before"),
        ({"kind": "jobs"}, "kind"),
        ({"status": "failed"}, "status"),
        ({"since": "yesterday"}, "since"),
        ({"since": "99999999999d"}, "since"),
        ({"since": "1h", "until": "2h"}, "until"),
        ({"tag": "x" * 2000}, "tag"),
        ({"state": "a\x00b"}, "state"),
        ({"state": "done"}, "state"),
        ({"verdict": "porn"}, "verdict"),
        ({"stat": "dead"}, "stat"),
        ([("tag", "a"), ("tag", "b")], "tag"),
    ],
)
def test_a_bad_parameter_is_a_400_that_names_it(receiver, params, named):
    answer = httpx.get(receiver.admin_url + "/api/events", params=params)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "bad_request"
    assert answer.json()["detail"].startswith(f"{named}:")
    # The pages check them the same way, and say so in a page.
    page = httpx.get(receiver.admin_url + "/inspector/events", params=params)
    assert page.status_code == 400
    assert "text/html" in page.headers["content-type"]


def test_bad_paths_and_bodies_are_clear_refusals(receiver):
    assert get(receiver, "/api/receipts/abc").status_code == 400
    assert get(receiver, f"/api/receipts/{1 << 70}").status_code == 400
    assert get(receiver, "/api/receipts/999999").status_code == 404
    assert get(receiver, "/api/events/job:none:Success").status_code == 404
    assert get(receiver, "/api/jobs/a%00b").status_code == 400
    assert get(receiver, "/api/overview", since="1h").status_code == 400
    for body, detail in [
        ({}, "say what to replay"),
        ({"all": True}, "name them in handlers"),
        ({"dead": True, "handlers": ["nope"]}, "not configured: nope"),
        ({"dead": True, "wat": 1}, "wat: not a parameter"),
        ({"events": "job:x:Success"}, "events: Input should be a valid list"),
        ({"filter": {"kind": "x"}}, "filter.kind"),
        ({"events": ["a"], "filter": {"tag": "T"}}, "leave out all and filter"),
    ]:
        answer = post(receiver, "/api/replay", body)
        assert answer.status_code == 400, (body, answer.text)
        assert detail in answer.json()["detail"], (body, answer.json())
    not_json = httpx.post(
        receiver.admin_url + "/api/replay",
        content=b"{",
        headers={"content-type": "application/json"},
    )
    assert not_json.status_code == 400


def test_one_event_whole_and_a_job_history(receiver):
    receiver.post(job("jhist", state="Processing"))
    receiver.post(job("jhist", state="Failed"))
    receiver.post(job("jother"))
    dead_for_db(receiver, 3)
    detail = get(receiver, "/api/events/job:jhist:Failed").json()
    assert detail["event"]["state"] == "Failed"
    assert detail["event"]["raw"]["JobsDetail"]["JobId"] == "jhist"
    assert {run["handler"]: run["status"] for run in detail["runs"]} == {
        "db": "dead",
        "log": "done",
    }
    (failed,) = [a for a in detail["attempts"] if a["handler"] == "db"]
    assert failed["outcome"] == "dead"
    # A handler's own exception says where it was raised: a bug's line.
    assert failed["error"] == PLANNED.format(1, 1)
    assert failed["ms"] >= 0
    body = get(receiver, f"/api/receipts/{detail['receipt_id']}/body")
    assert body.content == job("jhist", state="Failed")
    assert body.headers["content-type"] == "application/octet-stream"
    history = get(receiver, "/api/jobs/jhist").json()
    assert [e["state"] for e in history["events"]] == ["Processing", "Failed"]  # in order
    assert history["earlier"] is None
    short = get(receiver, "/api/jobs/jhist", limit=1).json()
    assert [e["state"] for e in short["events"]] == ["Failed"]
    assert short["earlier"].startswith("/api/jobs/jhist?")


def test_refused_callbacks_with_their_reason_sender_and_bytes(receiver):
    hostile = b"<x><script>alert(1)</script>" + b"A" * 2000  # not closed: malformed
    refused = receiver.post(
        hostile, headers={"user-agent": "curl/8.5", "x-forwarded-for": "1.2.3.4"}
    )
    assert refused.status_code == 400
    receiver.post(b"\x00\x01 binary")
    found = get(receiver, "/api/refused").json()
    binary, xml = found["refused"]
    assert found["next"] is None
    assert (xml["reason"], xml["size"], xml["kept"]) == (
        "malformed_xml",
        len(hostile),
        len(hostile),
    )
    assert xml["headers"]["user-agent"] == "curl/8.5"
    assert xml["headers"]["x-forwarded-for"] == "1.2.3.4"
    assert xml["preview"] == hostile[:512].decode()
    assert binary["reason"] == "not_xml_or_json"
    assert get(receiver, f"/api/receipts/{xml['id']}/body").content == hostile
    assert get(receiver, f"/api/receipts/{xml['id']}").json()["request_id"] == xml["request_id"]
    paged = get(receiver, "/api/refused", limit=1).json()
    assert [r["id"] for r in paged["refused"]] == [binary["id"]]
    assert [r["id"] for r in httpx.get(receiver.admin_url + paged["next"]).json()["refused"]] == [
        xml["id"]
    ]


def test_replay_with_a_dry_run_that_says_how_many(receiver, tmp_path):
    for n in range(3):
        receiver.post(job(f"jr{n}", tag="Snapshot" if n else "Transcode"))
    dead_for_db(receiver, 3)
    dead = {"dead": True, "handlers": ["db"]}
    dry = post(receiver, "/api/replay", {**dead, "dry_run": True}).json()
    assert dry == {"events": 3, "runs": 3, "dry_run": True, "unrouted": {}, "unrun": {}}
    assert len(get(receiver, "/api/events", status="dead").json()["events"]) == 3  # unchanged
    by_filter = {"filter": {"tag": "Snapshot"}, "handlers": ["db"], "dry_run": True}
    assert post(receiver, "/api/replay", by_filter).json()["runs"] == 2
    done = post(receiver, "/api/replay", {"events": ["job:jr0:Success"], "handlers": ["db"]})
    assert done.json() == {"events": 1, "runs": 1, "dry_run": False, "unrouted": {}, "unrun": {}}
    wait_until(lambda: "job:jr0:Success" in recorded(tmp_path / "db.jsonl"), what="jr0 replayed")
    assert post(receiver, "/api/replay", dead).json()["runs"] == 2
    wait_until(lambda: len(recorded(tmp_path / "db.jsonl")) == 3, what="dead letters replayed")
    assert get(receiver, "/api/events", status="dead").json()["events"] == []
    handlers = {h["name"]: h for h in get(receiver, "/api/handlers").json()["handlers"]}
    assert (handlers["db"]["dead"], handlers["db"]["started"]) == (0, True)
    overview = get(receiver, "/api/overview").json()
    assert overview["totals"] == {"accepted": 3}
    assert overview["tags"] == {"Snapshot": 2, "Transcode": 1}


def test_a_stored_callback_decoded_again(receiver):
    receiver.post(job("jreceipt"))
    dead_for_db(receiver, 1)
    receipt_id = get(receiver, "/api/events/job:jreceipt:Success").json()["receipt_id"]
    again = post(receiver, f"/api/receipts/{receipt_id}/replay", {})
    assert again.json() == {
        "ids": ["job:jreceipt:Success"],
        "new": [],
        "duplicates": ["job:jreceipt:Success"],
    }
    refused = receiver.post(b"nope")
    assert refused.status_code == 400
    (kept,) = get(receiver, "/api/refused").json()["refused"]
    still = post(receiver, f"/api/receipts/{kept['id']}/replay", {})
    assert (still.status_code, still.json()["error"]) == (422, "undecodable")
    # It is kept already: not kept (nor counted) as refused once more.
    assert [r["id"] for r in get(receiver, "/api/refused").json()["refused"]] == [kept["id"]]


def test_read_only_credentials_look_and_never_replay(tmp_path):
    receiver = start(
        tmp_path,
        admin='token = "full-tok-1"\nread_token = "look-tok-1"\n'
        'read_basic_auth = { viewer = "view-pw-1" }',
    )
    try:
        look = {"Authorization": "Bearer look-tok-1"}
        full = {"Authorization": "Bearer full-tok-1"}
        receiver.post(job("jscope"))
        assert get(receiver, "/api/events").status_code == 401
        wait_until(
            lambda: get(receiver, "/api/events", headers=look, status="dead").json()["events"],
            what="the event dead-lettered",
        )
        page = "/inspector/events/job:jscope:Success"
        viewer = httpx.get(receiver.admin_url + page, auth=("viewer", "view-pw-1"))
        assert viewer.status_code == 200
        assert "dead" in viewer.text
        assert "Replay" not in viewer.text
        assert "Replay" in httpx.get(receiver.admin_url + page, headers=full).text
        replay = {"dead": True, "dry_run": True}
        refused = post(receiver, "/api/replay", replay, headers=look)
        assert (refused.status_code, refused.json()["error"]) == (403, "forbidden")
        assert post(receiver, "/api/replay", replay, headers=full).json()["runs"] == 1
    finally:
        receiver.terminate()
    assert "look-tok-1" not in receiver.log()


def test_requests_from_another_site_are_refused(receiver):
    body = {"dead": True, "dry_run": True}
    assert post(receiver, "/api/replay", body).status_code == 200
    foreign = post(receiver, "/api/replay", body, headers={"origin": "https://evil.example"})
    assert foreign.status_code == 403
    assert "another origin" in foreign.json()["detail"]
    fetched = post(receiver, "/api/replay", body, headers={"sec-fetch-site": "cross-site"})
    assert fetched.status_code == 403
    form = httpx.post(
        receiver.admin_url + "/api/replay",
        content=b"dead=true",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert form.status_code == 415
    # The inspector's own form: without the token of its page, refused.
    page = httpx.post(receiver.admin_url + "/inspector/replay", data={"event": "x"})
    assert page.status_code == 403
    assert "token" in page.text


def test_the_inspectors_replay_form_checks_what_it_is_given(receiver):
    with httpx.Client(base_url=receiver.admin_url) as browser:
        browser.get("/inspector/dead")  # sets the page's form token
        token = browser.cookies["ci_receiver_csrf"]
        for event in ("j" * 1025, "job:\x00:Success"):
            page = browser.post("/inspector/replay", data={"event": event, "csrf": token})
            assert page.status_code == 400, event
            assert "events.0" in page.text
        dead = browser.post("/inspector/dead/replay", data={"handler": "db", "csrf": token})
        assert dead.status_code == 303


def test_an_open_listener_answers_loopback_names_only(receiver):
    port = receiver.admin_port
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"inspector.localhost:{port}"):
        assert get(receiver, "/api/events", headers={"host": host}).status_code == 200, host
    rebound = httpx.get(receiver.admin_url + "/inspector", headers={"host": f"evil.example:{port}"})
    assert rebound.status_code == 403


def test_a_relay_has_nothing_to_inspect(tmp_path, pulsar_broker):
    config = tmp_path / "relay.toml"
    config.write_text(
        f'data_dir = "{tmp_path}"\n[tdmq]\nservice_url = "{pulsar_broker.url}"\n'
        '[relay]\ntopic = "persistent://public/default/relayed"\n[admin]\ninspector = true\n'
    )
    relay = Receiver(config).start()
    try:
        answer = get(relay, "/api/events")
        assert (answer.status_code, answer.json()["error"]) == (404, "not_available")
        page = get(relay, "/inspector")
        assert page.status_code == 404
        assert "keeps no inbox" in page.text
    finally:
        relay.stop()
