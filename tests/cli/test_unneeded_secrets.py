"""The commands that only look (`events`, `stats`, `check-config --no-connect`) run where
the secrets serving needs are not set: a `${VAR}` is an error only where its value is
used, and then it names the variable, the key and the file."""

from __future__ import annotations

import base64

import orjson
import pytest

from receiver.cli.check import UNCHECKED
from receiver.config import load_config
from tests.support.callbacks import load
from tests.support.cli import ci_receiver
from tests.support.processes import Receiver

TOKEN = "path-token-123"
SECRETS = {
    "CI_CALLBACK_TOKEN": TOKEN,
    "ADMIN_PASSWORD": "admin-password-456",
    "HOOK_SECRET": "whsec_" + base64.b64encode(b"hook-secret-789").decode(),
}
CONFIG = """
data_dir = "{data}"
[http]
tokens = ["${{CI_CALLBACK_TOKEN}}"]
[admin]
host = "0.0.0.0"
basic_auth = {{ ops = "${{ADMIN_PASSWORD}}" }}
[handlers.hook]
type = "webhook"
url = "http://127.0.0.1:9/hook"
secret = "${{HOOK_SECRET}}"
headers = {{ Authorization = "Bearer literal-secret-in-a-header" }}
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A config whose secrets come from the environment, and the inbox a real `serve`
    with them set stored a callback in."""
    folder = tmp_path_factory.mktemp("served")
    config = folder / "ci-receiver.toml"
    config.write_text(CONFIG.format(data=folder / "data"))
    receiver = Receiver(config).start(env=SECRETS)
    try:
        stored = receiver.post(load("smartcover.xml"), path=f"/callbacks/{TOKEN}")
        assert stored.status_code == 200, stored.text
        assert receiver.terminate() == 0
    finally:
        receiver.stop()
    return config


def test_events_and_stats_need_none_of_the_secrets(served):
    listed = ci_receiver(served, "events", "list", "--json", text=True, ok=True)
    [event] = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert event["tag"] == "SmartCover"
    shown = ci_receiver(served, "events", "show", event["id"], text=True, ok=True)
    assert shown.stdout.startswith(event["id"])
    counted = ci_receiver(served, "stats", "--json", text=True, ok=True)
    assert orjson.loads(counted.stdout)["callbacks"] == {"accepted": 1}
    assert ci_receiver(served, "events", "rejected", text=True, ok=True).stdout == ""


def test_check_config_no_connect_warns_of_each_unset_variable(served):
    checked = ci_receiver(served, "check-config", "--no-connect", text=True, ok=True)
    printed = orjson.loads(checked.stdout)
    assert printed["http"]["tokens"] == ["**********"]
    assert printed["admin"]["basic_auth"] == {"ops": "**********"}
    warnings = [line for line in checked.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: http.tokens[1]: environment variable CI_CALLBACK_TOKEN is not set"
        " (the commands that run need it)",
        "warning: admin.basic_auth.ops: environment variable ADMIN_PASSWORD is not set"
        " (the commands that run need it)",
        "warning: handlers.hook.secret: environment variable HOOK_SECRET is not set"
        " (the commands that run need it)",
        "warning: handlers.hook: options not checked, a variable is unset",
    ]
    assert f"inbox: {served.parent / 'data' / 'inbox.db'} (not opened: --no-connect)" in (
        checked.stderr
    )
    # A handler not made does not say which of its options are secret: none is shown.
    assert "literal-secret-in-a-header" not in checked.stdout
    assert printed["handlers"]["hook"]["headers"] == UNCHECKED
    assert printed["handlers"]["hook"]["type"] == "webhook"
    # With the variables set, the handler's options are checked too.
    full = ci_receiver(served, "check-config", "--no-connect", env=SECRETS, text=True, ok=True)
    assert "warning" not in full.stderr
    assert orjson.loads(full.stdout)["handlers"]["hook"]["secret"] == ["**********"]
    assert "literal-secret-in-a-header" not in full.stdout


@pytest.mark.parametrize("command", [("serve",), ("check-config",)])
def test_what_uses_the_secrets_fails_naming_each_unset_one(served, command):
    result = ci_receiver(served, *command, text=True)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"Error: config: {served}: http.tokens[1]: environment variable CI_CALLBACK_TOKEN is"
        " not set; admin.basic_auth.ops: environment variable ADMIN_PASSWORD is not set;"
        " handlers.hook.secret: environment variable HOOK_SECRET is not set"
    ]


def test_the_inbox_url_is_needed_to_look_at_the_inbox(tmp_path):
    config = tmp_path / "ci-receiver.toml"
    config.write_text('[inbox]\nurl = "postgresql://ci:${PG_PASSWORD}@127.0.0.1:5432/test"\n')
    for command in (("events", "list"), ("stats",)):
        result = ci_receiver(config, *command, text=True)
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"Error: config: {config}: inbox.url: environment variable PG_PASSWORD is not set"
        ]
    # check-config --no-connect opens no inbox: the url is not needed there either.
    checked = ci_receiver(config, "check-config", "--no-connect", text=True, ok=True)
    assert "inbox: postgresql://ci:***@127.0.0.1:5432/test (not opened" in checked.stderr


def test_a_key_that_refuses_the_stand_in_of_an_unneeded_variable_is_left_unset(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("PULSAR_URL", raising=False)
    config = tmp_path / "ci-receiver.toml"
    config.write_text('[tdmq]\nservice_url = "${PULSAR_URL}"\ntopics = ["persistent://a/b/c"]\n')
    loaded = load_config(config, needs=("inbox",))
    assert loaded.tdmq.service_url is None
    assert loaded.tdmq.topics == ["persistent://a/b/c"]
    assert [str(unset) for unset in loaded.unset] == [
        "tdmq.service_url: environment variable PULSAR_URL is not set"
    ]


def test_a_bad_override_of_a_key_holding_an_unset_variable_stays_an_error(tmp_path):
    config = tmp_path / "ci-receiver.toml"
    config.write_text('[http]\nport = "${RECEIVER_PORT}"\n')
    result = ci_receiver(
        config, "check-config", "--no-connect", env={"CI_RECEIVER_HTTP__PORT": "abc"}, text=True
    )
    assert result.returncode == 1
    assert "CI_RECEIVER_HTTP__PORT" in result.stderr
    assert "config OK" not in result.stderr
