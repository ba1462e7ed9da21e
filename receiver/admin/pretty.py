"""A stored callback's bytes as text a person can read: XML and JSON indented, anything
else as it is (bad UTF-8 replaced). The result is text for a page to escape; what could
not be indented is shown as it came."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import orjson

# Past this, indenting costs more than it helps: shown as it came.
MAX_PRETTY_BYTES = 2 << 20


def pretty(body: bytes) -> str:
    start = body.lstrip()[:1]
    if len(body) <= MAX_PRETTY_BYTES:
        if start in (b"{", b"["):
            try:
                return orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode()
            except orjson.JSONDecodeError:
                pass
        elif start == b"<" and b"<!doctype" not in body.lower():
            # Stored callbacks passed the decoder, which refuses any DOCTYPE (so no entity
            # can expand here): checked again all the same.
            indented = _indented_xml(body)
            if indented is not None:
                return indented
    return body.decode("utf-8", "replace")


def _indented_xml(body: bytes) -> str | None:
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode")
