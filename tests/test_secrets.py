"""Secrets stay secret: check-config masks every URL's credentials, and a full run (right
and wrong credentials, near-miss paths with the token, the admin listener, handlers
that deliver and one that cannot start) leaves no configured secret in any log line,
in check-config's output or in the inbox."""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys

import httpx
import pytest

from receiver.config import mask_credentials, mask_url
from tests.support.callbacks import load
from tests.support.http_peers import HttpPeer, wecom_robot
from tests.support.processes import REPO, Receiver, free_port
from tests.support.waiting import wait_until


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://u:pw@example.com/x?token=t&y=1", "https://u:***@example.com/x?token=***&y=***"),
        ("https://tok@example.com/x", "https://***@example.com/x"),
        ("postgresql://ci:pw@db:5432/media", "postgresql://ci:***@db:5432/media"),
        ("https://example.com/plain", "https://example.com/plain"),
        ("https://example.com/?flag", "https://example.com/?flag"),
        ("http://[::1:99999/", "**********"),
    ],
)
def test_a_url_is_shown_without_its_credentials(url, shown):
    assert mask_url(url) == shown


def test_credentials_are_masked_in_nested_values():
    value = {"a": ["x", {"b": "redis://:pw@cache/0?password=pw"}], "n": 3}
    assert mask_credentials(value) == {
        "a": ["x", {"b": "redis://:***@cache/0?password=***"}],
        "n": 3,
    }


def secret(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def test_no_secret_in_logs_check_config_or_inbox_after_a_full_run(tmp_path):
    values = {
        "CALLBACK_TOKEN": secret("cbtoken"),
        "BASIC_PASSWORD": secret("basicpw"),
        "ADMIN_TOKEN": secret("admintoken"),
        "HOOK_QUERY_TOKEN": secret("hookquery"),
        "HOOK_USER_PASSWORD": secret("hookuserpw"),
        "HOOK_HEADER": secret("hookheader"),
        "HOOK_SECRET": "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
        "WECOM_KEY": secret("wecomkey"),
        "DB_PASSWORD": secret("dbpw"),
    }
    with HttpPeer() as hook, HttpPeer(wecom_robot(values["WECOM_KEY"])) as wecom:
        config = tmp_path / "ci-receiver.toml"
        config.write_text(
            f"""
data_dir = "{tmp_path / "data"}"
[http]
tokens = ["${{CALLBACK_TOKEN}}"]
basic_auth = {{ ci = "${{BASIC_PASSWORD}}" }}
[admin]
token = "${{ADMIN_TOKEN}}"
[dispatch]
poll_interval = 0.2
[handlers.hook]
type = "webhook"
url = "http://ci:${{HOOK_USER_PASSWORD}}@127.0.0.1:{hook.port}/hook?token=${{HOOK_QUERY_TOKEN}}"
secret = "${{HOOK_SECRET}}"
headers = {{ Authorization = "Bearer ${{HOOK_HEADER}}" }}
[handlers.wecom]
type = "wecom"
url = "{wecom.url}/cgi-bin/webhook/send?key=${{WECOM_KEY}}"
[handlers.db]
type = "sql"
url = "postgresql://ci:${{DB_PASSWORD}}@127.0.0.1:{free_port()}/nowhere"
timeout = 2
"""
        )
        env = {**values, "PYTHONPATH": str(REPO)}
        checked = subprocess.run(
            [sys.executable, "-m", "receiver.cli", "check-config", "--config", str(config)],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
        )
        assert checked.returncode == 0, checked.stderr
        receiver = Receiver(config).start(env=env)
        try:
            token, password = values["CALLBACK_TOKEN"], values["BASIC_PASSWORD"]
            body = load("transcode.xml")
            assert receiver.post(body, path=f"/callbacks/{token}").status_code == 200
            basic = receiver.post(load("smartcover.xml"), auth=("ci", password))
            assert basic.status_code == 200
            for near_miss in (
                f"/callback/{token}",
                f"//callbacks/{token}",
                f"/CALLBACKS/{token}",
                f"/callbacks/{token}/more",
                f"/{token}",
                f"/callbacks/{token}x",
            ):
                assert receiver.post(body, path=near_miss).status_code in (401, 404, 405)
            assert receiver.post(b"nope", path=f"/callbacks/{token}?t={token}").status_code == 400
            assert receiver.post(body, auth=("ci", password + "x")).status_code == 401
            admin = {"Authorization": f"Bearer {values['ADMIN_TOKEN']}"}
            assert httpx.get(receiver.admin_url + "/metrics", headers=admin).status_code == 200
            assert httpx.get(receiver.admin_url + "/metrics").status_code == 401
            hook.wait_for(2)
            wecom.wait_for(2)
            receiver.wait_for_log("handler cannot start")
            wait_until(
                lambda: (
                    "not started" in httpx.get(receiver.admin_url + "/readyz", headers=admin).text
                )
            )
        finally:
            assert receiver.terminate() == 0
    assert hook.requests[0].query["token"] == values["HOOK_QUERY_TOKEN"]  # the real one went out
    places = {
        "check-config": checked.stdout + checked.stderr,
        "log": receiver.log(),
        "inbox": b"".join(p.read_bytes() for p in (tmp_path / "data").glob("inbox.db*")).decode(
            "latin-1"
        ),
    }
    assert '"path":"/callbacks/{token}"' in places["log"]
    for name, value in values.items():
        for place, text in places.items():
            assert value not in text, f"{name} found in the {place}"
