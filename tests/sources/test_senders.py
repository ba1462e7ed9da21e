"""Who may post, and what refused callbacks may cost: Basic credentials, the address
allow-list behind trusted proxies, the limit on failed attempts, the warning when anyone
may post, and the budget for refused bodies. Against `ci-receiver serve` as a process."""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

import orjson
import pytest

from tests.support.callbacks import load
from tests.support.processes import Receiver, metric


def serve(tmp_path: Path, sections: str, env: dict[str, str] | None = None) -> Receiver:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n{sections}\n[handlers.log]\ntype = "log"\n'
    )
    return Receiver(config).start(env=env)


def receipts(tmp_path: Path) -> list[tuple]:
    with sqlite3.connect(tmp_path / "data" / "inbox.db") as inbox:
        return inbox.execute(
            "SELECT outcome, error_reason, length(body), size, headers FROM receipts ORDER BY id"
        ).fetchall()


def test_basic_credentials_and_path_tokens_both_let_in_and_nothing_else_does(tmp_path):
    receiver = serve(
        tmp_path, '[http]\ntokens = ["path-token-1"]\nbasic_auth = { ci = "basic-pw-1" }\n'
    )
    try:
        body = load("transcode.xml")
        assert receiver.post(body, auth=("ci", "basic-pw-1")).status_code == 200
        assert receiver.post(body, path="/callbacks/path-token-1").status_code == 200
        for refused in (
            receiver.post(body),
            receiver.post(body, auth=("ci", "wrong")),
            receiver.post(body, auth=("other", "basic-pw-1")),
            receiver.post(body, headers={"Authorization": "Basic !!!not-base64"}),
            receiver.post(body, path="/callbacks/wrong"),
        ):
            assert refused.status_code == 401
            assert refused.json()["error"] == "unauthorized"
            assert refused.headers["www-authenticate"] == 'Basic realm="ci-receiver"'
        assert [row[0] for row in receipts(tmp_path)] == ["accepted", "duplicate"]
        assert (
            metric(receiver, 'ci_receiver_callbacks_total{outcome="unauthorized",source="http"}')
            == 5
        )
    finally:
        receiver.terminate()
    assert "basic-pw-1" not in receiver.log()
    assert "no sender authentication" not in receiver.log()


def test_a_refused_sender_is_answered_before_its_body_is_sent(tmp_path):
    receiver = serve(tmp_path, '[http]\ntokens = ["path-token-1"]\n')
    try:
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as sock:
            sock.sendall(b"POST /callbacks HTTP/1.1\r\nHost: t\r\nContent-Length: 50000000\r\n\r\n")
            answer = sock.recv(65536)  # not one byte of the 50 MB was sent
        assert answer.startswith(b"HTTP/1.1 401 ")
        assert not (tmp_path / "data" / "inbox.db").exists() or receipts(tmp_path) == []
    finally:
        receiver.stop()


def test_the_allow_list_reads_x_forwarded_for_only_from_trusted_proxies(tmp_path):
    allow = '[http]\nallow_from = ["203.0.113.0/24"]\n'
    body = load("smartcover.xml")
    direct = serve(tmp_path / "direct", allow)
    try:
        # Straight from 127.0.0.1, which is not allowed; its X-Forwarded-For is not read.
        forged = direct.post(body, headers={"X-Forwarded-For": "203.0.113.7"})
        assert (forged.status_code, forged.json()["error"]) == (403, "forbidden")
    finally:
        direct.stop()
    behind = serve(tmp_path / "behind", allow + 'trusted_proxies = ["127.0.0.0/8"]\n')
    try:
        assert behind.post(body, headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 200
        # The proxy appends the peer it saw: the client cannot pass for another one.
        chain = {"X-Forwarded-For": "203.0.113.8, 198.51.100.1"}
        assert behind.post(body, headers=chain).status_code == 403
        assert behind.post(body).status_code == 403  # the proxy itself is not allowed
    finally:
        behind.terminate()
    lines = [orjson.loads(line) for line in behind.log().splitlines() if '"request"' in line]
    assert [(line["client"], line["status"]) for line in lines] == [
        ("203.0.113.7", 200),
        ("198.51.100.1", 403),
        ("127.0.0.1", 403),
    ]


def test_failed_authentication_is_rate_limited_per_address(tmp_path):
    receiver = serve(tmp_path, '[http]\ntokens = ["path-token-1"]\nauth_failures_per_minute = 3\n')
    try:
        body = load("transcode.xml")
        answers = [receiver.post(body, path="/callbacks/guess").status_code for _ in range(5)]
        assert answers == [401, 401, 401, 429, 429]
        limited = receiver.post(body, path="/callbacks/path-token-1")
        assert limited.status_code == 429  # for the rest of the minute, whatever it sends
        assert 0 < int(limited.headers["retry-after"]) <= 60
        receiver.wait_for_log("sender refused, and limited from now on")
        assert (
            metric(receiver, 'ci_receiver_callbacks_total{outcome="rate_limited",source="http"}')
            == 3
        )
    finally:
        receiver.stop()


def test_serve_says_loudly_when_anyone_may_post(tmp_path):
    receiver = serve(tmp_path, "")
    try:
        receiver.wait_for_log("anyone who can reach this port can post callbacks")
        assert "Set http.tokens" in receiver.log()
    finally:
        receiver.stop()


@pytest.mark.parametrize(
    ("command", "workers"), [("serve", ()), ("serve", ("--workers", "2")), ("run", ())]
)
def test_with_require_auth_an_open_port_does_not_start_and_says_how_to_close_it(
    tmp_path, command, workers
):
    config = tmp_path / "ci-receiver.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[tdmq]\nservice_url = "pulsar://x:1"\n')
    receiver = Receiver(config, command, args=workers)
    receiver.start(env={"CI_RECEIVER_HTTP__REQUIRE_AUTH": "true"}, wait_http=False)
    try:
        assert receiver.wait(30) == 1
    finally:
        receiver.stop()
    (line,) = receiver.log().splitlines()
    assert line.startswith("Error: refusing to serve without sender authentication")
    assert "CI_RECEIVER_HTTP__TOKENS" in line
    assert "CI_RECEIVER_HTTP__REQUIRE_AUTH=false" in line
    # Nothing made, nothing listened on.
    assert not (tmp_path / "data").exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", receiver.port), timeout=2)


def test_with_require_auth_any_guard_lets_it_start_and_false_opts_out(tmp_path):
    body = load("transcode.xml")
    for name, sections, env, path in (
        ("token", '[http]\ntokens = ["path-token-1"]\n', {}, "/callbacks/path-token-1"),
        ("allow", '[http]\nallow_from = ["127.0.0.0/8"]\n', {}, "/callbacks"),
        ("open", "", {"CI_RECEIVER_HTTP__REQUIRE_AUTH": "false"}, "/callbacks"),
    ):
        receiver = serve(
            tmp_path / name, sections, {"CI_RECEIVER_HTTP__REQUIRE_AUTH": "true", **env}
        )
        try:
            assert receiver.post(body, path=path).status_code == 200, name
        finally:
            assert receiver.terminate() == 0
        assert "refusing" not in receiver.log()
        # Asked for explicitly, an open port still says so.
        assert ("anyone who can reach this port" in receiver.log()) == (name == "open")


def test_refused_bodies_are_kept_within_the_budget_and_counted_beyond(tmp_path):
    receiver = serve(
        tmp_path, "[inbox]\nrejected_body_bytes = 1000\nrejected_bytes_per_hour = 20000\n"
    )
    try:
        garbage = b"garbage " * 1000
        for _ in range(50):
            refused = receiver.post(garbage, headers={"User-Agent": "u" * 5000})
            assert refused.status_code == 400  # refused either way: kept or not
        assert receiver.post(load("transcode.xml")).status_code == 200
        kept = [row for row in receipts(tmp_path) if row[0] == "rejected"]
        # 20,000 bytes an hour at 1,000 bytes + 512 a row: 13 rows (and a little refill).
        assert 12 <= len(kept) <= 14
        assert {(row[2], row[3]) for row in kept} == {(1000, len(garbage))}
        assert {len(orjson.loads(row[4])["user-agent"]) for row in kept} == {512}
        not_kept = metric(
            receiver,
            'ci_receiver_rejected_not_kept_total{reason="not_xml_or_json",source="http"}',
        )
        assert not_kept == 50 - len(kept)
        assert (
            metric(receiver, 'ci_receiver_callbacks_total{outcome="rejected",source="http"}') == 50
        )
    finally:
        receiver.stop()
