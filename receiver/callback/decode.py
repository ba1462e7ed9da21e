"""Decode the bytes of a callback into a document: sniff, parse safely, unwrap envelopes.

Everything that can go wrong here is a `PayloadError` with a short machine-readable
`reason`; no other exception leaves `decode()`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from xml.parsers import expat

import orjson
import xmltodict

from receiver.callback import xml_fast

Format = Literal["xml", "json"]

_BOM = b"\xef\xbb\xbf"
_BLANK = b" \t\r\n"
# Keys of the JSON envelope a TDMQ-CMQ topic pushes to an HTTP subscription.
_CMQ_ENVELOPE_KEYS = frozenset({"msgBody", "msgId", "topicName"})


class PayloadError(Exception):
    """A callback body that cannot be turned into events.

    `reason` is stable and machine-readable (`empty`, `too_large`, `not_xml_or_json`,
    `malformed_xml`, `malformed_json`, `forbidden_xml`, `too_deep`, `too_many_elements`,
    `bad_envelope`, `unknown_shape`, `too_many_events`, `bad_id`); `message` is for humans.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds that keep a hostile body from costing more than a real callback."""

    max_bytes: int = 1024 * 1024
    max_depth: int = 64
    max_elements: int = 50_000
    max_events: int = 100


DEFAULT_LIMITS = Limits()


@dataclass(slots=True)
class Document:
    """A decoded callback: the document itself and what was learnt on the way."""

    data: dict[str, Any]
    format: Format
    # Set when the body was a TDMQ-CMQ push envelope: its metadata, without msgBody.
    envelope: dict[str, Any] | None = None
    # The X-Ci-Content-Version header of moderation callbacks (Simple / Detail).
    content_version: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


def decode(
    body: bytes, headers: Mapping[str, str] | None = None, limits: Limits = DEFAULT_LIMITS
) -> Document:
    """Turn a callback body into a `Document`, or raise `PayloadError`."""
    headers = _lower_keys(headers)
    data, fmt = _decode_body(body, limits)
    envelope = None
    if fmt == "json" and _is_cmq_envelope(data):
        envelope = {k: v for k, v in data.items() if k != "msgBody"}
        message = data["msgBody"]
        if not isinstance(message, str):
            raise PayloadError("bad_envelope", "the CMQ envelope's msgBody is not a string")
        data, fmt = _decode_body(message.encode(), limits)
        if fmt == "json" and _is_cmq_envelope(data):
            raise PayloadError("bad_envelope", "a CMQ envelope inside a CMQ envelope")
    if not isinstance(data, dict):
        raise PayloadError("unknown_shape", f"the document is a JSON {type(data).__name__}")
    return Document(
        data=data,
        format=fmt,
        envelope=envelope,
        content_version=headers.get("x-ci-content-version"),
        headers=headers,
    )


def _decode_body(body: bytes, limits: Limits) -> tuple[Any, Format]:
    if len(body) > limits.max_bytes:
        raise PayloadError("too_large", f"{len(body)} bytes, the limit is {limits.max_bytes}")
    if body.startswith(_BOM):
        body = body[len(_BOM) :]
    # An XML declaration must be the very first thing; blanks before it are forgiven.
    body = body.lstrip(_BLANK)
    start = body[:1]
    if not start:
        raise PayloadError("empty", "the body is empty")
    if start == b"<":
        return _parse_xml(body, limits), "xml"
    if start in (b"{", b"["):
        return _parse_json(body, limits), "json"
    raise PayloadError("not_xml_or_json", f"the body starts with {start!r}, not '<', '{{' or '['")


def _is_cmq_envelope(data: Any) -> bool:
    return isinstance(data, dict) and data.keys() >= _CMQ_ENVELOPE_KEYS


def _lower_keys(headers: Mapping[str, str] | None) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()} if headers else {}


# --- XML -------------------------------------------------------------------------------


def _parse_xml(body: bytes, limits: Limits) -> dict[str, Any]:
    try:
        parsed = _xml_to_dict(body, limits)
    except expat.ExpatError as exc:
        if exc.code != expat.errors.codes[expat.errors.XML_ERROR_JUNK_AFTER_DOC_ELEMENT]:
            raise PayloadError("malformed_xml", str(exc)) from None
        # Newer workflow docs show the callback without its <Response> root (several
        # top-level elements); read such a body as if it had one.
        try:
            parsed = _xml_to_dict(
                b"<Response>" + _strip_xml_declaration(body) + b"</Response>", limits
            )
        except expat.ExpatError:
            raise PayloadError("malformed_xml", str(exc)) from None
    root, value = next(iter(parsed.items()))
    if root == "Response":
        return value if isinstance(value, dict) else {}
    return {root: value}


def _xml_to_dict(body: bytes, limits: Limits) -> dict[str, Any]:
    fast = xml_fast.parse(body, limits.max_depth, limits.max_elements)
    if fast is not None:
        document, deepest = fast
    else:
        document, deepest = _xml_to_dict_guarded(body, limits)
    # An element is one level of the document, or two when it repeats (a list of dicts):
    # only a document whose elements nest past half the limit can be too deep. The
    # <Response> root, unwrapped afterwards, is counted too: the bound stays safe.
    if deepest > limits.max_depth // 2:
        _check_depth(document, limits.max_depth + 1, "XML")
    return document


def _xml_to_dict_guarded(body: bytes, limits: Limits) -> tuple[dict[str, Any], int]:
    """xmltodict itself, on a guarded expat: the reference, and the road for any body
    the fast one is not sure of (it gives every refusal)."""
    guard = _GuardedExpat(limits)
    try:
        document: dict[str, Any] = xmltodict.parse(body, expat=guard, disable_entities=True)
    except _Refused as exc:
        raise PayloadError(exc.reason, exc.message) from None
    except ValueError as exc:
        raise PayloadError("malformed_xml", str(exc)) from None
    return document, guard.deepest


def _strip_xml_declaration(body: bytes) -> bytes:
    if body.startswith(b"<?xml"):
        end = body.find(b"?>")
        return body[end + 2 :] if end != -1 else body
    return body


class _Refused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class _GuardedExpat:
    """Stands in for the `pyexpat` module in `xmltodict.parse`.

    Its parsers refuse any DOCTYPE (so no DTD, no entity, no external reference is ever
    read) and count elements and depth as they go, so that a hostile document is
    stopped at the first element past a limit instead of after it has been built.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.deepest = 0  # the deepest element nesting seen, once parsed

    def ParserCreate(self, *args: Any, **kwargs: Any) -> _GuardedParser:
        return _GuardedParser(expat.ParserCreate(*args, **kwargs), self.limits, self)


class _GuardedParser:
    """A pyexpat parser that refuses DTDs and counts elements and depth as it goes."""

    def __init__(self, parser: Any, limits: Limits, report: _GuardedExpat) -> None:
        parser.StartDoctypeDeclHandler = _refuse_doctype
        parser.EntityDeclHandler = _refuse_entity
        object.__setattr__(self, "_parser", parser)
        object.__setattr__(self, "_limits", limits)
        object.__setattr__(self, "_report", report)
        object.__setattr__(self, "_handlers", {})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("StartElementHandler", "EndElementHandler"):
            self._handlers[name] = value
            if len(self._handlers) == 2:
                self._install_counting_handlers(**self._handlers)
        elif name != "EntityDeclHandler":  # keep our refusal, xmltodict has its own
            setattr(self._parser, name, value)

    def _install_counting_handlers(
        self,
        StartElementHandler: Callable[..., Any],
        EndElementHandler: Callable[..., Any],
    ) -> None:
        # Counters live in closure cells: this runs for every element, and a cell is the
        # cheapest state Python has (the guard then costs a few percent of the parse).
        start, end = StartElementHandler, EndElementHandler
        max_depth, max_elements = self._limits.max_depth, self._limits.max_elements
        report = self._report
        depth = elements = 0

        def counted_start(name: str, attrs: Any) -> None:
            nonlocal depth, elements
            depth += 1
            # An attribute becomes a value of the document as an element does (xmltodict
            # gives them as a flat [name, value, ...] list).
            elements += 1 + len(attrs) // 2 if attrs else 1
            if depth > max_depth:
                raise _Refused("too_deep", f"XML nested deeper than {max_depth} levels")
            if elements > max_elements:
                raise _Refused(
                    "too_many_elements", f"more than {max_elements} XML elements and attributes"
                )
            if depth > report.deepest:
                report.deepest = depth
            start(name, attrs)

        def counted_end(name: str) -> None:
            nonlocal depth
            depth -= 1
            end(name)

        self._parser.StartElementHandler = counted_start
        self._parser.EndElementHandler = counted_end


def _refuse_doctype(*_: Any) -> None:
    raise _Refused("forbidden_xml", "a DOCTYPE declaration is not accepted")


def _refuse_entity(*_: Any) -> None:
    raise _Refused("forbidden_xml", "an XML entity declaration is not accepted")


# --- JSON ------------------------------------------------------------------------------


def _parse_json(body: bytes, limits: Limits) -> Any:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PayloadError("malformed_json", str(exc)) from None
    _check_json_bounds(body, data, limits)
    return data


def _check_depth(data: Any, max_depth: int, what: str) -> None:
    """Refuse a document nested deeper than `max_depth` containers (without recursion:
    that is what this guards against)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children: Any = value.values() if isinstance(value, dict) else value
        for child in children:
            if isinstance(child, (dict, list)) and child:
                if depth >= max_depth:
                    raise PayloadError(
                        "too_deep", f"{what} nested deeper than {max_depth - 1} levels"
                    )
                stack.append((child, depth + 1))


def _check_json_bounds(body: bytes, data: Any, limits: Limits) -> None:
    # Cheap upper bounds first: nesting cannot exceed the number of brackets, and there
    # cannot be more values than bytes, or than brackets + commas. Only a body that could
    # break a limit pays for the walk that measures it.
    containers = body.count(b"{") + body.count(b"[")
    if containers < limits.max_depth and (
        len(body) < limits.max_elements or containers + body.count(b",") < limits.max_elements
    ):
        return
    # Every value on the stack will be counted, so the walk stops before the stack itself
    # grows past the limit.
    seen = 0
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        seen += 1
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if not children:
            continue
        if depth >= limits.max_depth:
            raise PayloadError("too_deep", f"JSON nested deeper than {limits.max_depth} levels")
        if seen + len(stack) + len(children) > limits.max_elements:
            raise PayloadError("too_many_elements", f"more than {limits.max_elements} JSON values")
        stack.extend((child, depth + 1) for child in children)
