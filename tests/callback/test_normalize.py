"""Normalization of every published (and re-created) CI callback into Events."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import orjson
import pytest

from receiver import Event, ObjectRef, PayloadError, parse_callback
from receiver.callback.normalize import read_callback
from tests.support.callbacks import ALL, XML, ci_json_from_xml, load

CST = timezone(timedelta(hours=8))
BUCKET, REGION = "test-123456789", "ap-chongqing"

# Fields that legitimately differ between the XML and the JSON rendering of one callback.
RENDERING = {"format", "raw", "operation", "received_at"}


def only(name: str, **kwargs) -> Event:
    events = parse_callback(load(name), **kwargs)
    assert len(events) == 1
    return events[0]


def keys(refs: list[ObjectRef]) -> list[str]:
    return [ref.key for ref in refs]


def normalized(event: Event) -> dict:
    return {k: v for k, v in event.to_dict().items() if k not in RENDERING}


# --- jobs ------------------------------------------------------------------------------


def test_smartcover_outputs_are_the_full_keys_listed():
    event = only("smartcover.xml")
    assert event.kind == "job"
    assert event.event_name == "TaskFinish"
    assert event.tag == "SmartCover"
    assert event.state == "Success"
    assert event.code == "Success"
    assert event.message is None  # <Message/>
    assert event.job_id == "j6842765cf84611ecb8546d80f2baf56f"
    assert event.id == "job:j6842765cf84611ecb8546d80f2baf56f:Success"
    assert event.queue_id == "p2242ab62c7c94486915508540933a2c6"
    assert event.input == ObjectRef(BUCKET, REGION, "input/demo.mp4")
    assert event.outputs == [
        ObjectRef(BUCKET, REGION, f"output/smartcover-{n}.jpg") for n in range(5)
    ]
    assert event.user_data == "This is my SmartCover job."
    assert event.created_at == datetime(2022, 6, 30, 15, 29, 42, tzinfo=CST)
    assert event.started_at == datetime(2022, 6, 30, 15, 29, 43, tzinfo=CST)
    assert event.finished_at == datetime(2022, 6, 30, 15, 29, 48, tzinfo=CST)
    assert event.workflow is None
    assert event.operation is not None
    assert event.operation["SmartCover"]["Count"] == "5"
    assert event.format == "xml"
    assert event.source == "http"


def test_snapshot_names_are_joined_to_their_prefix_and_the_sprite_is_an_output():
    event = only("snapshot.xml")
    assert keys(event.outputs) == [
        *(f"output/snapshot-{n}.jpg" for n in range(6)),
        "output/sprite-0.jpg",
    ]
    assert event.template_id == "t1f16e1dfbdc9ds4105b31632d45710642a"
    assert event.template_name == "template_snapshot"


def test_stream_extract_gives_one_output_per_produced_file():
    assert keys(only("stream_extract.xml").outputs) == ["output/out0.mp4", "output/out1.mp4"]


def test_pic_process_output_comes_from_its_result_node():
    event = only("pic_process.xml")
    assert event.tag == "PicProcess"
    assert event.outputs == [ObjectRef("test-1234567890", REGION, "output/out.jpg")]
    assert event.job_level == 0


def test_animation_json_with_a_jobsdetail_object_and_its_workflow():
    event = only("animation_workflow.json")
    assert event.format == "json"
    assert event.tag == "Animation"
    assert keys(event.outputs) == ["output/animation.gif"]
    assert event.workflow is not None
    assert event.workflow.to_dict() == {
        "workflow_id": "web6ac56c1ef54dbfa44d7f4103203be9",
        "workflow_name": "workflow-test",
        "name": "Animation_1581665960537",
        "run_id": "ic90edd59f84f11ec9d4f525400a3c59f",
    }


def test_superresolution_from_the_go_sdk_keeps_its_operation_and_job_level():
    event = only("superresolution_workflow.xml")
    assert event.tag == "SuperResolution"
    assert event.job_level == 0
    assert keys(event.outputs) == ["output/super_resolution.mp4"]
    # A failed sub-operation inside a successful job is the job's business, kept raw.
    assert event.state == "Success"
    assert event.operation["DigitalWatermark"]["State"] == "Failed"
    assert event.operation["WatermarkTemplateId"] == [
        "t143ae6e040af6431aa772c9ec3f0a3f36",
        "t12a74d11687d444deba8a6cc52051ac27",
    ]


def test_each_jobsdetail_entry_is_an_event():
    events = parse_callback(load("two_jobs.xml"))
    assert [e.job_id for e in events] == [
        "j0000000000000000000000000000000a",
        "j0000000000000000000000000000000b",
    ]
    assert [keys(e.outputs) for e in events] == [["output/a.mp4"], ["output/b.mp4"]]
    assert len({e.id for e in events}) == 2


def test_of_several_entries_each_event_keeps_only_its_own_as_raw():
    single = only("transcode.xml")
    assert single.raw == decode_data("transcode.xml")  # one entry: the whole document
    events = parse_callback(load("two_jobs.xml"))
    assert [e.raw["JobsDetail"]["JobId"] for e in events] == [e.job_id for e in events]
    assert all(e.raw["EventName"] == "TaskFinish" for e in events)


def decode_data(name: str) -> dict:
    from receiver.callback.decode import decode

    return decode(load(name)).data


def test_a_json_callback_wrapped_in_response_reads_as_the_xml_root_does():
    # As published for WordsGeneralize: {"Response": {"EventName": ..., "JobsDetail": [...]}}
    event = only("words_generalize_response.json")
    # The published sample leaves out State and Tag (its XML twin has Tag); Code is there.
    assert event.id == "job:ac34be3aa0bf411ed9ce39d7cc972e427:-"
    assert (event.state, event.code) == (None, "Success")
    assert (event.kind, event.event_name, event.format) == ("job", "TaskFinish", "json")
    assert event.input == ObjectRef("test-123456789", "ap-chongqing", "text.txt")
    assert event.finished_at == datetime(2022, 7, 25, 16, 35, 43, tzinfo=CST)
    assert event.operation is not None
    assert event.operation["WordsGeneralizeResult"]["WordsGeneralizeLable"]["Word"] == "Taxi"
    # the event keeps the document as the XML one would be kept: without its root
    assert event.raw["EventName"] == "TaskFinish"
    unwrapped = parse_callback(
        orjson.dumps(orjson.loads(load("words_generalize_response.json"))["Response"])
    )
    assert event.to_dict(include_raw=False) | {"received_at": None} == unwrapped[0].to_dict(
        include_raw=False
    ) | {"received_at": None}


def test_stored_workflow_events_from_before_read_with_their_run_id():
    event = only("workflow_finish.xml")
    stored = event.to_dict() | {"job_id": None}  # as kept when workflows had no job_id
    assert Event.from_dict(stored).job_id == event.workflow.run_id
    assert Event.from_dict(stored).id == event.id


def test_subject_is_the_job_the_run_or_the_event():
    assert only("transcode.xml").subject == "j68427030f84611ecb8546d80f2baf56f"
    assert only("workflow_finish.xml").subject == "i166ee19017b011eda8a5525400c540df"
    no_id = parse_callback(b'{"JobsDetail": {"State": "Success"}}')[0]
    assert no_id.subject == no_id.id
    job_in_workflow = only("animation_workflow.json")
    assert job_in_workflow.subject == job_in_workflow.job_id


def test_unknown_tag_still_gives_a_complete_event_with_its_operation():
    body = (
        b"<Response><EventName>TaskFinish</EventName><JobsDetail><Code>Success</Code>"
        b"<JobId>f0123456789abcdef0123456789abcdef</JobId><State>Success</State>"
        b"<Tag>FileHashCode</Tag><Input><BucketId>b-1</BucketId><Region>ap-guangzhou</Region>"
        b"<Object>in.zip</Object></Input><Operation><FileHashCodeResult><MD5>abc</MD5>"
        b"</FileHashCodeResult><UserData>u</UserData><JobLevel>1</JobLevel></Operation>"
        b"<CreationTime>2023-01-01T00:00:00+0800</CreationTime></JobsDetail></Response>"
    )
    (event,) = parse_callback(body)
    assert event.tag == "FileHashCode"
    assert event.id == "job:f0123456789abcdef0123456789abcdef:Success"
    assert event.operation == {
        "FileHashCodeResult": {"MD5": "abc"},
        "UserData": "u",
        "JobLevel": "1",
    }
    assert event.job_level == 1
    assert event.outputs == []
    assert set(event.to_dict()) == set(only("smartcover.xml").to_dict())


def test_a_job_without_result_node_reports_its_concrete_output_object():
    event = parse_callback(
        b'{"JobsDetail": {"JobId": "f1", "State": "Success", "Tag": "FileCompress", "Operation":'
        b' {"Output": {"Bucket": "b-1", "Region": "ap-beijing", "Object": "out.zip"}}}}'
    )[0]
    assert event.outputs == [ObjectRef("b-1", "ap-beijing", "out.zip")]
    assert event.event_name == "TaskFinish"


# --- failures (synthetic: CI publishes no failure sample) ------------------------------


def test_failed_job_carries_state_code_and_message_and_no_outputs():
    event = only("smartcover_failed.xml")
    assert event.state == "Failed"
    assert event.code == "ResourceDownloadFailed"
    assert event.message == "download input file failed: object not found"
    assert event.outputs == []
    assert event.job_level == 1
    assert event.id == "job:j9f42765cf84611ecb8546d80f2baf5aa:Failed"


def test_failed_json_job_reads_dash_times_as_none_and_quoted_numbers_as_ints():
    event = only("transcode_failed.json")
    assert (event.state, event.code) == ("Failed", "InternalError")
    assert event.started_at is None  # "-"
    assert event.finished_at == datetime(2022, 6, 30, 15, 29, 50, tzinfo=CST)
    assert event.job_level == 2  # "2"
    # The target object was never written: a failed job reports no outputs.
    assert event.outputs == []
    assert event.user_data == '{"video_id": 1001}'


# --- workflows -------------------------------------------------------------------------


def test_workflow_finish_carries_its_tasks_and_reads_times_with_a_space():
    event = only("workflow_finish.xml")
    assert event.kind == "workflow"
    assert event.event_name == "WorkflowFinish"
    assert event.id == "workflow:i166ee19017b011eda8a5525400c540df:WorkflowFinish:Success"
    # a workflow instance's job id is its RunId, as in the jobs table and the templates
    assert event.job_id == event.workflow.run_id == "i166ee19017b011eda8a5525400c540df"
    assert event.workflow.workflow_name == "workflow-3"
    assert event.input == ObjectRef("test-1234567890", None, "wk-test/game.mp4")
    assert event.created_at == datetime(2022, 8, 9, 14, 54, 17, tzinfo=CST)
    assert [(t.type, t.job_id, t.state) for t in event.tasks] == [
        ("Snapshot", "j23c11e1e17b011edaab4ab15ec33d076", "Success"),
        ("Transcode", "j168668b217b011ed8efb27bb229e2d11", "Success"),
    ]
    assert event.tasks[0].finished_at == datetime(2022, 8, 9, 14, 54, 42, tzinfo=CST)
    assert event.finished_at == event.tasks[0].finished_at  # the last task to end


def test_workflow_result_info_gives_outputs_and_region_even_without_a_response_root():
    event = only("workflow_finish_result_info.xml")
    bucket, region = "examplebucket-1250000000", "ap-guangzhou"
    assert event.tasks[0].outputs == [
        ObjectRef(bucket, region, "car.mp4_i0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a.jpg")
    ]
    assert event.outputs == [*event.tasks[0].outputs, ObjectRef(bucket, region, "hls/car.mp4.m3u8")]
    assert event.input == ObjectRef(bucket, region, "car.mp4")
    assert event.tasks[0].started_at == datetime(2025, 9, 9, 10, 0, 2, tzinfo=CST)


def test_workflow_without_event_name_is_a_workflow_finish():
    event = only("workflow_no_event_name.xml")
    assert event.event_name == "WorkflowFinish"
    assert event.id == only("workflow_finish.xml").id


def test_failed_workflow():
    event = only("workflow_failed.xml")
    assert event.state == "Failed"
    assert [t.state for t in event.tasks] == ["Failed"]
    assert event.id.endswith(":WorkflowFinish:Failed")


# --- moderation ------------------------------------------------------------------------


def test_moderation_simple():
    event = only("moderation_video_simple.json", headers={"X-Ci-Content-Version": "Simple"})
    assert event.kind == "moderation"
    assert event.event_name == "ReviewVideo"
    assert event.job_id == "test_trace_id"
    assert (event.state, event.code) == ("Success", "0")
    assert event.message == "Test request when setting callback url"
    assert event.moderation.result == 0
    assert event.moderation.forbidden_state == 0
    assert event.id == "moderation:test_trace_id:Success:0"


def test_moderation_simple_hit_names_its_scene_and_reads_the_object_from_the_url():
    event = only("moderation_image_simple_hit.json")
    assert event.moderation.to_dict() == {
        "result": 2,
        "label": "二维码",
        "score": 77,
        "forbidden_state": 1,
        "url": "https://examplebucket-1250000000.cos.ap-guangzhou.myqcloud.com/uploads/cat.jpg",
        "data_id": None,
    }
    assert event.input == ObjectRef("examplebucket-1250000000", "ap-guangzhou", "uploads/cat.jpg")


def test_moderation_detail_numbers_are_real_ints():
    event = only("moderation_video_detail.json", headers={"x-ci-content-version": "Detail"})
    assert event.kind == "moderation"
    assert event.event_name == "ReviewVideo"
    assert event.state == "Success"
    assert event.moderation.result == 1
    assert event.moderation.label == "Porn"
    assert event.moderation.forbidden_state == 0
    assert event.input == ObjectRef("examplebucket-1250000000", REGION, "video/test.mp4")
    assert event.id == "moderation:vab1ca9fc8a3ed11ea834c525400863904:Success:1"


def test_moderation_detail_of_a_document_uses_suggestion_and_empty_creation_time():
    event = only("moderation_document_detail.json")
    assert event.event_name == "ReviewDocument"
    assert event.moderation.result == 0
    assert event.created_at is None


def test_the_header_marks_a_detail_callback_whatever_its_event_name():
    body = b'{"EventName": "LiveAudit", "JobsDetail": {"JobId": "l1", "State": "Success"}}'
    assert parse_callback(body)[0].kind == "job"
    assert parse_callback(body, {"X-Ci-Content-Version": "Detail"})[0].kind == "moderation"


# --- XML and JSON of one job give one event --------------------------------------------


@pytest.mark.parametrize(
    ("xml", "json"),
    [
        ("smartcover.xml", "smartcover.json"),
        ("stream_extract.xml", "stream_extract.json"),
        ("workflow_finish.xml", "workflow_finish.json"),
    ],
)
def test_published_xml_and_json_of_one_callback_are_equal(xml, json):
    assert normalized(only(xml)) == normalized(only(json))
    assert only(xml).id == only(json).id


@pytest.mark.parametrize("name", XML)
def test_every_xml_fixture_equals_its_ci_style_json_rendering(name):
    from_xml = parse_callback(load(name))
    from_json = parse_callback(ci_json_from_xml(load(name)))
    assert [e.format for e in from_json] == ["json"] * len(from_xml)
    assert [normalized(e) for e in from_xml] == [normalized(e) for e in from_json]


def test_the_id_ignores_channel_and_arrival_but_not_state():
    over_http = only("transcode.xml")
    over_tdmq = only("transcode.xml", source="tdmq", source_meta={"topic": "t"})
    later = only("transcode.xml", received_at=datetime(2030, 1, 1, tzinfo=timezone.utc))
    assert over_http.id == over_tdmq.id == later.id
    failed = parse_callback(load("transcode.xml").replace(b"<State>Success", b"<State>Failed"))
    assert failed[0].id != over_http.id


def test_a_job_without_a_job_id_gets_a_stable_digest_id():
    body = b'{"JobsDetail": {"State": "Success", "Tag": "Transcode"}}'
    first, again = parse_callback(body)[0], parse_callback(body)[0]
    assert first.id == again.id
    assert first.id.startswith("job:~")
    assert parse_callback(body.replace(b"Transcode", b"Snapshot"))[0].id != first.id


# --- channels --------------------------------------------------------------------------


def test_cmq_json_envelope_is_a_cmq_push_with_its_metadata():
    event = only("cmq_envelope_transcode.json")
    assert event.source == "cmq-push"
    assert event.format == "xml"  # the format of the callback inside the envelope
    assert event.source_meta == {
        "topic_owner": 1250000000,
        "topic_name": "ci-callbacks",
        "subscription_name": "ci-receiver",
        "message_id": "9288918829234987",
        "publish_time": 1656574208,
    }
    assert normalized(event) | {"source": "http", "source_meta": {}} == normalized(
        only("transcode.xml")
    )


def test_cmq_simplified_push_is_known_by_its_headers():
    headers = {
        "User-Agent": "Qcloud Notification Service Agent",
        "x-cmq-message-id": "123",
        "x-cmq-message-tag": "ci",
    }
    event = only("transcode.xml", headers=headers)
    assert event.source == "cmq-push"
    assert event.source_meta == {"message_id": "123", "message_tag": "ci"}


def test_tdmq_source_and_metadata_are_kept():
    event = only("transcode.xml", source="tdmq", source_meta={"topic": "persistent://a/b/c"})
    assert (event.source, event.source_meta) == ("tdmq", {"topic": "persistent://a/b/c"})


# --- shape errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"{}",
        b'{"EventName": "TaskFinish"}',
        b'{"EventName": "TaskFinish", "JobsDetail": "nope"}',
        b'{"EventName": "TaskFinish", "JobsDetail": []}',
        b"<Response><Foo>1</Foo></Response>",
        b"<Other/>",
        b"[1, 2]",
        b'"text"'[:0] + b"[]",
        b'{"Response": "nope"}',
        b'{"Response": {"Foo": 1}}',
    ],
)
def test_documents_that_are_no_callback_are_unknown_shape(body):
    with pytest.raises(PayloadError) as caught:
        parse_callback(body)
    assert caught.value.reason == "unknown_shape"


def test_normalize_takes_a_decoded_document_and_defaults_its_event_limit():
    from receiver.callback.decode import decode
    from receiver.callback.normalize import normalize

    body = load("two_jobs.xml")
    assert [normalized(e) for e in normalize(decode(body)).events] == [
        normalized(e) for e in parse_callback(body)
    ]
    jobs = [{"JobId": f"j{n}", "State": "Success"} for n in range(101)]
    with pytest.raises(PayloadError) as caught:
        normalize(decode(orjson.dumps({"JobsDetail": jobs})))
    assert caught.value.reason == "too_many_events"


def test_too_many_jobs_in_one_callback_is_refused():
    from receiver import Limits

    body = orjson.dumps({"JobsDetail": [{"JobId": f"j{n}", "State": "Success"} for n in range(5)]})
    assert len(parse_callback(body, limits=Limits(max_events=5))) == 5
    with pytest.raises(PayloadError) as caught:
        parse_callback(body, limits=Limits(max_events=4))
    assert caught.value.reason == "too_many_events"


# --- the Event's plain and JSON forms --------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_to_dict_and_json_round_trip(name):
    for event in parse_callback(load(name)):
        assert Event.from_dict(event.to_dict()) == event
        assert Event.from_json(event.to_json()) == event
        assert orjson.loads(event.to_json()) == event.to_dict()
        assert orjson.loads(event.to_json(include_raw=False)) == event.to_dict(include_raw=False)


def test_to_dict_has_the_documented_keys_and_iso_times():
    data = only("transcode.xml").to_dict()
    assert list(data) == [
        "id", "kind", "event_name", "job_id", "tag", "state", "code", "message", "queue_id",
        "input", "outputs", "user_data", "job_level", "template_id", "template_name",
        "workflow", "tasks", "moderation", "created_at", "started_at", "finished_at",
        "format", "source", "source_meta", "received_at", "operation", "raw",
    ]  # fmt: skip
    assert data["created_at"] == "2022-06-30T15:29:42+08:00"
    assert datetime.fromisoformat(data["received_at"]).tzinfo is not None


def test_a_time_without_offset_is_read_as_beijing_time():
    body = b'{"JobsDetail": {"JobId": "j1", "State": "Success", "EndTime": "2022-06-30T15:29:42"}}'
    assert parse_callback(body)[0].finished_at == datetime(2022, 6, 30, 15, 29, 42, tzinfo=CST)


# --- fields of the wrong type ----------------------------------------------------------

JOB = {"JobId": "j1", "State": "Success", "Tag": "Transcode"}
SIMPLE = {"code": 0, "data": {"trace_id": "t1", "event": "ReviewImage", "result": 0}}


def workflow_of(**fields) -> dict:
    return {"WorkflowExecution": {"RunId": "i1", "State": "Success", **fields}}


@pytest.mark.parametrize(
    ("document", "field", "kind"),
    [
        ({"JobsDetail": {**JOB, "State": True}}, "State", "true (a boolean)"),
        ({"JobsDetail": {**JOB, "State": ["Success"]}}, "State", "a list of 1"),
        ({"JobsDetail": {**JOB, "JobId": {}}}, "JobId", "an object"),
        ({"JobsDetail": {**JOB, "Tag": ["Transcode", "Snapshot"]}}, "Tag", "a list of 2"),
        ({"EventName": False, "JobsDetail": JOB}, "EventName", "false (a boolean)"),
        ({"WorkflowExecution": {"RunId": [7], "State": "Success"}}, "RunId", "a list of 1"),
        (workflow_of(State={"a": 1}), "State", "an object"),
        (workflow_of(Tasks={"JobId": True}), "JobId", "true (a boolean)"),
        ({"JobsDetail": {**JOB, "Workflow": {"RunId": {}}}}, "RunId", "an object"),
        ({"EventName": "ReviewVideo", "JobsDetail": {"JobId": [1]}}, "JobId", "a list of 1"),
        ({"EventName": "ReviewVideo", "JobsDetail": {"State": False}}, "State", "false"),
        # Simple's own names for JobId and EventName.
        ({**SIMPLE, "data": {**SIMPLE["data"], "trace_id": ["t1"]}}, "trace_id", "a list"),
        ({**SIMPLE, "data": {**SIMPLE["data"], "event": {}}}, "event", "an object"),
    ],
)
def test_an_identifying_field_of_the_wrong_type_is_refused_naming_it(document, field, kind):
    with pytest.raises(PayloadError) as refused:
        parse_callback(orjson.dumps(document))
    assert refused.value.reason == "bad_id"
    assert refused.value.message.startswith(f"{field} is not an id: it is {kind}")


@pytest.mark.parametrize(
    ("state", "kind"),
    [
        ("<State>Success</State><State>Failed</State>", "a list of 2 (an element repeated)"),
        ("<State><a/></State>", "an object (an element with attributes or children)"),
        ('<State at="1">Success</State>', "an object"),
    ],
)
def test_an_xml_id_element_repeated_or_with_children_is_refused(state, kind):
    body = f"<Response><JobsDetail><JobId>j1</JobId>{state}</JobsDetail></Response>"
    with pytest.raises(PayloadError) as refused:
        parse_callback(body.encode())
    assert refused.value.reason == "bad_id"
    assert refused.value.message.startswith(f"State is not an id: it is {kind}")


def test_an_empty_id_element_is_still_a_missing_id():
    body = b"<Response><JobsDetail><JobId/><State></State></JobsDetail></Response>"
    (event,) = parse_callback(body)
    assert (event.job_id, event.state) == (None, None)


def test_a_number_in_an_id_field_reads_as_its_text_as_it_always_did():
    (job,) = parse_callback(orjson.dumps({"JobsDetail": {"JobId": 12345, "State": 1, "Tag": 2}}))
    assert (job.id, job.job_id, job.state, job.tag) == ("job:12345:1", "12345", "1", "2")
    (run,) = parse_callback(orjson.dumps(workflow_of(RunId=7, WorkflowId=8)))
    assert (run.job_id, run.workflow.workflow_id) == ("7", "8")
    (verdict,) = parse_callback(orjson.dumps({**SIMPLE, "data": {"trace_id": 1.5}}))
    assert verdict.job_id == "1.5"


@pytest.mark.parametrize("number", [float("nan"), float("inf")])
def test_a_number_that_is_no_number_is_refused_in_an_identifying_field(number):
    # orjson decodes neither; a document built otherwise (an API answer) could hold one.
    from receiver.callback.decode import Document
    from receiver.callback.normalize import normalize

    document = Document(data={"JobsDetail": {**JOB, "JobId": number}}, format="json")
    with pytest.raises(PayloadError, match=r"JobId is not an id: it is a number \((nan|inf)\)"):
        normalize(document)


@pytest.mark.parametrize("name", ALL)
def test_no_sample_is_refused_or_warned_about(name):
    """Every shipped sample, the published ones as published (moderation JSON with its
    real numbers among them), reads without a warning."""
    headers = {"X-Ci-Content-Version": "Detail"} if "detail" in name else None
    parsed = read_callback(load(name), headers)
    assert parsed.events
    assert parsed.warnings == [[] for _ in parsed.events]


def test_informative_fields_that_cannot_be_read_are_kept_as_sent_with_a_warning():
    operation = {"UserData": {"video_id": 1001, "tags": ["a"]}, "TemplateId": "t1"}
    sent = {
        **JOB,
        "CreationTime": "yesterday",
        "StartTime": ["2022-06-30T15:29:42+0800"],
        "EndTime": 1656574182,
        "Operation": operation,
    }
    parsed = read_callback(orjson.dumps({"JobsDetail": sent}))
    (event,) = parsed.events
    assert (event.created_at, event.started_at, event.finished_at) == (None, None, None)
    assert event.user_data == '{"video_id":1001,"tags":["a"]}'
    assert event.raw["JobsDetail"] == sent  # as sent
    assert event.operation == operation
    assert parsed.warnings == [["UserData", "CreationTime", "StartTime", "EndTime"]]
    assert Event.from_json(event.to_json()) == event


def test_ids_that_only_inform_and_texts_of_the_wrong_type_read_as_missing_with_a_warning():
    operation = {
        "TemplateId": ["t1", "t2"],
        "TemplateName": {"zh": "转码"},
        "JobLevel": "high",
        "UserData": "u",
    }
    sent = {
        **JOB,
        "Code": ["Success"],
        "Message": {},
        "QueueId": True,
        "Operation": operation,
        "Workflow": {"WorkflowId": {}, "RunId": "i1", "Name": "n"},
    }
    parsed = read_callback(orjson.dumps({"JobsDetail": sent}))
    (event,) = parsed.events
    assert (event.job_id, event.state, event.tag, event.user_data) == (
        "j1",
        "Success",
        JOB["Tag"],
        "u",
    )
    assert (event.code, event.message, event.queue_id, event.job_level) == (None, None, None, None)
    assert (event.template_id, event.template_name) == (None, None)
    assert (event.workflow.workflow_id, event.workflow.run_id) == (None, "i1")
    assert sorted(parsed.warnings[0]) == sorted(
        ["Code", "Message", "QueueId", "JobLevel", "TemplateId", "TemplateName", "WorkflowId"]
    )
    assert event.raw["JobsDetail"] == sent


def test_a_job_level_of_true_and_numbers_as_ci_writes_them():
    for level, expected, warned in [
        (True, None, ["JobLevel"]),
        ("0", 0, []),
        (1, 1, []),
        ("", None, []),
    ]:
        parsed = read_callback(
            orjson.dumps({"JobsDetail": {**JOB, "Operation": {"JobLevel": level}}})
        )
        assert (parsed.events[0].job_level, parsed.warnings) == (expected, [warned])


def test_workflow_and_moderation_fields_that_only_inform_warn_too():
    tasks = [{"JobId": "j1", "State": "Success", "TemplateId": {}, "TemplateName": [1, 2]}]
    parsed = read_callback(orjson.dumps(workflow_of(WorkflowId=False, Tasks=tasks)))
    (run,) = parsed.events
    assert (run.workflow.workflow_id, run.tasks[0].template_id, run.tasks[0].template_name) == (
        None,
        None,
        None,
    )
    assert sorted(parsed.warnings[0]) == ["TemplateId", "TemplateName", "WorkflowId"]
    verdict = {
        "EventName": "ReviewImage",
        "JobsDetail": {"JobId": "v1", "Code": {}, "Message": [1]},
    }
    assert read_callback(orjson.dumps(verdict)).warnings == [["Code", "Message"]]
    simple = {"code": [0], "message": {"a": 1}, "data": {"trace_id": "t1"}}
    parsed = read_callback(orjson.dumps(simple))
    # Simple has no State: it follows code, which cannot be read here.
    assert (parsed.events[0].code, parsed.events[0].state) == (None, "Failed")
    assert parsed.warnings == [["code", "message"]]


def test_warnings_name_each_occurrence_in_workflow_tasks_moderation_and_xml():
    workflow = (
        b"<Response><WorkflowExecution><RunId>i1</RunId><State>Success</State>"
        b"<CreateTime>soon</CreateTime><Tasks><JobId>j1</JobId><EndTime>0</EndTime></Tasks>"
        b"<Tasks><JobId>j2</JobId><EndTime><a/></EndTime></Tasks></WorkflowExecution></Response>"
    )
    assert read_callback(workflow).warnings == [["EndTime", "EndTime", "CreateTime"]]
    verdict = {"EventName": "ReviewImage", "JobsDetail": {"JobId": "v1", "CreationTime": 5}}
    assert read_callback(orjson.dumps(verdict)).warnings == [["CreationTime"]]
    user_data = b"<Response><JobsDetail><JobId>j1</JobId><Operation><UserData><a>1</a>"
    user_data += b"</UserData></Operation></JobsDetail></Response>"
    parsed = read_callback(user_data)
    assert (parsed.events[0].user_data, parsed.warnings) == ('{"a":"1"}', [["UserData"]])


def test_each_event_has_the_warnings_of_its_own_entry():
    details = [{**JOB, "JobId": "j1", "EndTime": "soon"}, {**JOB, "JobId": "j2"}]
    details.append({**JOB, "JobId": "j3", "Code": [], "StartTime": 5})
    parsed = read_callback(orjson.dumps({"JobsDetail": details}))
    assert [event.job_id for event in parsed.events] == ["j1", "j2", "j3"]
    assert parsed.warnings == [["EndTime"], [], ["Code", "StartTime"]]


def test_dash_empty_and_missing_times_and_a_string_user_data_give_no_warning():
    sent = {**JOB, "CreationTime": "", "StartTime": "-", "Operation": {"UserData": ""}}
    parsed = read_callback(orjson.dumps({"JobsDetail": sent}))
    assert parsed.warnings == [[]]
    assert parsed.events[0].user_data is None
