"""Whatever the bytes, parse_callback gives events that serialize, or a PayloadError."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from receiver import Event, PayloadError, parse_callback
from tests.support.callbacks import ALL, load

REAL = [load(name) for name in ALL]
JSON_DOCS = [
    orjson.loads(body) for body, name in zip(REAL, ALL, strict=True) if name.endswith(".json")
]
# ElementTree needs a single root; one published workflow sample has none.
ROOTED_XML_DOCS = [
    body for body, name in zip(REAL, ALL, strict=True) if body.lstrip().startswith(b"<Response")
]


def accepted_or_refused(body: bytes, headers: dict[str, str] | None = None) -> None:
    try:
        events = parse_callback(body, headers)
    except PayloadError as error:
        refusal = error
    else:
        refusal = None
    if refusal is not None:
        assert refusal.reason
        assert isinstance(refusal.message, str)
        return
    assert events
    for event in events:
        assert Event.from_json(event.to_json()) == event


@given(st.binary(max_size=2048))
def test_arbitrary_bytes(body):
    accepted_or_refused(body)


@given(
    st.sampled_from([b"<", b"{", b"[", b"<Response>", b'{"JobsDetail":']), st.binary(max_size=512)
)
def test_arbitrary_bytes_after_a_plausible_start(start, rest):
    accepted_or_refused(start + rest)


@st.composite
def mutated_callback(draw: st.DrawFn) -> bytes:
    body = bytearray(draw(st.sampled_from(REAL)))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(body)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if action == "flip" and position < len(body):
            body[position] = draw(st.integers(0, 255))
        elif action == "insert":
            body[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del body[position : position + draw(st.integers(1, 32))]
        else:
            del body[position:]
    return bytes(body)


@given(mutated_callback(), st.sampled_from([None, {"X-Ci-Content-Version": "Detail"}]))
def test_byte_mutations_of_real_callbacks(body, headers):
    accepted_or_refused(body, headers)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["", "-", "0", "Success", "2022-06-30T15:29:42+0800", "9" * 30]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += paths(child, (*prefix, index))
    return found


def replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: replaced(value[head], rest, new)}
    copy = list(value)
    copy[head] = replaced(copy[head], rest, new)
    return copy


@given(st.data())
def test_structure_mutations_of_real_json_callbacks(data):
    document = data.draw(st.sampled_from(JSON_DOCS))
    for _ in range(data.draw(st.integers(1, 4))):
        path = data.draw(st.sampled_from(paths(document)))
        document = replaced(document, path, data.draw(json_values))
    accepted_or_refused(json.dumps(document).encode())  # stdlib: it writes >64-bit ints too


xml_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=20)
CI_ELEMENT_NAMES = [
    "ObjectName",
    "ObjectPrefix",
    "OutputFile",
    "JobsDetail",
    "Tasks",
    "Input",
    "State",
]


@given(st.data())
def test_structure_mutations_of_real_xml_callbacks(data):
    root = ET.fromstring(data.draw(st.sampled_from(ROOTED_XML_DOCS)))
    elements = list(root.iter())
    for _ in range(data.draw(st.integers(1, 6))):
        target = data.draw(st.sampled_from(elements))
        action = data.draw(st.sampled_from(["text", "empty", "duplicate", "nest"]))
        if action == "text":
            target.text = data.draw(xml_text)
            del target[:]
        elif action == "empty":
            target.text = None
            del target[:]
        elif action == "duplicate":
            target.append(ET.fromstring(ET.tostring(data.draw(st.sampled_from(elements)))))
        else:
            target.append(ET.Element(data.draw(st.sampled_from(CI_ELEMENT_NAMES))))
    accepted_or_refused(ET.tostring(root))
