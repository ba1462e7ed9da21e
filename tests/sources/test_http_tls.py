"""TLS on the public and admin listeners, against `ci-receiver serve` as a process, with
certificates from a test CA (trustme) and clients that verify against it: callbacks
posted over HTTPS, plain HTTP refused, the admin listener, a renewed certificate taken
on SIGHUP (and a bad one refused), a certificate or key that cannot be served at start,
connections that never complete their handshake (capped from their accept, uncounted as
soon as they fail, closed on time and at shutdown), and `serve --workers 2`."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import httpx
import orjson
import psutil
import pytest

from receiver.sources.http_server import connection_limits
from tests.support.callbacks import job
from tests.support.certificates import Certificates
from tests.support.cli import ci_receiver, cli
from tests.support.processes import Receiver, logged, metric, start_workers
from tests.support.waiting import wait_until


def write_config(tmp_path: Path, http: str = "", admin: str = "") -> Path:
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[log]\nformat = "json"\n'
        f'[http]\n{http}[admin]\n{admin}[handlers.log]\ntype = "log"\n'
    )
    return config


def https(receiver: Receiver) -> str:
    return f"https://127.0.0.1:{receiver.port}"


def served_certificate(port: int, certificates: Certificates) -> bytes:
    """The certificate a new connection is served (DER), verified against the test CA."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with certificates.client().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        served = tls.getpeercert(binary_form=True)
    assert served is not None
    return served


def healthz(client: httpx.Client, receiver: Receiver) -> int:
    return client.get(https(receiver) + "/healthz").status_code


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` by now (not waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False


TLS_REFUSED = 'ci_receiver_http_refused_total{reason="tls_handshake",server="public"}'
TOO_MANY = 'ci_receiver_http_refused_total{reason="too_many_connections",server="public"}'
NOT_RELOADED = "tls certificate not reloaded: the running one stays"


@pytest.fixture
def receiver(tmp_path: Path, certificates: Certificates):
    process = Receiver(write_config(tmp_path, certificates.keys() + "header_timeout = 1\n"))
    process.start()
    yield process
    process.stop()


def test_a_callback_posted_over_https_is_stored(receiver, certificates, tmp_path):
    with httpx.Client(verify=certificates.client()) as client:
        answer = client.post(https(receiver) + "/callbacks", content=job("j" + "1" * 24))
    assert answer.status_code == 200, answer.text
    assert answer.http_version == "HTTP/1.1"
    (event_id,) = answer.json()["ids"]
    shown = orjson.loads(cli(tmp_path, "events", "show", event_id, "--json").stdout)
    assert shown["event"]["job_id"] == "j" + "1" * 24
    assert shown["event"]["source"] == "http"
    # The start-up lines give the https:// URL to configure in CI.
    assert f"CallBack URL for CI: https://127.0.0.1:{receiver.port}/callbacks" in receiver.log()


def test_plain_http_to_the_tls_port_gets_no_answer_and_is_counted(receiver):
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(receiver.url + "/healthz", timeout=5)
    assert receiver.process.poll() is None
    # With the port probe that waited for the start (a connection without a handshake
    # too); each as soon as it is closed, not when its handshake's time is over.
    wait_until(lambda: metric(receiver, TLS_REFUSED) == 2, what="the failed handshake counted")


def test_a_client_that_never_handshakes_is_closed_within_header_timeout(receiver):
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as silent:
        started = time.monotonic()
        assert silent.recv(1024) == b""  # closed by the server, having said nothing
        assert time.monotonic() - started < 4  # header_timeout = 1


def test_connections_in_their_handshake_count_against_max_connections(tmp_path, certificates):
    limits = "max_connections = 2\nheader_timeout = 2\n"
    config = write_config(tmp_path, certificates.keys() + limits)
    receiver = Receiver(config).start()
    try:
        # The test's own wait for the port: a connection closed with no handshake.
        wait_until(lambda: metric(receiver, TLS_REFUSED) == 1, what="the port probe counted")
        silent = [socket.create_connection(("127.0.0.1", receiver.port)) for _ in range(2)]
        time.sleep(0.3)  # accepted
        with httpx.Client(verify=certificates.client()) as client:
            busy = client.get(https(receiver) + "/healthz")
            assert busy.status_code == 503
            assert busy.headers["retry-after"] == "1"
            for sock in silent:
                assert sock.recv(1024) == b""  # their handshake's time is over
            assert metric(receiver, TLS_REFUSED) == 3
            assert client.get(https(receiver) + "/healthz").status_code == 200
    finally:
        receiver.stop()


def test_connections_past_those_held_are_closed_at_their_accept(tmp_path, certificates):
    # 2,000 descriptors and max_connections = 20: up to `hold` connections are held (to be
    # answered 503 once their handshake is done); any more are closed as they come,
    # before a handshake, as plain HTTP ones are.
    hold = connection_limits(2000, 20).hold
    config = write_config(tmp_path, certificates.keys() + "max_connections = 20\n")
    receiver = Receiver(config).start(open_files=2000)
    try:
        process = psutil.Process(receiver.process.pid)
        descriptors = process.num_fds()
        silent = [socket.create_connection(("127.0.0.1", receiver.port)) for _ in range(hold + 400)]
        # Well before any handshake's time (header_timeout, 10 s) is over: at their accept.
        wait_until(lambda: sum(map(closed_by_server, silent)) >= 400, timeout=5, what="400 closed")
        assert sum(map(closed_by_server, silent)) == 400
        assert process.num_fds() < descriptors + hold + 20
        assert metric(receiver, TOO_MANY) == 400
        for sock in silent:
            sock.close()
        with httpx.Client(verify=certificates.client()) as client:
            wait_until(lambda: healthz(client, receiver) == 200, what="served again")
    finally:
        receiver.stop()


def test_a_burst_of_connections_closed_unshaken_leaves_no_503(tmp_path, certificates):
    # Each closed before its handshake is uncounted at once: were they counted until
    # their handshake's time (10 s) was over, the next sender would get 503 meanwhile.
    config = write_config(tmp_path, certificates.keys() + "max_connections = 20\n")
    receiver = Receiver(config).start()
    try:
        with httpx.Client(verify=certificates.client()) as client:
            for burst in range(3):
                for _ in range(60):
                    socket.create_connection(("127.0.0.1", receiver.port)).close()
                assert healthz(client, receiver) == 200, burst
        # Counted as they failed (with the port probe), none as too many connections.
        wait_until(lambda: metric(receiver, TLS_REFUSED) == 181, what="all counted")
        assert metric(receiver, TOO_MANY) == 0
    finally:
        receiver.stop()


def test_a_handshake_that_stalls_is_closed_within_header_timeout(receiver):
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as slow:
        # The start of a ClientHello (a TLS 1.0 record header, 512 bytes announced, and
        # the handshake's type), and nothing more.
        slow.sendall(b"\x16\x03\x01\x02\x00\x01")
        started = time.monotonic()
        assert slow.recv(1024) == b""
        assert time.monotonic() - started < 4  # header_timeout = 1
    wait_until(lambda: metric(receiver, TLS_REFUSED) == 2, what="counted (with the port probe)")


def test_sigterm_during_handshakes_closes_them_and_exits_cleanly(tmp_path, certificates):
    config = write_config(tmp_path, certificates.keys() + "header_timeout = 30\n")
    receiver = Receiver(config).start()
    try:
        silent = socket.create_connection(("127.0.0.1", receiver.port), timeout=10)
        slow = socket.create_connection(("127.0.0.1", receiver.port), timeout=10)
        slow.sendall(b"\x16\x03\x01\x02\x00\x01")
        time.sleep(0.3)  # both accepted, in their handshake
        started = time.monotonic()
        assert receiver.terminate() == 0
        assert time.monotonic() - started < 10  # not held until their handshake's time
        assert silent.recv(1024) == slow.recv(1024) == b""
        silent.close()
        slow.close()
        log = receiver.log()
        assert "Traceback" not in log
        assert "Task was destroyed" not in log
    finally:
        receiver.stop()


def test_the_admin_listener_over_tls(tmp_path, certificates):
    receiver = Receiver(write_config(tmp_path, admin=certificates.keys())).start()
    try:
        receiver.wait_for_log(f"admin listener on https://127.0.0.1:{receiver.admin_port}")
        admin = f"https://127.0.0.1:{receiver.admin_port}"
        answer = httpx.get(admin + "/metrics", verify=certificates.client())
        assert answer.status_code == 200
        assert "ci_receiver_" in answer.text
        # The public port, without keys of its own, stays plain HTTP.
        assert httpx.get(receiver.url + "/healthz").status_code == 200
    finally:
        receiver.stop()


def test_a_body_over_the_limit_reads_its_413_over_tls(tmp_path, certificates):
    config = write_config(tmp_path, certificates.keys())
    config.write_text(config.read_text() + "[limits]\nmax_bytes = 1000\n")
    receiver = Receiver(config).start()
    try:
        # The body is refused before it is read; the lingering close reads the rest, over
        # TLS as over plain TCP, so the client reads its answer, not a reset.
        with httpx.Client(verify=certificates.client()) as client:
            answer = client.post(https(receiver) + "/callbacks", content=b"<" * 2**21)
        assert answer.status_code == 413
        assert answer.json()["error"] == "too_large"
    finally:
        receiver.stop()


def test_sighup_serves_a_renewed_certificate_to_new_connections(receiver, certificates):
    first = certificates.served
    with httpx.Client(verify=certificates.client()) as open_client:
        assert open_client.get(https(receiver) + "/healthz").status_code == 200
        renewed = certificates.renew()
        receiver.process.send_signal(signal.SIGHUP)
        wait_until(lambda: logged(receiver, "tls certificate reloaded"), what="the reload logged")
        assert served_certificate(receiver.port, certificates) == renewed != first
        # A connection opened before goes on with its certificate.
        answer = open_client.get(https(receiver) + "/healthz")
        assert answer.status_code == 200
        stream = answer.extensions["network_stream"]
        assert stream.get_extra_info("ssl_object").getpeercert(True) == first
    assert receiver.process.poll() is None


def test_a_bad_renewal_keeps_the_running_certificate_and_says_why(receiver, certificates):
    first = certificates.served
    certificates.renew()
    certificates.key.write_bytes(certificates.other_key())  # the key of another certificate
    receiver.process.send_signal(signal.SIGHUP)
    wait_until(lambda: logged(receiver, NOT_RELOADED), what="the refusal logged")
    (refusal,) = logged(receiver, NOT_RELOADED)
    assert refusal["level"] == "error"
    assert "does not match the certificate" in refusal["error"]
    assert served_certificate(receiver.port, certificates) == first
    metrics = httpx.get(receiver.admin_url + "/metrics").text
    assert 'ci_receiver_config_reloads_total{outcome="refused"} 1.0' in metrics
    # Mended, the next SIGHUP takes it.
    renewed = certificates.renew()
    receiver.process.send_signal(signal.SIGHUP)
    wait_until(lambda: logged(receiver, "tls certificate reloaded"), what="the reload")
    assert served_certificate(receiver.port, certificates) == renewed


@pytest.mark.parametrize(
    "command", [("serve",), ("serve", "--workers", "2"), ("check-config",)], ids=" ".join
)
def test_a_key_that_does_not_match_ends_the_start_with_one_line(tmp_path, certificates, command):
    certificates.key.write_bytes(certificates.other_key())
    config = write_config(tmp_path, certificates.keys())
    result = ci_receiver(config, *command, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: {'config: ' if command == ('check-config',) else ''}[http] tls_key:"
        f" {certificates.key} does not match the certificate in tls_cert {certificates.cert}"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("keys", "error"),
    [
        (
            'tls_cert = "{cert}"\ntls_key = "{folder}/missing.pem"\n',
            "[admin] tls_key: cannot read {folder}/missing.pem: No such file or directory",
        ),
        (
            'tls_cert = "{key}"\ntls_key = "{key}"\n',
            "[admin] tls_cert: {key} holds no PEM certificate",
        ),
        (
            'tls_cert = "{cert}"\n',
            "admin: tls_cert and tls_key go together: set tls_key too (or neither)",
        ),
        (
            'tls_key_password = "s3cret"\n',
            "admin: tls_key_password is set without tls_cert and tls_key",
        ),
    ],
)
def test_certificate_keys_that_cannot_be_served_are_one_line_errors(
    tmp_path, certificates, keys, error
):
    names = {"cert": certificates.cert, "key": certificates.key, "folder": tmp_path}
    config = write_config(tmp_path, admin=keys.format(**names))
    result = ci_receiver(config, "check-config", text=True)
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: config: ")
    assert line.endswith(error.format(**names))


def test_workers_serve_tls_and_each_takes_a_renewal(tmp_path, certificates):
    config = write_config(tmp_path, certificates.keys())
    receiver = Receiver(config, args=("--workers", "2"))
    start_workers(receiver)
    try:
        with httpx.Client(verify=certificates.client()) as client:
            posted = client.post(https(receiver) + "/callbacks", content=job("j" + "2" * 24))
            assert posted.status_code == 200
        renewed = certificates.renew()
        receiver.process.send_signal(signal.SIGHUP)
        wait_until(
            lambda: len(logged(receiver, "tls certificate reloaded")) == 2,
            what="both workers reloaded",
        )
        # New connections, whichever worker takes each, get the renewed certificate.
        for _ in range(8):
            assert served_certificate(receiver.port, certificates) == renewed
        assert receiver.terminate() == 0
    finally:
        receiver.stop()
