"""Fuzzing the HTTP receiver as a process: whatever bytes a client sends, the answer is a
well-formed HTTP response with a status the API documents (never a 500), or a closed
connection; the process never logs an unhandled error, and keeps taking callbacks.

Bounded for CI by the hypothesis profile (tests/conftest.py); `HYPOTHESIS_PROFILE=deep`
runs it much longer. The decoding itself is fuzzed in tests/callback/test_properties.py.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.callbacks import ALL, load
from tests.support.processes import Receiver

TOKEN = "fuzz-token-1"
DOCUMENTED = {200, 400, 401, 404, 405, 408, 413, 431}
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


@pytest.fixture(scope="module")
def receiver(tmp_path_factory) -> Receiver:
    folder: Path = tmp_path_factory.mktemp("fuzz")
    config = folder / "ci-receiver.toml"
    config.write_text(
        f"""
data_dir = "{folder / "data"}"
[http]
tokens = ["{TOKEN}"]
auth_failures_per_minute = 0
header_timeout = 0.3
body_timeout = 0.3
keepalive_timeout = 0.1
max_header_bytes = 4096
[limits]
max_bytes = 20000
[handlers.log]
type = "log"
"""
    )
    process = Receiver(config).start()
    yield process
    process.stop()


token = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)
methods = st.sampled_from([b"POST", b"GET", b"PUT", b"HEAD", b"OPTIONS", b"P\x00ST"]) | token.map(
    str.encode
)
paths = st.sampled_from(
    [
        b"/callbacks",
        f"/callbacks/{TOKEN}".encode(),
        b"/callbacks/wrong",
        b"/healthz",
        b"/readyz",
        b"/metrics",
        b"//callbacks",
        b"/callbacks/%00",
        b"/callbacks?x=1",
        b"*",
        b"/" + b"a" * 5000,
    ]
) | st.binary(max_size=40)
versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9", b""])
header_names = st.sampled_from(
    [
        b"Content-Length",
        b"Transfer-Encoding",
        b"Content-Type",
        b"Expect",
        b"Connection",
        b"Host",
        b"X-Forwarded-For",
        b"Authorization",
        b"X-Request-Id",
        b"X-Ci-Content-Version",
    ]
) | st.binary(min_size=1, max_size=12)
header_values = st.sampled_from(
    [
        b"0",
        b"10",
        b"-1",
        b"99999999999999999999",
        b"chunked",
        b"chunked, gzip",
        b"100-continue",
        b"close",
        b"keep-alive",
        b"application/xml",
        b"Basic !!",
        b"Detail",
    ]
) | st.binary(max_size=30)
bodies = st.sampled_from([load(name) for name in ALL]) | st.binary(max_size=300)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    line = draw(methods) + b" " + draw(paths) + b" " + draw(versions) + b"\r\n"
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=8))
    body = draw(bodies)
    if draw(st.booleans()):
        headers.append((b"Content-Length", str(len(body)).encode()))
    if draw(st.booleans()):  # chunked, maybe wrongly
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = b"%x\r\n" % len(body) + body + draw(st.sampled_from([b"\r\n0\r\n\r\n", b"", b"x"]))
    head = line + b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    request = head + b"\r\n" + body
    cut = draw(st.none() | st.integers(0, len(request)))
    return request[:cut] + draw(st.sampled_from([b"", request]))  # cut short, or pipelined


def exchange(receiver: Receiver, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as sock:
        try:
            sock.sendall(request)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            received = b""  # refused outright (only a past-the-cap client may see this)
    return received


@given(requests())
def test_any_request_gets_a_documented_answer_or_a_closed_connection(receiver, request):
    answer = exchange(receiver, request)
    statuses = {int(code) for code in STATUS_LINE.findall(answer)}
    assert answer == b"" or statuses, answer[:200]
    assert statuses <= DOCUMENTED, answer[:300]


def test_after_the_fuzzing_the_receiver_takes_callbacks_and_logged_no_error(receiver):
    answer = receiver.post(load("smartcover.xml"), path=f"/callbacks/{TOKEN}")
    assert answer.status_code == 200
    log = receiver.log()
    assert "Exception in ASGI application" not in log
    assert "Traceback" not in log
    assert '"level":"error"' not in log
