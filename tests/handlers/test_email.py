"""The `email` handler against aiosmtpd on loopback: STARTTLS and SMTPS with a real
certificate (from a test CA made by trustme), and AUTH LOGIN/PLAIN."""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import time

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

import handlers
from handlers import Fail, Retry
from handlers.email import EmailHandler
from tests.support.handler_runs import run_handler
from tests.support.processes import free_port
from tests.support.sample_events import event

USER, PASSWORD = "ci-receiver", "correct horse"


class Mailbox:
    """What the relay accepted; recipients starting with `refused` or `later` get a
    permanent (550) or transient (451) refusal."""

    def __init__(self) -> None:
        self.envelopes = []
        self.logins: list[str] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("refused"):
            return "550 5.1.1 no such mailbox"
        if address.startswith("later"):
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append(envelope)
        return "250 Message accepted"

    def authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and (
            auth_data.login.decode(),
            auth_data.password.decode(),
        ) == (USER, PASSWORD)
        if ok:
            self.logins.append(auth_data.login.decode())
        # handled=False: aiosmtpd then answers a failure with 535 itself.
        return AuthResult(success=ok, handled=False)

    def messages(self) -> list[email.message.EmailMessage]:
        return [
            email.message_from_bytes(envelope.content, policy=email.policy.default)
            for envelope in self.envelopes
        ]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server)
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return server, ca_file


def relay(mailbox: Mailbox, **kwargs) -> Controller:
    controller = Controller(
        mailbox, hostname="127.0.0.1", port=free_port(), authenticator=mailbox.authenticate,
        **kwargs,
    )  # fmt: skip
    controller.start()
    return controller


@pytest.fixture
def starttls_relay(certificates):
    server_context, ca_file = certificates
    mailbox = Mailbox()
    controller = relay(mailbox, tls_context=server_context, require_starttls=True)
    yield mailbox, controller.port, ca_file
    controller.stop()


def options(port, ca_file=None, **overrides) -> dict:
    return {
        "host": "127.0.0.1",
        "port": port,
        "security": "starttls",
        "ca_file": str(ca_file) if ca_file else None,
        "username": USER,
        "password": PASSWORD,
        "from": "CI receiver <ci@example.com>",
        "to": ["ops@example.com", "media@example.com"],
        "request_timeout": 10,
        **overrides,
    }


async def test_a_failed_job_is_mailed_over_starttls_with_auth(starttls_relay):
    mailbox, port, ca_file = starttls_relay
    failed = event("smartcover_failed.xml")
    await run_handler("email", options(port, ca_file, subject="[CI] $tag $state: $job_id"), failed)

    [envelope] = mailbox.envelopes
    assert envelope.mail_from == "ci@example.com"
    assert envelope.rcpt_tos == ["ops@example.com", "media@example.com"]
    assert mailbox.logins == [USER, USER]  # the check at start, then the message
    [message] = mailbox.messages()
    assert message["Subject"] == f"[CI] SmartCover Failed: {failed.job_id}"
    assert message["From"] == "CI receiver <ci@example.com>"
    assert message["To"] == "ops@example.com, media@example.com"
    text = message.get_body(("plain",)).get_content().replace("\r\n", "\n")
    assert text.startswith("SmartCover Failed\n")
    assert f"Error: {failed.code}: {failed.message}" in text
    html = message.get_body(("html",)).get_content()
    assert "<b>Error</b>: " in html
    assert "<br>" in html


async def test_a_repeat_has_the_same_message_id(starttls_relay):
    mailbox, port, ca_file = starttls_relay
    one = event("transcode.xml")
    await run_handler("email", options(port, ca_file, html=False), one, one, event("snapshot.xml"))

    first, again, other = mailbox.messages()
    assert first["Message-ID"] == again["Message-ID"] != other["Message-ID"]
    assert not first.is_multipart()


async def test_smtps_from_the_first_byte(certificates):
    server_context, ca_file = certificates
    mailbox = Mailbox()
    # aiosmtpd does not count a TLS-from-the-start connection as TLS for AUTH.
    controller = relay(mailbox, ssl_context=server_context, auth_require_tls=False)
    try:
        await run_handler("email", options(controller.port, ca_file, security="ssl"), event())
    finally:
        controller.stop()
    assert len(mailbox.envelopes) == 1


async def test_a_plain_local_relay_without_auth():
    mailbox = Mailbox()
    controller = relay(mailbox, auth_require_tls=False)
    try:
        plain = {"host": "127.0.0.1", "port": controller.port, "security": "none"}
        await run_handler(
            "email", {**plain, "from": "ci@example.com", "to": ["ops@example.com"]}, event()
        )
    finally:
        controller.stop()
    assert mailbox.logins == []
    assert len(mailbox.envelopes) == 1


async def test_a_wrong_password_stops_the_start_with_a_clear_error(starttls_relay):
    _, port, ca_file = starttls_relay
    handler = EmailHandler(options(port, ca_file, password="wrong"))
    with pytest.raises(RuntimeError, match=f"refused the login of '{USER}': 535"):
        await handler.start()


async def test_an_untrusted_certificate_stops_the_start(starttls_relay):
    _, port, _ = starttls_relay
    handler = EmailHandler(options(port, ca_file=None))  # the system's CAs only
    with pytest.raises(RuntimeError, match=r"cannot connect to smtp://127.0.0.1.*CERTIFICATE"):
        await handler.start()


async def test_a_relay_that_went_down_is_retried(certificates):
    server_context, ca_file = certificates
    mailbox = Mailbox()
    controller = relay(mailbox, tls_context=server_context, require_starttls=True)
    handler = EmailHandler(options(controller.port, ca_file))
    await handler.start()
    controller.stop()
    with pytest.raises(Retry):
        await handler(event())


@pytest.mark.parametrize(
    ("recipient", "outcome"), [("refused@example.com", Fail), ("later@example.com", Retry)]
)
async def test_refused_recipients(starttls_relay, recipient, outcome):
    _, port, ca_file = starttls_relay
    with pytest.raises(outcome, match=recipient):
        await run_handler("email", options(port, ca_file, to=[recipient]), event())


def test_username_without_password_is_refused():
    with pytest.raises(handlers.HandlerConfigError, match="give both username and password"):
        handlers.build(
            "email", {"host": "smtp.example.com", "username": "u", "from": "a@b", "to": ["c@d"]}
        )


async def test_a_digest_is_one_mail_counting_the_events_with_a_link(starttls_relay):
    from handlers import BatchContext
    from receiver.dispatch.outcomes import handler_logger
    from tests.handlers.test_chat import digest_events

    mailbox, port, ca_file = starttls_relay
    handler = handlers.build("email", options(port, ca_file, digest="5m", digest_lines=2))
    ctx = BatchContext(
        handler="mail",
        deadline=0.0,
        log=handler_logger,
        runs={},
        inspector_url="https://ci.example.com/inspector",
    )
    await handlers.start(handler)
    try:
        assert await handler.handle_batch(digest_events(), ctx) is None
    finally:
        await handlers.close(handler)
    [mail] = mailbox.messages()
    assert mail["Subject"].startswith("[ci-receiver] 9 failed: Transcode 8, ")
    text = mail.get_body(("plain",)).get_content()
    assert "All 12 in the inspector: https://ci.example.com/inspector/events?handler=mail&" in text
    assert text.rstrip().endswith("and 10 more")
    assert text.count("State: Failed") == 2
    html_part = mail.get_body(("html",)).get_content()
    assert '<a href="https://ci.example.com/inspector/events?handler=mail&amp;since=' in html_part
    assert "<at id=all>" not in html_part  # the forged event's values, escaped as ever


class Hanging(Mailbox):
    """A relay that takes the message and then never answers."""

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(30)
        return "250 Message accepted"


async def test_an_attempt_stopped_while_the_relay_hangs_ends_at_once():
    # Its time limit (or SIGTERM's drain) cancels it: it must not then wait up to
    # request_timeout for the answer to a polite QUIT, past its lease.
    mailbox = Hanging()
    controller = relay(mailbox)
    try:
        handler = handlers.build(
            "email",
            options(
                controller.port, security="none", request_timeout=6, username=None, password=None
            ),
        )
        began = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(handler(event()), 0.5)
        assert time.monotonic() - began < 1.5
    finally:
        controller.stop(no_assert=True)
