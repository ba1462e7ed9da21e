"""Bounded requests and connections, against `ci-receiver serve` as a process, with raw
sockets playing the abusive clients: huge and numerous headers, slow heads and bodies,
silent and idle connections, too many connections or requests, a body over the limit,
and a process with few descriptors."""

from __future__ import annotations

import contextlib
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import psutil
import pytest

from receiver.sources.http_server import LINGER_BYTES, MAX_PIPELINED
from tests.support.callbacks import load
from tests.support.processes import Receiver
from tests.support.waiting import wait_until

HEAD = b"POST /callbacks HTTP/1.1\r\nHost: test\r\nContent-Type: application/xml\r\n"


def serve(tmp_path: Path, http: str = "", *, open_files: int | None = None, **limits) -> Receiver:
    config = tmp_path / "ci-receiver.toml"
    extra = "".join(f"{key} = {value}\n" for key, value in limits.items())
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[http]\n{http}\n{extra}[handlers.log]\ntype = "log"\n'
    )
    return Receiver(config).start(open_files=open_files)


def connect(receiver: Receiver) -> socket.socket:
    return socket.create_connection(("127.0.0.1", receiver.port), timeout=10)


def send_until_closed(sock: socket.socket, chunk: bytes, most: int) -> int:
    """Send `chunk` over and over until the server closes (or `most` bytes); how much."""
    sent = 0
    try:
        while sent < most:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    return sent


def answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def memory(receiver: Receiver) -> int:
    """The receiver process's resident memory, in bytes."""
    return psutil.Process(receiver.process.pid).memory_info().rss


def refused_metric(receiver: Receiver, reason: str) -> float:
    text = httpx.get(receiver.admin_url + "/metrics").text
    prefix = f'ci_receiver_http_refused_total{{reason="{reason}",server="public"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.removeprefix(prefix))
    return 0.0


@pytest.fixture
def receiver(tmp_path):
    process = serve(tmp_path, header_timeout=1, body_timeout=1, keepalive_timeout=0.5)
    yield process
    process.stop()


def test_a_huge_header_is_refused_while_it_arrives_and_costs_no_memory(receiver):
    rss_before = memory(receiver)
    sock = connect(receiver)
    sock.sendall(HEAD + b"User-Agent: ")
    # Refused at 16 KiB of head; what comes after is read and dropped (LINGER_BYTES at
    # most) so that the client can read its 431, then the server closes.
    sent = send_until_closed(sock, b"a" * 65536, 100 * 2**20)
    assert sent < LINGER_BYTES + 8 * 2**20
    assert status(answer(sock)) == 431
    assert memory(receiver) - rss_before < 16 * 2**20
    assert receiver.post(load("transcode.xml")).status_code == 200
    assert refused_metric(receiver, "headers_too_large") == 1


def test_too_many_headers_get_431_before_the_body_is_read(receiver):
    sock = connect(receiver)
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    sock.sendall(HEAD + headers + b"Content-Length: 100000000\r\n\r\n")
    response = answer(sock)  # not one byte of the body was sent
    assert status(response) == 431
    assert b'"error":"headers_too_large"' in response


def test_slow_heads_silent_and_idle_connections_are_closed(receiver):
    slow = [connect(receiver) for _ in range(30)]
    silent = [connect(receiver) for _ in range(30)]
    began = time.monotonic()
    for sock in slow:
        sock.sendall(HEAD + b"X-Slow: ")
    for _ in range(5):  # a byte now and then, never the end of the head: slowloris
        time.sleep(0.3)
        for sock in slow:
            with contextlib.suppress(OSError):
                sock.send(b"a")
        assert receiver.post(load("transcode.xml")).status_code == 200  # others are served
    assert {status(answer(sock)) for sock in slow} == {408}
    assert {answer(sock) for sock in silent} == {b""}
    assert time.monotonic() - began < 5
    # Keep-alive: a connection left idle after its answer is closed (keepalive_timeout).
    idle = connect(receiver)
    body = load("smartcover.xml")
    idle.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    response = answer(idle)  # the answer, then the end of the connection
    assert status(response) == 200
    assert b"connection: close" not in response.lower()
    assert refused_metric(receiver, "header_timeout") == 30
    assert refused_metric(receiver, "idle_connection") == 30


def test_a_slow_body_is_cut_off_with_408(receiver, tmp_path):
    sock = connect(receiver)
    sock.sendall(HEAD + b"Content-Length: 1000\r\n\r\n<Response>")
    began = time.monotonic()
    response = answer(sock)
    assert status(response) == 408
    assert time.monotonic() - began < 4
    assert receiver.post(load("transcode.xml")).status_code == 200
    assert refused_metric(receiver, "body_timeout") == 1


def test_connections_past_the_cap_get_503_and_retry_after_and_then_it_recovers(tmp_path):
    receiver = serve(tmp_path, max_connections=20)
    try:
        held = [connect(receiver) for _ in range(20)]
        time.sleep(0.2)
        extra = connect(receiver)
        extra.sendall(HEAD + b"Content-Length: 0\r\n\r\n")
        response = answer(extra)
        assert status(response) == 503
        assert b"retry-after: 1\r\n" in response.lower()
        receiver.wait_for_log('"reason":"too_many_connections"')
        for sock in held:
            sock.close()
        wait_until(
            lambda: receiver.post(load("transcode.xml")).status_code == 200, what="recovered"
        )
    finally:
        receiver.stop()


def test_requests_past_the_cap_in_flight_get_503_and_retry_after(tmp_path):
    receiver = serve(tmp_path, max_requests=2)
    try:
        # Two requests in the app, waiting for the rest of their bodies.
        waiting = [connect(receiver) for _ in range(2)]
        for sock in waiting:
            sock.sendall(HEAD + b"Content-Length: 100\r\n\r\n<Response>")
        time.sleep(0.3)
        busy = receiver.post(load("transcode.xml"))
        assert busy.status_code == 503
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"] == "busy"
        for sock in waiting:
            sock.close()
        wait_until(lambda: receiver.post(load("transcode.xml")).status_code == 200, what="served")
        assert refused_metric(receiver, "too_many_requests") == 1
    finally:
        receiver.stop()


def test_large_bodies_in_progress_are_capped_apart(tmp_path):
    receiver = serve(tmp_path, max_large_requests=1)
    large = load("transcode.xml").replace(
        b"</JobsDetail>", b"<Pad>" + b"x" * 100_000 + b"</Pad></JobsDetail>"
    )
    try:
        slow = connect(receiver)  # a large body on its way, holding the one slot
        slow.sendall(HEAD + b"Content-Length: 200000\r\n\r\n" + b"<" * 1000)
        time.sleep(0.3)
        refused = receiver.post(large)
        assert (refused.status_code, refused.json()["error"]) == (503, "busy")
        assert refused.headers["retry-after"] == "1"
        assert receiver.post(load("transcode.xml")).status_code == 200  # small ones go on
        slow.close()
        wait_until(lambda: receiver.post(large).status_code == 200, what="the slot back")
    finally:
        receiver.stop()


@pytest.mark.parametrize("size", [5_000, 2 * 2**20])
def test_a_body_over_the_limit_reads_its_413_not_a_reset(tmp_path, size):
    receiver = serve(tmp_path)
    receiver.stop()
    config = tmp_path / "ci-receiver.toml"
    config.write_text(config.read_text() + "[limits]\nmax_bytes = 1000\n")
    receiver = Receiver(config).start()
    try:
        # urllib sends Content-Length and Connection: close, writes the whole body, and
        # only then reads: the server must keep reading until it has.
        request = urllib.request.Request(receiver.url + "/callbacks", data=b"<" * size)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 413
        assert b'"too_large"' in refused.value.read()
    finally:
        receiver.stop()


def test_few_descriptors_lower_the_cap_and_the_receiver_keeps_answering(tmp_path):
    receiver = serve(tmp_path, open_files=256)
    try:
        receiver.wait_for_log('"event":"open files limit"')
        receiver.wait_for_log("http.max_connections lowered to fit the open files limit")
        flood = []
        for _ in range(400):
            try:
                flood.append(connect(receiver))
            except OSError:
                break
        time.sleep(0.5)
        process = psutil.Process(receiver.process.pid)
        assert process.num_fds() < 256
        receiver.wait_for_log('"reason":"too_many_connections"')
        for sock in flood:
            sock.close()
        wait_until(
            lambda: receiver.post(load("transcode.xml")).status_code == 200, what="answering"
        )
    finally:
        receiver.stop()


def responses(received: bytes) -> list[int]:
    """The statuses of the responses in `received`, in order (each status line follows
    the body before it)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)]


def test_honest_pipelined_callbacks_are_each_answered_in_order(receiver):
    sock = connect(receiver)
    bodies = [load("smartcover.xml"), load("transcode.xml")]
    sock.sendall(b"".join(
        HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body for body in bodies
    ) + b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")  # fmt: skip
    received = answer(sock)
    assert responses(received) == [200, 200, 200]
    assert received.count(b'"accepted":1') == 2


def test_a_flood_of_pipelined_requests_is_cut_off_and_costs_no_memory(receiver):
    rss_before = memory(receiver)
    sock = connect(receiver)
    flood = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" * 30_000  # ~1 MB, tiny requests
    with contextlib.suppress(OSError):
        sock.sendall(flood)
    received = b""
    with contextlib.suppress(ConnectionResetError):  # closed with the flood unread
        while chunk := sock.recv(65536):
            received += chunk
    answered = responses(received)
    assert set(answered) <= {200}
    assert len(answered) <= 1 + MAX_PIPELINED  # then the connection was closed
    assert memory(receiver) - rss_before < 16 * 2**20
    assert receiver.post(load("transcode.xml")).status_code == 200
    assert refused_metric(receiver, "too_many_pipelined") == 1


def test_a_head_pipelined_behind_a_request_is_bounded_as_any(receiver):
    sock = connect(receiver)
    # A head begun behind a request in one write, then a header value without end.
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" + HEAD + b"User-Agent: ")
    sent = send_until_closed(sock, b"a" * 65536, 100 * 2**20)
    assert sent < LINGER_BYTES + 8 * 2**20
    answered = responses(answer(sock))
    assert answered[:1] == [200]
    assert answered[1:] in ([], [431])
    assert receiver.post(load("transcode.xml")).status_code == 200


def test_a_pipelined_body_that_never_comes_is_cut_off_with_408(receiver):
    sock = connect(receiver)
    body = load("smartcover.xml")
    sock.sendall(
        HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body
        + HEAD + b"Content-Length: 1000\r\n\r\n<Response>"
    )  # fmt: skip
    began = time.monotonic()
    assert responses(answer(sock)) == [200, 408]
    assert time.monotonic() - began < 4


def test_header_values_with_trailing_blanks_read_as_without(receiver):
    # `Expect: 100-continue ` still gets its 100 Continue before the body is sent, and
    # `Content-Length: N ` is the declared length (RFC 9110: trailing blanks are no part
    # of a field's value).
    sock = connect(receiver)
    body = load("smartcover.xml")
    sock.sendall(HEAD + b"Expect: 100-continue \r\nContent-Length: %d \r\n\r\n" % len(body))
    assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")
    sock.sendall(body)
    response = sock.recv(65536)
    assert status(response) == 200
    assert b'"accepted":1' in response
