"""Messages rendered from events for the chat and e-mail handlers."""

from __future__ import annotations

import dataclasses

import pytest

from handlers.markup import FEISHU_MARKDOWN, HTML, TEXT, WECOM_MARKDOWN
from handlers.message import FIELDS, check_template, render
from receiver import parse_callback
from receiver.callback.event import ObjectRef
from receiver.timezones import parse_timezone
from tests.support.callbacks import ALL, load
from tests.support.sample_events import event


@pytest.mark.parametrize("name", ALL)
def test_every_field_renders_for_every_fixture(name):
    template = " | ".join(f"${field}" for field in FIELDS)
    for one in parse_callback(load(name)):
        text = render(template, one, TEXT)
        assert (one.state or "") in text
        assert "$" not in text.replace(one.user_data or "", "")


def test_the_default_message_of_a_failed_job():
    failed = event("transcode_failed.json")
    assert render("$title\n$details", failed, TEXT).splitlines()[:4] == [
        "Transcode Failed",
        f"Job: {failed.job_id}",
        "State: Failed",
        f"Error: {failed.code}: {failed.message}",
    ]


def test_moderation_verdicts_are_spelled_out():
    assert render("$verdict", event("moderation_video_detail.json"), TEXT).startswith("violation")
    suspected = render("$verdict", event("moderation_image_simple_hit.json"), TEXT)
    assert suspected.startswith("suspected")
    assert render("$verdict", event("smartcover.xml"), TEXT) == ""


def test_long_output_lists_are_cut_with_a_count():
    many = [ObjectRef("b-1", "ap-guangzhou", f"out/{i}.jpg") for i in range(15)]
    snapshot = dataclasses.replace(event("snapshot.xml"), outputs=many)
    outputs = render("$outputs ($output_count)", snapshot, TEXT)
    assert outputs.startswith("out/0.jpg, out/1.jpg")
    assert outputs.endswith("out/9.jpg (+5 more) (15)")


def test_html_escapes_values_and_breaks_lines():
    tricky = dataclasses.replace(event("smartcover.xml"), user_data="<script>&</script>")
    html = render("$title\n$user_data", tricky, HTML)
    assert html == "SmartCover Success<br>\n&lt;script&gt;&amp;&lt;/script&gt;"


def test_markdown_bolds_labels():
    assert "**State**: Success" in render("$details", event("smartcover.xml"), WECOM_MARKDOWN)


def test_times_are_shown_in_the_handlers_zone():
    smartcover = event("smartcover.xml")  # EndTime 2022-06-30T15:29:48+0800
    assert render("$finished_at", smartcover, TEXT) == "2022-06-30 07:29:48 UTC"
    shanghai = parse_timezone("Asia/Shanghai")
    assert render("$finished_at", smartcover, TEXT, shanghai) == "2022-06-30 15:29:48 CST"
    assert "**Finished**: 2022-06-30 15:29:48 CST" in render(
        "$details", smartcover, WECOM_MARKDOWN, shanghai
    )


ORDINARY = "uploads/2022-06-30/video_id (test-123) #1 a+b=c 50% ~x! @home"


@pytest.mark.parametrize("markup", [WECOM_MARKDOWN, FEISHU_MARKDOWN], ids=["wecom", "feishu"])
def test_ordinary_characters_are_sent_as_they_are(markup):
    # What a key, a date or a message commonly holds makes no markup where it stands.
    ordinary = dataclasses.replace(event("smartcover.xml"), user_data=ORDINARY)
    assert render("$user_data", ordinary, markup) == ORDINARY


@pytest.mark.parametrize(
    ("template", "says"),
    [("$job", "unknown field $job"), ("costs $5", "not a valid template"), ("${tag", "not a")],
)
def test_bad_templates_are_refused(template, says):
    with pytest.raises(ValueError, match=says.replace("$", r"\$")):
        check_template(template)


@pytest.mark.parametrize(
    ("user_data", "feishu", "wecom"),
    [
        ("- item", "&#45; item", "\u200b- item"),  # a list
        ("1. first", "1&#46; first", "\u200b1. first"),
        ("=====", "&#61;====", "\u200b====="),  # a heading underline under the line before
        ("# heading", "&#35; heading", "\u200b# heading"),
        ("> quote", "&#62; quote", "\u200b> quote"),
        ("line\n- item", "line - item", "line - item"),  # no line of its own
    ],
)
def test_a_value_cannot_start_a_markdown_block(user_data, feishu, wecom):
    tricky = dataclasses.replace(event("smartcover.xml"), user_data=user_data)
    assert render("$user_data", tricky, FEISHU_MARKDOWN) == feishu
    assert render("$user_data", tricky, WECOM_MARKDOWN) == wecom


def test_job_id_is_the_job_or_the_workflow_run_and_never_the_event_id():
    workflow = event("workflow_finish.xml")
    assert render("$job_id", workflow, TEXT) == workflow.workflow.run_id
    smartcover = event("smartcover.xml")
    assert render("$job_id", smartcover, TEXT) == smartcover.job_id
    no_id = dataclasses.replace(smartcover, job_id=None)  # as a callback without a JobId
    assert render("$job_id", no_id, TEXT) == ""
    assert "Job:" not in render("$details", no_id, TEXT)
