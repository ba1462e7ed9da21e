"""Decoding: sniffing, XML and JSON parsing, envelopes and limits."""

from __future__ import annotations

import orjson
import pytest

from receiver.callback.decode import Limits, PayloadError, decode
from tests.support.callbacks import load


def reason(body: bytes, **kwargs) -> str:
    with pytest.raises(PayloadError) as caught:
        decode(body, **kwargs)
    assert caught.value.message  # always a human explanation too
    return caught.value.reason


def test_xml_is_sniffed_from_the_first_byte_whatever_the_content_type():
    document = decode(load("transcode.xml"), {"Content-Type": "application/json"})
    assert document.format == "xml"
    assert document.data["EventName"] == "TaskFinish"  # the Response root is unwrapped


def test_json_is_sniffed_after_a_bom_and_blank_lines():
    document = decode(
        b"\xef\xbb\xbf \r\n\t" + load("smartcover.json"), {"Content-Type": "text/xml"}
    )
    assert document.format == "json"
    assert isinstance(document.data["JobsDetail"], list)


def test_xml_after_a_bom_and_with_a_declaration():
    body = b'\xef\xbb\xbf\n<?xml version="1.0" encoding="UTF-8"?>\n' + load("transcode.xml")
    assert decode(body).data["JobsDetail"]["Tag"] == "Transcode"


def test_xml_in_another_declared_encoding():
    body = (
        '<?xml version="1.0" encoding="ISO-8859-1"?><Response><UserData>café</UserData></Response>'
    )
    assert decode(body.encode("latin-1")).data["UserData"] == "café"


def test_headers_are_read_case_insensitively():
    document = decode(load("moderation_video_simple.json"), {"X-CI-Content-Version": "Simple"})
    assert document.content_version == "Simple"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", "empty"),
        (b" \r\n\t ", "empty"),
        (b"\xef\xbb\xbf", "empty"),
        (b"hello", "not_xml_or_json"),
        (b"\x00\x01", "not_xml_or_json"),
        (b"\xff\xfe<\x00", "not_xml_or_json"),
        (b"<Response><EventName>TaskFinish</Response>", "malformed_xml"),
        (b"<Response>&undefined;</Response>", "malformed_xml"),
        (b"<a>\xff</a>", "malformed_xml"),
        (b'{"EventName": "TaskFinish",}', "malformed_json"),
        (b'{"a": "\xff"}', "malformed_json"),
        (b"{" * 2000, "malformed_json"),
        (b"[NaN]", "malformed_json"),
    ],
)
def test_bad_bodies_get_a_reason(body, expected):
    assert reason(body) == expected


def test_json_with_a_trailing_comma_as_in_some_published_samples_is_malformed():
    body = load("pic_process_workflow.json").replace(b'"JobLevel": 0', b'"JobLevel": 0,')
    assert reason(body) == "malformed_json"


def test_a_callback_published_without_its_response_root_is_read_as_if_it_had_one():
    document = decode(load("workflow_finish_result_info.xml"))
    assert document.data["EventName"] == "WorkflowFinish"
    assert "WorkflowExecution" in document.data


def test_an_unknown_root_is_kept_as_the_document():
    assert decode(b"<Other><a>1</a></Other>").data == {"Other": {"a": "1"}}


def test_cmq_envelope_is_unwrapped_and_its_metadata_kept():
    document = decode(load("cmq_envelope_transcode.json"))
    assert document.format == "xml"
    assert document.data["JobsDetail"]["Tag"] == "Transcode"
    assert document.envelope == {
        "TopicOwner": 1250000000,
        "topicName": "ci-callbacks",
        "subscriptionName": "ci-receiver",
        "msgId": "9288918829234987",
        "publishTime": 1656574208,
    }


def test_cmq_envelope_around_json():
    inner = load("smartcover.json").decode()
    body = orjson.dumps({"topicName": "t", "msgId": "1", "msgBody": inner})
    document = decode(body)
    assert (document.format, document.envelope) == ("json", {"topicName": "t", "msgId": "1"})


@pytest.mark.parametrize(
    "envelope",
    [
        {"topicName": "t", "msgId": "1", "msgBody": 7},
        {
            "topicName": "t",
            "msgId": "1",
            "msgBody": '{"topicName": "t", "msgId": "2", "msgBody": "{}"}',
        },
    ],
)
def test_bad_cmq_envelopes(envelope):
    assert reason(orjson.dumps(envelope)) == "bad_envelope"


def test_cmq_envelope_with_an_undecodable_body_says_why():
    assert (
        reason(orjson.dumps({"topicName": "t", "msgId": "1", "msgBody": "nope"}))
        == "not_xml_or_json"
    )


# --- limits ----------------------------------------------------------------------------


def test_body_size_limit():
    body = load("transcode.xml")
    assert decode(body, limits=Limits(max_bytes=len(body))).format == "xml"
    assert reason(body, limits=Limits(max_bytes=len(body) - 1)) == "too_large"


def test_xml_depth_limit_counts_the_root():
    body = b"<a>" * 10 + b"x" + b"</a>" * 10
    assert decode(body, limits=Limits(max_depth=10)).data
    assert reason(body, limits=Limits(max_depth=9)) == "too_deep"


def test_xml_element_limit():
    body = b"<Response>" + b"<a/>" * 99 + b"</Response>"
    assert decode(body, limits=Limits(max_elements=100)).data
    assert reason(body, limits=Limits(max_elements=99)) == "too_many_elements"


def test_json_depth_limit():
    body = b'{"a":' * 9 + b"1" + b"}" * 9
    assert decode(body, limits=Limits(max_depth=10)).data
    assert reason(body, limits=Limits(max_depth=9)) == "too_deep"


def test_json_depth_beyond_what_orjson_could_serialize_again_is_refused():
    body = b'{"a":' * 300 + b"1" + b"}" * 300
    assert reason(body) == "too_deep"


def test_json_element_limit():
    body = orjson.dumps(
        {"JobsDetail": [{"JobId": str(n)} for n in range(40)]}
    )  # 1 + 1 + 40*2 values
    assert decode(body, limits=Limits(max_elements=82)).data
    assert reason(body, limits=Limits(max_elements=81)) == "too_many_elements"


def test_real_callbacks_fit_the_default_limits_with_room_to_spare():
    for name in (
        "transcode.xml",
        "superresolution_workflow.xml",
        "moderation_document_detail.json",
    ):
        decode(load(name), limits=Limits(max_depth=16, max_elements=500))
