"""The admin listener: /metrics and the detailed /readyz apart from the public port,
loopback by default, behind a bearer token or Basic credentials when configured."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from receiver.config import ConfigError, load_config
from tests.support.processes import Receiver, log_lines


def serve(tmp_path: Path, admin: str = "") -> Receiver:
    config = tmp_path / "ci-receiver.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[admin]\n{admin}\n')
    return Receiver(config).start()


def test_on_loopback_without_credentials_and_apart_from_the_public_port(tmp_path):
    receiver = serve(tmp_path)
    try:
        metrics = httpx.get(receiver.admin_url + "/metrics")
        assert metrics.status_code == 200
        assert "ci_receiver_callbacks_total" in metrics.text
        ready = httpx.get(receiver.admin_url + "/readyz").json()
        assert ready["ready"] is True
        assert set(ready["checks"]) >= {"inbox", "disk", "dispatcher", "draining", "handler:log"}
        assert httpx.get(receiver.url + "/metrics").status_code == 404
        assert httpx.get(receiver.url + "/readyz").json() == {"ready": True}
        receiver.wait_for_log(f"admin listener on http://127.0.0.1:{receiver.admin_port}")
    finally:
        receiver.stop()


def test_each_servers_lines_say_which_listener_logged_them(tmp_path):
    receiver = serve(tmp_path)
    try:
        assert httpx.get(receiver.url + "/healthz").status_code == 200
        assert httpx.get(receiver.admin_url + "/metrics").status_code == 200
    finally:
        stopped = receiver.terminate()
    assert stopped == 0
    lines = log_lines(receiver)
    # uvicorn's own lines, one of each per server, no longer alike.
    for said in ("Started server process", "Shutting down", "Finished server process"):
        listeners = [line.get("listener") for line in lines if line["event"].startswith(said)]
        assert sorted(listeners) == ["admin", "public"], said
    requests = {line["path"]: line["listener"] for line in lines if line["event"] == "request"}
    assert requests == {"/healthz": "public", "/metrics": "admin"}


def test_a_second_serve_on_one_host_says_the_admin_port_is_taken_and_how_to_change_it(
    tmp_path,
):
    first = serve(tmp_path)
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second = Receiver(second_dir / "ci-receiver.toml")
    (second_dir / "ci-receiver.toml").write_text(f'data_dir = "{second_dir / "data"}"\n')
    try:
        second.start(env={"CI_RECEIVER_ADMIN__PORT": str(first.admin_port)}, wait_http=False)
        assert second.wait(30) == 1
    finally:
        second.stop()
        first.stop()
    assert (
        f"the admin HTTP server cannot listen on 127.0.0.1:{first.admin_port}: [Errno 98]"
        " Address already in use; set another [admin] port (CI_RECEIVER_ADMIN__PORT)"
    ) in second.log()
    # Found before anything started: no inbox made, no CallBack URL announced.
    assert not (second_dir / "data").exists()
    assert "CallBack URL" not in second.log()


def test_a_token_or_basic_credentials_guard_every_route_but_the_probes(tmp_path):
    receiver = serve(tmp_path, 'token = "admin-tok-1"\nbasic_auth = { ops = "ops-pw-1" }')
    try:
        for path in ("/metrics", "/nope", "/api/overview", "/healthz/x"):
            refused = httpx.get(receiver.admin_url + path)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"] == 'Basic realm="ci-receiver admin"'
        wrong = {"Authorization": "Bearer x"}
        for path in ("/metrics", "/readyz", "/healthz"):
            assert httpx.get(receiver.admin_url + path, headers=wrong).status_code == 401, path
        bearer = {"Authorization": "Bearer admin-tok-1"}
        assert httpx.get(receiver.admin_url + "/metrics", headers=bearer).status_code == 200
        detailed = httpx.get(receiver.admin_url + "/readyz", auth=("ops", "ops-pw-1"))
        assert detailed.is_success
        assert "inbox" in detailed.json()["checks"]
        assert httpx.get(receiver.admin_url + "/nope", headers=bearer).status_code == 404
        # A kubelet's probes send no credentials: told alive, and ready, and no more.
        assert httpx.get(receiver.admin_url + "/healthz").json() == {"status": "ok"}
        assert httpx.get(receiver.admin_url + "/readyz").json() == {"ready": True}
    finally:
        receiver.terminate()
    assert "admin-tok-1" not in receiver.log()


def test_disabled_it_does_not_listen(tmp_path):
    receiver = serve(tmp_path, "enabled = false")
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", receiver.admin_port), timeout=2)
    finally:
        receiver.stop()


@pytest.mark.parametrize(
    ("admin", "message"),
    [
        ('host = "0.0.0.0"', "is not a loopback address: set admin.token or admin.basic_auth"),
        ('host = "10.1.2.3"\nbasic_auth = { ops = "" }', "the password is empty"),
        ('token = ""', "the token is empty"),
    ],
)
def test_an_exposed_or_half_configured_admin_listener_is_a_config_error(tmp_path, admin, message):
    config = tmp_path / "c.toml"
    config.write_text(f"[admin]\n{admin}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_exposed_with_a_token_is_fine():
    from receiver.config import AdminConfig

    assert AdminConfig(host="0.0.0.0", token="t").host == "0.0.0.0"
