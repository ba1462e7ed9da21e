"""The callback fixtures, and CI's XML -> JSON mapping. They are under
tests/fixtures/callbacks, and under receiver/testing/samples those that the handler test
kit ships (one copy of each, read from where it is)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import orjson

FIXTURES = Path(__file__).parents[1] / "fixtures" / "callbacks"
SAMPLES = Path(__file__).parents[2] / "receiver" / "testing" / "samples"
FOLDERS = (FIXTURES, SAMPLES)
ALL = sorted(p.name for f in FOLDERS for p in f.iterdir() if p.suffix in (".xml", ".json"))
XML = [name for name in ALL if name.endswith(".xml")]


def path(name: str) -> Path:
    """Where the fixture `name` is."""
    found = [folder / name for folder in FOLDERS if (folder / name).exists()]
    if not found:
        raise FileNotFoundError(f"no callback fixture {name!r}")
    return found[0]


def load(name: str) -> bytes:
    return path(name).read_bytes()


def ci_json_from_xml(body: bytes) -> bytes:
    """Render an XML callback as CI renders it in JSON (see ci-callbacks.md §1.2-1.3).

    Written on ElementTree, independently of receiver.callback.decode: every scalar is a string,
    an element repeated becomes a list, an element present once stays a scalar or an
    object, empty elements are left out, and there is no `Response` wrapper.
    """
    text = body.decode()
    try:
        root = ET.fromstring(text)
    except ET.ParseError:  # the workflow sample published without a root
        root = ET.fromstring(f"<Response>{text}</Response>")
    converted = _convert(root)
    document = converted if root.tag == "Response" else {root.tag: converted}
    return json.dumps(document or {}, ensure_ascii=False, indent=2).encode()


def _convert(element: ET.Element) -> Any:
    children = list(element)
    if not children:
        value = (element.text or "").strip()
        return value or None
    result: dict[str, Any] = {}
    for child in children:
        value = _convert(child)
        if value is None:
            continue
        if child.tag in result:
            previous = result[child.tag]
            result[child.tag] = (
                [*previous, value] if isinstance(previous, list) else [previous, value]
            )
        else:
            result[child.tag] = value
    return result or None


def job(job_id: str, state: str = "Success", tag: str = "Transcode", key: str = "in.mp4") -> bytes:
    """A JSON job callback as small as CI sends one: what filters and lists are about."""
    return orjson.dumps(
        {
            "EventName": "TaskFinish",
            "JobsDetail": {
                "JobId": job_id,
                "State": state,
                "Tag": tag,
                "Input": {"BucketId": "media-1250000000", "Region": "ap-guangzhou", "Object": key},
            },
        }
    )
