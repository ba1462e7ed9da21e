"""`ci-receiver check-config` on handler options: errors name the handler and the key,
secrets are printed masked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SECRETS = {
    "HOOK_SECRET": "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=",
    "HOOK_TOKEN": "Bearer hook-token-123",
    "ROBOT_KEY": "robot-key-456",
    "DING_SECRET": "SECding789",
    "SMTP_PASSWORD": "smtp-password-0",
    "PULSAR_TOKEN": "pulsar-token-1",
}
CONFIG = """
[handlers.hook]
type = "webhook"
url = "https://example.com/hook"
secret = "${HOOK_SECRET}"
headers = { Authorization = "${HOOK_TOKEN}" }
[handlers.wecom]
type = "wecom"
url = "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=${ROBOT_KEY}"
[handlers.dingtalk]
type = "dingtalk"
url = "https://oapi.dingtalk.com/robot/send?access_token=${ROBOT_KEY}"
secret = "${DING_SECRET}"
[handlers.mail]
type = "email"
host = "smtp.example.com"
username = "ci"
password = "${SMTP_PASSWORD}"
from = "ci@example.com"
to = ["ops@example.com"]
[handlers.bus]
type = "pulsar"
service_url = "pulsar://127.0.0.1:6650"
topic = "ci-events"
token = "${PULSAR_TOKEN}"
"""


def check_config(tmp_path, text: str) -> subprocess.CompletedProcess:
    config = tmp_path / "ci-receiver.toml"
    config.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "receiver.cli", "check-config", "--all", "--config", str(config)],
        capture_output=True, text=True, env={**os.environ, **SECRETS}, timeout=60,
    )  # fmt: skip


def test_secrets_from_the_environment_are_printed_masked(tmp_path):
    result = check_config(tmp_path, CONFIG)

    assert result.returncode == 0, result.stderr
    for value in SECRETS.values():
        assert value not in result.stdout
    handlers = json.loads(result.stdout)["handlers"]
    assert handlers["hook"]["secret"] == ["**********"]
    assert handlers["hook"]["headers"] == {"Authorization": "**********"}
    assert handlers["wecom"]["url"] == "**********"
    assert handlers["dingtalk"]["secret"] == "**********"
    assert handlers["mail"]["password"] == "**********"
    assert handlers["mail"]["port"] == 587  # defaults are shown too
    assert handlers["bus"]["token"] == "**********"


def test_a_bad_option_names_the_handler_and_the_key(tmp_path):
    result = check_config(
        tmp_path,
        CONFIG.replace('host = "smtp.example.com"', 'host = "smtp.example.com"\nsmtp_port = 25'),
    )

    assert result.returncode == 1
    assert "handlers.mail: bad options for handler type 'email': smtp_port: unknown option" in (
        result.stderr
    )
    assert "smtp-password-0" not in result.stderr


def test_a_number_that_is_not_finite_is_a_bad_option_of_every_handler(tmp_path):
    # TOML allows inf and nan; a handler's options, like the rest of the config, do not
    # (`HandlerOptions`): a request that could wait for ever is refused at once.
    result = check_config(
        tmp_path,
        CONFIG.replace(
            'url = "https://example.com/hook"',
            'url = "https://example.com/hook"\nrequest_timeout = inf',
        ),
    )

    assert result.returncode == 1
    assert "handlers.hook: bad options for handler type 'webhook': request_timeout:" in (
        result.stderr
    )
    assert "finite" in result.stderr
