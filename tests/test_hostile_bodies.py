"""XML bombs and other hostile bodies are refused with bounded memory.

Memory is measured with tracemalloc, which sees expat's allocations too (pyexpat
allocates through PyObject_Malloc). How fast each is refused is printed by
`python bench/parse.py`, not asserted here.
"""

from __future__ import annotations

import tracemalloc

import pytest

from receiver import PayloadError, parse_callback

MiB = 1024 * 1024

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<Response><EventName>&lol9;</EventName></Response>"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<Response><EventName>&xxe;</EventName></Response>"""

EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE Response SYSTEM "http://127.0.0.1:9/evil.dtd">
<Response><EventName>TaskFinish</EventName></Response>"""

PARAMETER_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY % p SYSTEM "http://127.0.0.1:9/p.dtd"> %p;]>
<Response/>"""

QUADRATIC_BLOWUP = (
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "'
    + b"x" * 100_000
    + b'">]><Response><EventName>'
    + b"&a;" * 200_000
    + b"</EventName></Response>"
)[: MiB - 1]

DEEP_XML = (b"<a>" * (MiB // 7) + b"</a>" * (MiB // 7))[:MiB]
WIDE_XML = b"<Response>" + b"<a/>" * ((MiB - 30) // 4) + b"</Response>"
# One element with as many attributes as fit: expat reads them all before the guard
# sees the element, so this one costs more than the others (and is still bounded).
ATTRIBUTES = b"<Response><a " + b" ".join(b'x%d="1"' % i for i in range(200_000))
ATTRIBUTES = ATTRIBUTES[: ATTRIBUTES.rfind(b" ", 0, MiB - 20)] + b"/></Response>"
MANY_ATTRIBUTES = b"<Response>" + b'<a x="1" y="2" z="3"/>' * ((MiB - 30) // 22) + b"</Response>"
DEEP_JSON = b'{"a":' * (MiB // 6)
DEEP_JSON_WITHIN_ORJSON = b"[" * 1000 + b"]" * 1000
WIDE_JSON = b"[" + b"0," * ((MiB - 4) // 2) + b"0]"


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
