"""`email`: one message per event through an SMTP relay (aiosmtplib), as plain text with
an HTML alternative.

`start()` connects and logs in once, so a wrong host or password shows at start-up
(the handler is held back and its events wait) rather than as failed events. Each
event then gets its own connection: notification mail is rare enough that holding a
session open would only mean handling its time-outs.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable, Mapping, Sequence
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any, Literal

import aiosmtplib
from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from handlers import BatchContext, BatchResult, Fail, Retry, digest
from handlers.digest import DigestOptions
from handlers.markup import HTML, TEXT, Markup
from handlers.message import DEFAULT_TEMPLATE, check_template, render
from receiver.callback.event import Event
from receiver.timezones import check_timezone, parse_timezone

DEFAULT_PORTS = {"starttls": 587, "ssl": 465, "none": 25}


class EmailOptions(DigestOptions):
    model_config = ConfigDict(populate_by_name=True)

    host: str
    # Default: 587 for starttls, 465 for ssl, 25 for none.
    port: int | None = Field(None, ge=1, le=65535)
    # starttls: upgrade a plain connection (required, never silently skipped);
    # ssl: TLS from the first byte (SMTPS); none: no encryption (a local relay).
    security: Literal["starttls", "ssl", "none"] = "starttls"
    username: str | None = None
    password: SecretStr | None = None
    # A CA bundle (PEM) to trust instead of the system's, e.g. for a private relay.
    ca_file: Path | None = None
    sender: str = Field(alias="from")
    to: list[str] = Field(min_length=1)
    subject: str = "[ci-receiver] $title"
    template: str = DEFAULT_TEMPLATE
    # Also send an HTML alternative rendered from the same template.
    html: bool = True
    request_timeout: float = Field(30.0, gt=0)
    # The zone of the times in the mail: an IANA name (Asia/Shanghai) or UTC.
    timezone: str = "UTC"

    _check_templates = field_validator("subject", "template")(check_template)
    _check_timezone = field_validator("timezone")(check_timezone)

    @model_validator(mode="after")
    def _port_and_login(self) -> EmailOptions:
        if self.port is None:
            self.port = DEFAULT_PORTS[self.security]
        if (self.username is None) != (self.password is None):
            raise ValueError("give both username and password, or neither")
        return self


class EmailHandler:
    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = EmailOptions.model_validate(options)
        self._tls: ssl.SSLContext | None = None
        self._zone = parse_timezone(self.options.timezone)
        # With a digest, events come in batches: the window's.
        self.batching = self.options.batching()

    async def start(self) -> None:
        where = f"smtp://{self.options.host}:{self.options.port}"
        try:
            if self.options.security != "none":
                cafile = str(self.options.ca_file) if self.options.ca_file else None
                self._tls = ssl.create_default_context(cafile=cafile)
            smtp = self._client()
            await smtp.connect()
            await smtp.quit()
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise RuntimeError(
                f"{where} refused the login of {self.options.username!r}: {exc.code} {exc.message}"
            ) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise RuntimeError(f"cannot connect to {where}: {exc}") from None

    async def __call__(self, event: Event) -> None:
        await self.send(self.message(event))

    async def handle_batch(self, events: Sequence[Event], ctx: BatchContext) -> BatchResult:
        """One mail for the digest's events; one event alone, its usual mail."""
        if len(events) == 1:
            await self(events[0])
        else:
            link = digest.events_link(ctx.inspector_url, ctx.handler, events)
            await self.send(self.digest_message(events, link))
        return None

    async def send(self, message: EmailMessage) -> None:
        try:
            await self._deliver(message)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refusals = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            if all(r.code >= 500 for r in exc.recipients):
                raise Fail(f"every recipient refused: {refusals}") from None
            raise Retry(f"recipients refused for now: {refusals}") from None
        except aiosmtplib.SMTPResponseException as exc:
            # SMTP's own split: 5xx is permanent (bad login, sender refused), 4xx is not.
            error = f"{type(exc).__name__}: {exc.code} {exc.message}"
            raise (Fail(error) if exc.code >= 500 else Retry(error)) from None
        except aiosmtplib.SMTPNotSupported as exc:
            raise Fail(f"the relay cannot do what is configured: {exc}") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise Retry(f"{type(exc).__name__}: {exc}") from None

    async def _deliver(self, message: EmailMessage) -> None:
        smtp = self._client()
        try:
            await smtp.connect()
            await smtp.send_message(message)
        except BaseException:
            # At once: `async with` would send QUIT and wait up to request_timeout for its
            # answer, past the attempt's time limit (its lease) and SIGTERM's drain.
            smtp.close()
            raise
        # The message is taken: a relay that answers QUIT badly or late changes nothing.
        try:
            await smtp.quit()
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()
        except BaseException:
            smtp.close()
            raise

    def message(self, event: Event) -> EmailMessage:
        options = self.options
        return self._mail(
            render(options.subject, event, TEXT, self._zone),
            [event],
            lambda markup: render(options.template, event, markup, self._zone),
        )

    def digest_message(self, events: Sequence[Event], link: str | None) -> EmailMessage:
        """The digest: its subject the subject template with the digest's title as
        `$title` (other fields: the first event's)."""
        options = self.options
        subject = render(
            options.subject, events[0], TEXT, self._zone, title_text=digest.title(events)
        )

        def one(markup: Markup) -> Callable[[Event], str]:
            return lambda event: render(options.template, event, markup, self._zone)

        return self._mail(
            subject,
            events,
            lambda markup: digest.body(events, markup, one(markup), options.digest_lines, link),
        )

    def _mail(
        self, subject: str, events: Sequence[Event], text: Callable[[Markup], str]
    ) -> EmailMessage:
        options = self.options
        message = EmailMessage()
        message["Subject"] = " ".join(subject.split())
        message["From"] = options.sender
        message["To"] = ", ".join(options.to)
        message["Date"] = formatdate(usegmt=True)
        # The same events always get the same Message-ID, so a repeat after a crash can
        # be recognized by mail clients and filters.
        ids = "\n".join(event.id for event in events)
        message["Message-ID"] = f"<{hashlib.sha256(ids.encode()).hexdigest()[:32]}@ci-receiver>"
        message.set_content(text(TEXT))
        if options.html:
            message.add_alternative(
                f'<html><body style="font-family: sans-serif">{text(HTML)}</body></html>',
                subtype="html",
            )
        return message

    def _client(self) -> aiosmtplib.SMTP:
        options = self.options
        return aiosmtplib.SMTP(
            hostname=options.host,
            port=options.port,
            username=options.username,
            password=options.password.get_secret_value() if options.password else None,
            use_tls=options.security == "ssl",
            start_tls=options.security == "starttls",
            tls_context=self._tls,
            timeout=options.request_timeout,
        )
