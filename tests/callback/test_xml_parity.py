"""xmltodict-rs (the fast road) gives xmltodict's dict, or leaves the body to xmltodict.

Every comparison is of the whole outcome of `decode`: the document, or the refusal's
reason and message, with the fast road and with xmltodict alone (as on a platform
without the xmltodict-rs wheel). The fast road must also be the one taken for the
documents CI sends, or none of this would pay.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import xmltodict
import xmltodict_rs  # a dependency wherever a wheel exists: its absence is a failure here
from hypothesis import example, given
from hypothesis import strategies as st

from receiver.callback import xml_fast
from receiver.callback.decode import DEFAULT_LIMITS, Limits, PayloadError, decode
from tests.support import hostile_bodies as hostile
from tests.support.callbacks import XML, ci_json_from_xml, load

NAMED = ("amp", "lt", "gt", "quot", "apos")
LIMITS = [DEFAULT_LIMITS, Limits(max_depth=6, max_elements=40)]


def outcome(body: bytes, limits: Limits) -> tuple[str, Any]:
    try:
        return "accepted", decode(body, limits=limits).data
    except PayloadError as error:
        return "refused", (error.reason, error.message)


def assert_same(body: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[str, Any]:
    fast = outcome(body, limits)
    with xml_fast.reference_only():
        reference = outcome(body, limits)
    assert fast == reference
    if fast[0] == "accepted":  # the same keys in the same order, as stored and shown
        assert list(_keys(fast[1])) == list(_keys(reference[1]))
    taken = xml_fast.parse(body, limits.max_depth, limits.max_elements)
    if taken is not None:
        # What the fast road accepts, xmltodict accepts as the same dict and depth.
        document, deepest = taken
        assert document == xmltodict.parse(body)
        assert deepest <= limits.max_depth
    return fast


def _keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, child in value.items():
            yield key
            yield from _keys(child)
    elif isinstance(value, list):
        for child in value:
            yield from _keys(child)


# --- the fixtures and the hostile bodies ------------------------------------------------


@pytest.mark.parametrize("name", XML)
def test_every_xml_fixture_takes_the_fast_road_to_the_same_dict(name):
    body = load(name)
    assert assert_same(body)[0] == "accepted"
    rooted = body if body.startswith(b"<Response") else b"<Response>" + body + b"</Response>"
    assert xml_fast.parse(rooted, 64, 50_000) is not None, "the fast road was not taken"


def test_the_cmq_fixture_and_the_json_renderings_are_untouched():
    assert_same(load("cmq_envelope_transcode.json"))
    for name in XML:
        assert_same(ci_json_from_xml(load(name)))


@pytest.mark.parametrize(
    "name",
    [
        "BILLION_LAUGHS",
        "EXTERNAL_ENTITY",
        "EXTERNAL_DTD",
        "PARAMETER_ENTITY",
        "QUADRATIC_BLOWUP",
        "DEEP_XML",
        "WIDE_XML",
        "ATTRIBUTES",
        "MANY_ATTRIBUTES",
    ],
)
def test_hostile_bodies_are_refused_alike_and_never_by_the_fast_road(name):
    body = getattr(hostile, name)
    assert assert_same(body)[0] == "refused"
    assert xml_fast.parse(body, 64, 50_000) is None


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"<a>\x01</a>", "a control character quick-xml lets through"),
        (b"<1a>x</1a>", "a name quick-xml lets through"),
        (b"<a>x]]>y</a>", "`]]>` in text"),
        (b"<a><#text>1</#text></a>", "a name that would be xmltodict's own key"),
        (b"<a/>junk", "text after the root"),
        (b"<a/><b/>", "two roots: read as if in a <Response>"),
        (b"<a>1</a><a>2</a>", "a repeated root"),
        (b"<a>x</a>junk<a>y</a>", "text between roots"),
        (b"<a x='1' x='2'/>", "a duplicate attribute"),
        (b"<a>&undefined;</a>", "an undefined entity"),
        (b"<a>&#0;</a>", "a reference to NUL"),
        (b"<!DOCTYPE a><a/>", "a DOCTYPE without entities"),
        (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "x">]><r>&a;</r>', "an entity"),
        (b"<a>a\r\nb\rc</a>", "line ends"),
        (b"<a b='x\r\ny\tz'/>", "whitespace in an attribute value"),
        (b"<a b='x&#10;y&#9;z'/>", "referenced whitespace in an attribute value"),
        (b"<a>\xc2\xa0x\xe3\x80\x80</a>", "Unicode whitespace xmltodict strips"),
        (b"<a>&#9;x&#32;</a>", "referenced whitespace xmltodict strips"),
        (b"<a> x <b/> y </a>", "text beside elements"),
        (b"<a>x <!--c--> y</a>", "a comment inside text"),
        (b"<a>x <?p i?> y</a>", "a processing instruction inside text"),
        (b"<a>x <![CDATA[ y ]]> z</a>", "CDATA inside text"),
        (b"<a><![CDATA[ <x> ]]></a>", "CDATA"),
        (b'<?xml version="1.0" encoding="ISO-8859-1"?><a>caf\xc3\xa9</a>', "Latin-1, UTF-8-like"),
        (b'<?xml version="1.0" encoding="ISO-8859-1"?><a>caf\xe9</a>', "Latin-1"),
        ("<a>é</a>".encode("utf-16-le"), "UTF-16 without a BOM"),
        (b"<a xmlns='u' xmlns:p='v'><p:b p:c='1'/></a>", "namespaces, not processed"),
        (b"<p:a/>", "an unbound prefix (no namespace processing)"),
        (b"<a>&amp;&#45;&lt;&#x41;&gt;&quot;&apos;</a>", "references"),
        (b"<a>\xf0\x9f\x98\x80 \xe4\xb8\xad</a>", "unicode"),
        (b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<a>x</a>', "declared"),
        (b"<a><b/><b></b><b>1</b></a>", "empty elements repeated"),
        (b"<a b='1'>t</a>", "text beside an attribute"),
    ],
)
def test_what_sets_the_two_apart_leaves_the_body_to_xmltodict(body, why):
    assert_same(body)
    assert_same(body, Limits(max_depth=2, max_elements=3))


# --- generated documents ----------------------------------------------------------------

names = st.sampled_from(["a", "b", "JobsDetail", "p:x", "中", "_z.-1"])
attribute_names = st.sampled_from(["x", "y", "xmlns", "xmlns:p", "p:q", "xml:lang"])
plain_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"], exclude_characters="<&]"),
    max_size=12,
)
# Characters XML allows, and the whitespace ones it does among the controls.
referable = st.one_of(
    st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]).map(ord),
    st.sampled_from([9, 10, 13, 32, 0xA0, 0x3000]),
)
references = st.one_of(
    st.sampled_from([f"&{name};" for name in NAMED]),
    referable.map(lambda n: f"&#{n};"),
    referable.map(lambda n: f"&#x{n:X};"),
)
text_pieces = st.one_of(
    plain_text,
    references,
    st.sampled_from([" ", "\n", "\t", "\r\n", "\r", "\xa0", "\u3000", "  "]),
    plain_text.map(lambda text: f"<![CDATA[{text}]]>"),
    st.sampled_from(["<!-- c -->", "<?pi x?>"]),
)
texts = st.lists(text_pieces, max_size=4).map("".join)
# Text as CI writes it: what the fast road is for.
plain_texts = st.lists(st.one_of(plain_text, references), max_size=3).map(
    lambda pieces: "".join(pieces).strip()
)
attribute_values = st.lists(
    st.one_of(plain_text.map(lambda t: t.replace('"', "")), references, st.just("\t\n")),
    max_size=3,
).map("".join)


@st.composite
def elements(draw: st.DrawFn, text: st.SearchStrategy[str], depth: int = 0) -> str:
    name = draw(names)
    attributes = draw(st.dictionaries(attribute_names, attribute_values, max_size=2))
    rendered = "".join(f' {key}="{value}"' for key, value in attributes.items())
    if depth >= 4 or draw(st.integers(0, 4)) == 0:
        if draw(st.booleans()):
            return f"<{name}{rendered}/>"
        return f"<{name}{rendered}>{draw(text)}</{name}>"
    content = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 3)) == 0:
            content.append(draw(text))
        # Repeating the same child makes lists; whitespace between them is what CI sends.
        child = draw(elements(text, depth + 1))
        content.append(child * draw(st.integers(1, 2)))
        content.append(draw(st.sampled_from(["", "\n  ", " "])))
    return f"<{name}{rendered}>{''.join(content)}</{name}>"


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    declaration = draw(
        st.sampled_from(
            [
                "",
                '<?xml version="1.0"?>\n',
                '<?xml version="1.0" encoding="UTF-8"?>\n',
                "<?xml version='1.0' encoding='utf-8' standalone='yes'?>",
                '<?xml version="1.0" encoding="ISO-8859-1"?>',
                "<!-- a comment before the root -->",
            ]
        )
    )
    root = draw(elements(draw(st.sampled_from([texts, plain_texts, plain_texts, plain_texts]))))
    after = draw(st.sampled_from(["", "", "\n", "\n", "<!-- c -->", root, "junk"]))
    text = declaration + root + after
    encoding = "latin-1" if "ISO-8859-1" in declaration else "utf-8"
    body = text.encode(encoding, errors="xmlcharrefreplace")
    return draw(st.sampled_from([b"", b"\xef\xbb\xbf", b"\n "])) + body


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A document with a byte inserted, changed or cut: well-formed or not, the same."""
    body = bytearray(draw(documents()))
    position = draw(st.integers(0, len(body)))
    byte = draw(
        st.sampled_from([b"<", b">", b"/", b"&", b";", b"\x00", b"\x01", b"]", b" ", b"&#1;"])
    )
    action = draw(st.sampled_from(["insert", "replace", "cut"]))
    if action == "insert":
        body[position:position] = byte
    elif action == "replace":
        body[position : position + 1] = byte
    else:
        del body[position:]
    return bytes(body)


@given(documents(), st.sampled_from(LIMITS))
@example(b"<a>1<b/>2<b/>3</a>", DEFAULT_LIMITS)
def test_generated_documents_give_the_same_dict_or_refusal(body, limits):
    assert_same(body, limits)


@given(mutated(), st.sampled_from(LIMITS))
def test_broken_documents_give_the_same_refusal(body, limits):
    assert_same(body, limits)


@st.composite
def callback_like(draw: st.DrawFn, depth: int = 0) -> str:
    """Documents shaped as CI sends them: elements, text, no attributes, no mixed text."""
    name = draw(st.sampled_from(["Response", "JobsDetail", "Code", "Input", "中文"]))
    if depth >= 4 or draw(st.booleans()):
        text = draw(
            st.text(
                st.characters(codec="utf-8", exclude_categories=["Cs", "Cc", "Zs", "Zl", "Zp"]),
                max_size=12,
            )
        )
        escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return f"<{name}>{escaped}</{name}>"
    children = draw(st.lists(callback_like(depth + 1), max_size=4))
    inside = "".join(f"\n  {child}" for child in children)
    return f"<{name}>{inside}\n</{name}>"


@given(callback_like())
def test_documents_shaped_as_ci_sends_them_take_the_fast_road(text):
    body = text.encode()
    assert_same(body)
    assert xml_fast.parse(body, 64, 50_000) is not None


def test_nesting_within_the_element_bound_is_refused_as_too_deep_by_either_road():
    body = b"<a>" * 20_000 + b"x" + b"</a>" * 20_000
    assert xml_fast.parse(body, 64, 50_000) is None
    assert assert_same(body) == ("refused", ("too_deep", "XML nested deeper than 64 levels"))


@pytest.mark.parametrize("repeated", [False, True])
def test_the_depth_limit_is_met_exactly_on_both_roads(repeated):
    for levels in range(1, 12):
        opening = b"".join(b"<a><a/>" if repeated else b"<a>" for _ in range(levels))
        body = opening + b"x" + b"</a>" * levels
        for max_depth in range(1, 14):
            assert_same(body, Limits(max_depth=max_depth))


def test_the_accelerated_parser_is_the_one_installed():
    assert xml_fast.AVAILABLE
    assert xml_fast.xmltodict_rs is xmltodict_rs
