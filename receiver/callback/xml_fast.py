"""The fast road for XML callbacks: xmltodict-rs, taken only where its dict is xmltodict's.

`xmltodict_rs.parse` (Rust, quick-xml) builds the same dict as `xmltodict.parse` for the
documents CI sends, several times faster. It is not a drop-in for every document though:
quick-xml is lenient (it accepts control characters, bad names, `]]>` in text, text or a
second element after the root), reads only UTF-8, does not normalize line ends or
whitespace in attribute values, and strips each text chunk rather than an element's whole
text, and only ASCII whitespace. So `parse` below returns a document only when it can
show it is xmltodict's:

- expat itself, the same parser xmltodict drives, first reads the body without any Python
  callback (it costs a tenth of the Rust parse): whatever it refuses goes the slow road,
  so what is well-formed is decided exactly as before;
- bodies with a DOCTYPE, comment, CDATA section or processing instruction (`<!`, `<?`
  after the declaration), another declared encoding, or a NUL byte (UTF-16 by expat's
  autodetection) go the slow road;
- the dict is then walked once: an attribute value with a tab or line end, a text with
  whitespace at either end, or text beside child elements send the body the slow road.

`None` means "ask xmltodict": the caller's guarded xmltodict parse then gives the answer
(and the refusal, if any) it always gave. tests/callback/test_xml_parity.py holds the two to it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from types import ModuleType
from typing import Any
from xml.parsers import expat

# The module, or None where it has no wheel (and while `reference_only` holds).
xmltodict_rs: ModuleType | None
try:
    import xmltodict_rs
except ImportError:  # no wheel for this platform: xmltodict alone, as before
    xmltodict_rs = None

AVAILABLE = xmltodict_rs is not None


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """xmltodict alone, as where the xmltodict-rs wheel cannot be installed: for the
    differential tests and the benchmark that compare the two paths."""
    global xmltodict_rs
    saved, xmltodict_rs = xmltodict_rs, None
    try:
        yield
    finally:
        xmltodict_rs = saved


_UTF8_DECLARED = re.compile(rb"""encoding\s*=\s*["']utf-8["']""", re.IGNORECASE)


def parse(body: bytes, max_depth: int, max_elements: int) -> tuple[dict[str, Any], int] | None:
    """xmltodict's dict of `body` and how deep its elements nest, or None to ask xmltodict.

    A document is returned only if it is within both limits: an element and an attribute
    each need a `<` or a `=`, so their count bounds what the slow road would count.
    """
    if xmltodict_rs is None or body.count(b"<") + body.count(b"=") > max_elements:
        return None
    if b"\x00" in body:
        return None
    content = body
    if body.startswith(b"<?xml"):
        end = body.find(b"?>")
        if end == -1:
            return None
        declaration = body[:end]
        if b"encoding" in declaration and not _UTF8_DECLARED.search(declaration):
            return None
        content = body[end + 2 :]
    # One byte is found at memchr's speed, two (`<` is everywhere) many times slower.
    if (b"!" in content and b"<!" in content) or (b"?" in content and b"<?" in content):
        return None
    if b"\r" in body:  # XML's end-of-line handling, which quick-xml leaves out
        body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if not _well_formed(body):
        return None
    try:
        document: dict[str, Any] = xmltodict_rs.parse(body)
    except Exception:  # expat read it: this would be a quick-xml quirk, not the body's fault
        return None
    deepest = _depth_if_faithful(
        document, max_depth, not body.isascii() or (b"#" in body and b"&#" in body)
    )
    if deepest is None:
        return None
    return document, deepest


def _well_formed(body: bytes) -> bool:
    parser = expat.ParserCreate()
    # Unreachable after the `<!` check; kept so that no DTD is ever read here regardless.
    parser.StartDoctypeDeclHandler = _refuse
    try:
        parser.Parse(body, True)
    except (expat.ExpatError, _DoctypeSeen):
        return False
    return True


class _DoctypeSeen(Exception):
    pass


def _refuse(*_: Any) -> None:
    raise _DoctypeSeen


def _depth_if_faithful(document: dict[str, Any], max_depth: int, check_text: bool) -> int | None:
    """The depth of the deepest element, or None if the dict may not be xmltodict's or
    the elements nest deeper than `max_depth` (the slow road then says so, as before).

    `check_text`: whether a text may end in whitespace quick-xml keeps and xmltodict
    strips (only non-ASCII whitespace or a character reference can). Iterative: a body
    within the element bound may still nest thousands deep.
    """
    deepest = 0
    # (a dict, the depth of the element it stands for: 0 for the document)
    stack: list[tuple[dict[str, Any], int]] = [(document, 0)]
    push, pop = stack.append, stack.pop
    while stack:
        item, level = pop()
        depth = level + 1
        text = children = False
        for key, value in item.items():
            kind = type(value)
            if kind is str:
                first = key[0]  # "@" or "#" (of "#text") cannot start an element's name
                if first == "@":
                    # xmltodict (expat) turns a literal tab or line end into a space there.
                    if "\t" in value or "\n" in value or "\r" in value:
                        return None
                    continue
                if first == "#":
                    text = True
                else:
                    children = True
                if check_text and _edged(value):
                    return None
            elif kind is dict:
                children = True
                push((value, depth))
            elif kind is list:  # a repeated element
                children = True
                for element in value:
                    if type(element) is dict:
                        push((element, depth))
                    elif check_text and element is not None and _edged(element):
                        return None
            else:  # None: an empty element
                children = True
        if children and depth > deepest:
            if depth > max_depth:
                return None
            deepest = depth
        # Text beside child elements: xmltodict strips the text as a whole, quick-xml
        # each piece between the children.
        if text and children:
            return None
    return deepest


def _edged(text: str) -> bool:
    return not text or text[0].isspace() or text[-1].isspace()
