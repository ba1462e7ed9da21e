"""`ci-receiver health`, the image's HEALTHCHECK: it asks /healthz where the config says
the receiver listens, against a real `serve` (and `consume`'s admin listener) on ports
that are not the defaults."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.support.cli import ci_receiver
from tests.support.processes import Receiver, free_port


def write_config(folder: Path, port: int, admin_port: int, more: str = "") -> Path:
    """A config as a deployment has it: the ports in the file, every interface, and
    secrets read from the environment (which `health` is not given)."""
    config = folder / "ci-receiver.toml"
    config.write_text(
        f'data_dir = "{folder / "data"}"\n'
        f'[http]\nhost = "0.0.0.0"\nport = {port}\ntokens = ["${{CALLBACK_TOKEN}}"]\n'
        f"[admin]\nport = {admin_port}\n{more}"
    )
    return config


def test_healthy_on_the_configured_port_without_the_secrets(tmp_path):
    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path, port, admin_port)
    # Listening on loopback alone; the config's 0.0.0.0 is asked on 127.0.0.1.
    # The ports in its environment are the file's.
    receiver = Receiver(config, port=port, admin_port=admin_port)
    receiver.start(env={"CALLBACK_TOKEN": "path-token-1"})
    try:
        result = ci_receiver(config, "health", text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"healthy: http://127.0.0.1:{port}/healthz answered 200\n"
        # The port from the environment, as serve reads it, wins over the file's.
        moved = ci_receiver(
            config, "health", env={"CI_RECEIVER_HTTP__PORT": str(free_port())}, text=True
        )
        assert moved.returncode == 1
    finally:
        assert receiver.terminate() == 0
    # Stopped: unhealthy, in one line.
    result = ci_receiver(config, "health", text=True)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"unhealthy: http://127.0.0.1:{port}/healthz: [Errno 111] Connection refused\n"
    )


def test_unhealthy_when_something_else_answers_or_nothing_does_in_time(tmp_path):
    port = free_port()
    config = write_config(tmp_path, port, free_port())
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", port))
        silent.listen()  # takes the connection, never answers
        result = ci_receiver(config, "health", "--timeout", "0.5", text=True)
    assert result.returncode == 1
    assert result.stderr == f"unhealthy: http://127.0.0.1:{port}/healthz: no answer in 0.5 s\n"
    broken = tmp_path / "broken.toml"
    broken.write_text("[http]\nport = 'eighty'\n")
    result = ci_receiver(broken, "health", text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("unhealthy: config: ")
    assert "http.port" in result.stderr


def test_admin_asks_the_admin_listener_of_consume_with_a_token(tmp_path, pulsar_broker):
    admin_port = free_port()
    # consume's admin listener on every interface, so with a token: health has none and
    # needs none (/healthz answers probes without credentials).
    config = write_config(
        tmp_path,
        free_port(),
        admin_port,
        f'host = "0.0.0.0"\ntoken = "${{ADMIN_TOKEN}}"\n'
        f'[tdmq]\nservice_url = "{pulsar_broker.url}"\ntopics = ["persistent://public/default/t"]\n',
    )
    # The ports in its environment are the file's.
    consumer = Receiver(config, "consume", admin_port=admin_port)
    try:
        consumer.start(
            env={
                "CALLBACK_TOKEN": "t",
                "ADMIN_TOKEN": "admin-token-1",
                "CI_RECEIVER_ADMIN__HOST": "127.0.0.1",
            },
            wait_http=False,
        )
        consumer.wait_for_log("admin listener on")
        result = ci_receiver(config, "health", "--admin", text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"healthy: http://127.0.0.1:{admin_port}/healthz answered 200\n"
        # Without --admin: consume has no public port.
        assert ci_receiver(config, "health", text=True).returncode == 1
    finally:
        consumer.stop()


def test_over_tls_health_and_send_reach_the_listener_by_https(tmp_path, certificates):
    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path, port, admin_port)
    # The certificate served on the public port ([http], the file's first table).
    config.write_text(config.read_text().replace("tokens =", certificates.keys() + "tokens ="))
    receiver = Receiver(config, port=port, admin_port=admin_port)
    receiver.start(env={"CALLBACK_TOKEN": "path-token-1"})
    try:
        result = ci_receiver(config, "health", text=True)
        assert result.stdout == f"healthy: https://127.0.0.1:{port}/healthz answered 200\n"
        sent = ci_receiver(
            config, "send", "--config", str(config), "--sample", "smartcover",
            env={"CALLBACK_TOKEN": "path-token-1"}, text=True,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        assert sent.stderr.strip() == "200 OK"
    finally:
        assert receiver.terminate() == 0


def test_a_listening_key_whose_variable_is_unset_is_said_not_guessed(tmp_path):
    config = tmp_path / "ci-receiver.toml"
    config.write_text('[http]\nport = "${RECEIVER_PORT}"\n')
    result = ci_receiver(config, "health", text=True)
    assert result.returncode == 1
    assert result.stderr == (
        "unhealthy: config: http.port: environment variable RECEIVER_PORT is not set\n"
    )
