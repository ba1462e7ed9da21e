"""The inspector's pure parts (chart geometry, the pretty-printed callback) and its
packaging: a wheel carries every template and static file."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from receiver.admin.charts import bars, traffic_chart
from receiver.admin.pretty import pretty
from receiver.inbox import Traffic
from tests.support.callbacks import load
from tests.support.processes import REPO

SINCE = datetime(2026, 11, 30, 0, 0, tzinfo=timezone.utc)


def at(minutes: int) -> datetime:
    return SINCE + timedelta(minutes=minutes)


def test_the_traffic_chart_stacks_outcomes_per_minute():
    traffic = Traffic(
        60,
        [(at(0), "accepted", 4), (at(0), "rejected", 1), (at(90), "duplicate", 2)],
        {},
        {},
        {},
    )
    chart = traffic_chart(traffic, SINCE, 180, timezone.utc, width=180, height=100)
    assert chart.peak == 5
    assert [layer.outcome for layer in chart.layers] == ["accepted", "duplicate", "rejected"]
    accepted, duplicate, rejected = chart.layers
    assert (accepted.total, duplicate.total, rejected.total) == (4, 2, 1)
    # Minute 0: accepted from the axis to 4/5 of the height, refused on top of it.
    assert accepted.path.startswith("M0,20 1,20 1,100 180,100")
    assert rejected.path.startswith("M0,0 1,0 1,100")
    assert all(layer.path.endswith("Z") for layer in chart.layers)
    assert chart.outline.startswith("M0,0 1,0 1,100 90,100 90,60 91,60 91,100")
    assert [(tick.x, tick.label) for tick in chart.ticks] == [(0, "00:00"), (180, "03:00")]
    assert [band.title for band in chart.bands] == [
        "00:00–01:00: 4 accepted, 1 refused",
        "01:00–02:00: 2 duplicate",
        "02:00–03:00: nothing",
    ]


def test_chart_labels_are_in_the_viewers_zone_and_empty_traffic_draws_nothing():
    chart = traffic_chart(Traffic(60, [], {}, {}, {}), SINCE, 1440, ZoneInfo("Asia/Kolkata"))
    assert chart.peak == 0
    assert chart.layers == []
    # +05:30: the local hours fall on the half hours of UTC.
    assert [tick.label for tick in chart.ticks][:2] == ["06:00", "09:00"]
    assert chart.bands[0].title.startswith("05:30–06:00")


def test_bars_rank_counts_and_sum_the_rest():
    found = bars({"a": 1, "b": 8, "c": 4, "d": 1}, limit=3)
    assert [(bar.label, bar.count, bar.percent) for bar in found] == [
        ("b", 8, 100.0),
        ("c", 4, 50.0),
        ("2 others", 2, 25.0),
    ]
    assert bars({}) == []


def test_a_callback_is_shown_indented_or_as_it_came():
    assert (
        pretty(b'{"a":{"b":[1,2]}}') == '{\n  "a": {\n    "b": [\n      1,\n      2\n    ]\n  }\n}'
    )
    xml = pretty(load("smartcover.xml"))
    assert "\n    <JobId>j6842765cf84611ecb8546d80f2baf56f</JobId>" in xml
    assert pretty(b"<a><b>x</b></a>") == "<a>\n  <b>x</b>\n</a>"
    doctype = b'<!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>'
    assert pretty(doctype) == doctype.decode()
    assert pretty(b"<a><b></a>") == "<a><b></a>"  # malformed: as it came
    assert pretty(b"{broken") == "{broken"
    assert pretty(b"\xff\xfeplain") == "\ufffd\ufffdplain"


def test_a_wheel_carries_every_template_and_static_file(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path), str(REPO)],
        check=True,
        cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("ci_receiver-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    admin = REPO / "receiver" / "admin"
    assets = [
        path.relative_to(REPO).as_posix()
        for folder in ("templates", "static")
        for path in (admin / folder).iterdir()
    ]
    assert len(assets) > 5
    assert set(assets) <= shipped
