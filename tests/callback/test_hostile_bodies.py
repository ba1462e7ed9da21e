"""XML bombs and other hostile bodies are refused with bounded memory.

Memory is measured with tracemalloc, which sees expat's allocations too (pyexpat
allocates through PyObject_Malloc). How fast each is refused is printed by
`python bench/parse.py`, not asserted here.
"""

from __future__ import annotations

import tracemalloc

import pytest

from receiver import PayloadError, parse_callback
from tests.support.hostile_bodies import (
    ATTRIBUTES,
    BILLION_LAUGHS,
    DEEP_JSON,
    DEEP_JSON_WITHIN_ORJSON,
    DEEP_XML,
    EXTERNAL_DTD,
    EXTERNAL_ENTITY,
    MANY_ATTRIBUTES,
    PARAMETER_ENTITY,
    QUADRATIC_BLOWUP,
    WIDE_JSON,
    WIDE_XML,
    MiB,
)


def peak_memory_of(body: bytes) -> tuple[str, int]:
    tracemalloc.start()
    try:
        parse_callback(body)
    except PayloadError as error:
        reason = error.reason
    else:
        reason = "accepted"
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return reason, peak


@pytest.mark.parametrize(
    ("body", "expected", "memory_bound"),
    [
        (BILLION_LAUGHS, "forbidden_xml", 256 * 1024),
        (EXTERNAL_ENTITY, "forbidden_xml", 256 * 1024),
        (EXTERNAL_DTD, "forbidden_xml", 256 * 1024),
        (PARAMETER_ENTITY, "forbidden_xml", 256 * 1024),
        (QUADRATIC_BLOWUP, "forbidden_xml", 2 * MiB),
        (DEEP_XML, "too_deep", 2 * MiB),
        (WIDE_XML, "too_many_elements", 16 * MiB),
        (ATTRIBUTES, "too_many_elements", 24 * MiB),
        (MANY_ATTRIBUTES, "too_many_elements", 8 * MiB),
        # orjson itself peaks near 10x the body when it gives up on depth.
        (DEEP_JSON, "malformed_json", 12 * MiB),
        (DEEP_JSON_WITHIN_ORJSON, "too_deep", 4 * MiB),
        (WIDE_JSON, "too_many_elements", 24 * MiB),
    ],
    ids=[
        "billion-laughs",
        "external-entity",
        "external-dtd",
        "parameter-entity",
        "quadratic-blowup",
        "deep-xml",
        "wide-xml",
        "attributes",
        "many-attributes",
        "deep-json",
        "deep-json-within-orjson",
        "wide-json",
    ],
)
def test_hostile_body_is_refused_within_a_memory_bound(body, expected, memory_bound):
    assert len(body) <= MiB
    reason, peak = peak_memory_of(body)
    assert reason == expected
    assert peak < memory_bound, f"peak {peak / MiB:.1f} MiB"


def test_a_body_over_the_size_limit_is_refused_before_parsing():
    reason, peak = peak_memory_of(b"<Response>" + b" " * (2 * MiB) + b"</Response>")
    assert reason == "too_large"
    assert peak < 64 * 1024
