"""What `serve` says as it starts listening: where, and the CallBack URL to give CI."""

from __future__ import annotations

import pytest

from receiver.config import Config
from receiver.runtime.assemble import _announce


def said(config: Config, host: str, port: int) -> list[str]:
    lines: list[str] = []
    _announce(config, lines.append)(host, port)
    return lines


def test_the_port_bound_and_the_token_hidden():
    config = Config(http={"port": 0, "tokens": ["s3cret-token-0123456789"]})
    lines = said(config, "203.0.113.7", 40123)
    assert lines[:2] == [
        "ci-receiver listening on http://203.0.113.7:40123",
        "CallBack URL for CI: http://203.0.113.7:40123/callbacks/<token>",
    ]
    assert not any("s3cret" in line for line in lines)


@pytest.mark.parametrize("every_address", ["0.0.0.0", "::"])
def test_every_address_asks_for_the_public_one(every_address):
    lines = said(Config(), every_address, 8080)
    assert "CallBack URL for CI: http://<this host's public address>:8080/callbacks" in lines


def test_an_ipv6_address_in_brackets():
    assert said(Config(), "2001:db8::1", 8080)[:2] == [
        "ci-receiver listening on http://[2001:db8::1]:8080",
        "CallBack URL for CI: http://[2001:db8::1]:8080/callbacks",
    ]
