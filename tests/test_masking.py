"""Secrets out of messages: URLs' user info and query, and secret option values."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, SecretStr

from receiver.masking import Masker, origin, secrets_in


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (
            "cannot open postgresql://ci:pw@db:5432/media?sslmode=require: refused",
            "cannot open postgresql://ci:***@db:5432/media?sslmode=***: refused",
        ),
        (
            "POST https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=k-1 failed",
            "POST https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=*** failed",
        ),
        ("smtp://mail.example.com:465 refused", "smtp://mail.example.com:465 refused"),
        ("the token s3cr3t-value is wrong", "the token *** is wrong"),
        ("no URL, no secret", "no URL, no secret"),
    ],
)
def test_masked(text, masked):
    assert Masker(["s3cr3t-value"])(text) == masked


def test_secrets_are_found_by_type_and_by_option_name():
    class Options(BaseModel):
        url: SecretStr
        headers: dict[str, SecretStr]
        host: str
        password: str

    options = Options(
        url=SecretStr("https://hooks.example.com/T1/B2/x"),
        headers={"Authorization": SecretStr("Bearer abc")},
        host="smtp.example.com",
        password="pw-1234",
    )
    assert sorted(secrets_in(options)) == [
        "Bearer abc",
        "https://hooks.example.com/T1/B2/x",
        "pw-1234",
    ]
    assert sorted(secrets_in({"api_key": ["k1", "k2"], "level": "info"})) == ["k1", "k2"]


def test_origin_shows_scheme_host_and_port_alone():
    assert origin("https://u:pw@Hooks.Slack.com/services/T0/B0/secret?x=1#f") == (
        "https://hooks.slack.com"
    )
    assert origin("http://127.0.0.1:8080/cgi-bin/webhook/send?key=k") == "http://127.0.0.1:8080"
    assert origin("http://[::1]:9000/hook") == "http://[::1]:9000"
    assert origin("http://host:notaport/x") == "http://host"
