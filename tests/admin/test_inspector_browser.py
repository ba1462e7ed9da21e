"""The inspector in a real browser: Debian's chromium (/usr/bin/chromium, no browser
download) driven by Playwright, against a real `ci-receiver serve` with real callbacks.

A person's way through it: the overview, the events, a filter by state, an event, a
replay of its failed handler until the attempt succeeds, the job's timeline, the dead
letters replayed all at once after a confirmation, the refused callbacks, the other time
zone. A callback whose fields hold HTML and script is shown as text and runs nothing.
Each page's screenshot is saved under build/screenshots/ (git ignores build/).

Without chromium this test is skipped, under CI=true it fails (`.ci/run` installs it).
"""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from tests.support.callbacks import load
from tests.support.databases import in_ci
from tests.support.handler_doubles import recorded
from tests.support.inspector_site import start
from tests.support.processes import REPO
from tests.support.waiting import wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO / "build" / "screenshots"
# Seconds Playwright waits for what a page should come to show.
PATIENCE_MS = 20_000

# Every field a sender controls, written to run script if it were ever not escaped.
HOSTILE = {
    "EventName": "TaskFinish",
    "JobsDetail": {
        "JobId": "j<i>hostile</i>",
        "State": "Failed",
        "Tag": "<svg/onload=window.pwned=1>",  # an id: no blanks
        "Code": "<b>E</b>",
        "Message": "<script>window.pwned=1</script>",
        "Input": {
            "BucketId": "media-1250000000",
            "Region": "ap-guangzhou",
            "Object": '"><svg onload="window.pwned=1">.mp4',
        },
        "Operation": {"UserData": "<iframe src=javascript:window.pwned=1>"},
    },
}


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        message = f"no {CHROMIUM}: apt-get install chromium"
        if in_ci():
            pytest.fail(f"{message} (under CI=true the browser test must run)")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def receiver(tmp_path):
    process = start(tmp_path, extra='[log]\ntimezone = "Asia/Shanghai"')
    yield process
    process.stop()


def job(job_id: str, state: str) -> bytes:
    body = orjson.loads(load("transcode_failed.json"))
    body["JobsDetail"].update(JobId=job_id, State=state, Code=state, Message="")
    return orjson.dumps(body)


def test_a_person_finds_a_failure_replays_it_and_looks_around(browser, receiver, tmp_path):
    from playwright.sync_api import expect

    expect.set_options(timeout=PATIENCE_MS)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for body in (
        load("smartcover.xml"),
        job("jtimeline", "Processing"),
        job("jtimeline", "Success"),
        load("transcode_failed.json"),
        load("workflow_finish.xml"),
        orjson.dumps(HOSTILE),
    ):
        assert receiver.post(body).status_code == 200
    refused = b"<Response><script>window.pwned=1</script><JobsDetail>"
    assert receiver.post(refused, headers={"user-agent": "curl/8.5"}).status_code == 400
    wait_until(lambda: len(recorded(tmp_path / "db.jsonl", "failed")) == 6, what="db failed")

    page = browser.new_page(viewport={"width": 1280, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    def shot(name: str) -> None:
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)

    # Overview: the day's callbacks, and the handler that dead-lettered everything.
    page.goto(receiver.admin_url + "/")
    expect(page.get_by_role("heading", name="Callbacks per minute")).to_be_visible()
    expect(page.locator(".card", has_text="Callbacks accepted")).to_contain_text("6")
    expect(page.locator(".card", has_text="Refused")).to_contain_text("1")
    db_row = page.locator("table.grid tr", has_text="db")
    expect(db_row.locator("td").last).to_have_text("6")
    assert page.locator("svg.traffic path.area.accepted").count() == 1
    shot("overview")

    # Events, then only the failed ones: the filter is in the URL.
    page.get_by_role("link", name="Events", exact=True).click()
    expect(page.locator("table.events tbody tr")).to_have_count(6)
    shot("events")
    page.get_by_label("State", exact=True).select_option("Failed")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"/inspector/events\?.*state=Failed"))
    rows = page.locator("table.events tbody tr")
    expect(rows).to_have_count(2)
    shot("events-failed")

    # The failed transcode: its fields, its callback, db dead after one attempt.
    rows.filter(has_text="Transcode").get_by_role("link").first.click()
    expect(page.locator("h1")).to_contain_text("Transcode")
    expect(page.locator("dl.fields")).to_contain_text("decode input stream failed")
    expect(page.locator("pre.raw")).to_contain_text('"JobId": "j68427030f84611ecb8546d80f2ba0001"')
    runs = page.locator("table.runs")
    expect(runs.locator("tr", has_text="db")).to_contain_text("dead")
    shot("event-dead")

    # Replay db alone: the page says so, and refreshes until the attempt succeeded.
    page.get_by_role("button", name="Replay for db").click()
    expect(page.locator(".notice")).to_contain_text("1 run queued again")
    expect(runs.locator("tr", has_text="db")).to_contain_text("done")
    attempts = page.locator("table.attempts tbody tr", has_text="db")
    expect(attempts).to_have_count(2)
    expect(attempts.last).to_contain_text("done")
    shot("event-replayed")

    # A job's timeline: every event of it, in order.
    page.goto(receiver.admin_url + "/inspector/events?job=jtimeline")
    page.locator("table.events").get_by_role("link", name="jtimeline").first.click()
    expect(page.locator("h1")).to_contain_text("jtimeline")
    expect(page.locator("ol.timeline li")).to_have_count(2)
    expect(page.locator("ol.timeline li").first).to_contain_text("Processing")
    expect(page.locator("ol.timeline li").last).to_contain_text("Success")
    shot("job-timeline")

    # Dead letters: replay all of db's, after a confirmation that says how many.
    page.get_by_role("link", name="Dead letters").click()
    expect(page.locator(".dead-card")).to_contain_text("planned failure")
    shot("dead-letters")
    page.get_by_role("link", name=re.compile(r"Replay all 5")).click()
    expect(page.locator("h1")).to_have_text("Replay 5 dead-lettered runs of db?")
    shot("dead-letters-confirm")
    page.get_by_role("button", name="Replay 5 runs").click()
    expect(page.locator(".notice")).to_contain_text("5 runs queued again")
    wait_until(lambda: len(recorded(tmp_path / "db.jsonl")) == 6, what="every db run done")
    page.reload()
    expect(page.locator(".empty")).to_contain_text("No handler has dead-lettered runs")

    # Refused callbacks: the reason, the sender, the body as text, and its bytes.
    page.get_by_role("link", name="Refused").click()
    row = page.locator("table.refused tbody tr")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("malformed_xml")
    expect(row).to_contain_text("curl/8.5")
    expect(row.locator("pre.preview")).to_have_text(refused.decode())
    shot("refused")
    with page.expect_download() as download:
        row.get_by_role("link", name=re.compile("Download")).click()
    assert Path(download.value.path()).read_bytes() == refused

    # Every field of the hostile callback is text on every page that shows it.
    for path in (
        "/inspector",
        "/inspector/events",
        "/inspector/events/" + "job:j<i>hostile</i>:Failed".replace("<", "%3C").replace(">", "%3E"),
    ):
        page.goto(receiver.admin_url + path)
        assert page.evaluate("window.pwned") is None, path
        assert page.locator("script, iframe, img, main svg[onload]").count() == 0, path
        expect(page.locator("main")).to_contain_text("<svg/onload=window.pwned=1>")
    expect(page.locator("dl.fields")).to_contain_text("<script>window.pwned=1</script>")
    expect(page.locator("dl.fields")).to_contain_text("<iframe src=javascript:window.pwned=1>")
    expect(page.locator("h1")).to_contain_text("<svg/onload=window.pwned=1>")
    expect(page.locator("dl.fields")).to_contain_text('"><svg onload="window.pwned=1">.mp4')
    shot("hostile-event")

    # The other time zone: the same moment, eight hours apart, remembered.
    shown = page.locator("dl.fields time").last
    local = shown.inner_text()
    page.get_by_role("link", name="UTC", exact=True).click()
    expect(page.locator("footer")).to_contain_text("times in UTC")
    utc = page.locator("dl.fields time").last.inner_text()
    assert int(local[11:13]) == (int(utc[11:13]) + 8) % 24, (local, utc)
    page.goto(receiver.admin_url + "/inspector/events")
    expect(page.locator("footer")).to_contain_text("times in UTC")
    assert errors == []
