"""TLS for the HTTP listeners: the certificate and key of `[http]` or `[admin]` read into a
server context, and read again on SIGHUP.

A context is made whole before it is used: the files are read, the certificate chain and
key loaded and matched, or `TlsError` says in one line which key of which section is
wrong and why. A reload makes a new context the same way and only then takes it in
place of the old one, so that a renewal half written (or a key that does not match)
leaves the running certificate serving. Each connection takes the context in force when
its handshake begins: new connections get the new certificate, open ones keep theirs.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from receiver.config import Config, Listener

logger = structlog.get_logger("ci_receiver.tls")

# HTTP/1.1 is what the listeners speak; said in the handshake to clients that ask (ALPN).
ALPN = ["http/1.1"]


Section = Literal["http", "admin"]
# Each listener's name in logs and errors, by the section that configures it.
LISTENERS: dict[Section, str] = {"http": "public", "admin": "admin"}


def listeners(config: Config) -> list[tuple[Section, Listener]]:
    """(section, keys) of each listener the config has: the admin one unless disabled."""
    found: list[tuple[Section, Listener]] = [("http", config.http)]
    if config.admin.enabled:
        found.append(("admin", config.admin))
    return found


def certificates(config: Config) -> list[TlsCertificate]:
    """The certificates of the listeners that serve TLS, read as at start; `TlsError`
    says why one cannot be served."""
    read = (TlsCertificate.of(section, keys) for section, keys in listeners(config))
    return [certificate for certificate in read if certificate is not None]


class TlsError(Exception):
    """A certificate or key that cannot be served; the message names the key and file."""


class _NoPassword(Exception):
    """The key is encrypted and no password is configured (rather than OpenSSL asking
    for one on the terminal)."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where one listener's certificate chain and private key are, as configured."""

    section: Section  # named in every error
    cert: Path
    key: Path
    password: str | None = None


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A server context serving `files` (TLS 1.2 at least, the ssl module's defaults for
    a server otherwise), or `TlsError`."""
    cert_pem = _read(files, "tls_cert", files.cert)
    _read(files, "tls_key", files.key)  # readable, or said so with its path
    where = f"[{files.section}]"
    try:
        ssl.create_default_context(cadata=cert_pem)
    except (ssl.SSLError, ValueError):
        raise TlsError(f"{where} tls_cert: {files.cert} holds no PEM certificate") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN)
    try:
        context.load_cert_chain(files.cert, files.key, password=_password(files.password))
    except _NoPassword:
        raise TlsError(f"{where} tls_key: {files.key} is encrypted: set tls_key_password") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(
                f"{where} tls_key: {files.key} does not match the certificate in tls_cert"
                f" {files.cert}"
            ) from None
        wrong_password = " (or tls_key_password is wrong)" if files.password else ""
        raise TlsError(
            f"{where} tls_key: {files.key} holds no PEM private key{wrong_password}"
        ) from None
    except OSError as exc:  # the files changed since they were read above
        raise TlsError(f"{where} tls_cert/tls_key: cannot be read: {exc}") from None
    return context


class TlsCertificate:
    """The context a listener's new connections are served with, replaced on reload.

    The server is given one context for good (`listening`, the first one made); each
    handshake moves its connection to the context in force (`context`) as the client's
    hello is read: the server-name callback, which OpenSSL calls on every handshake, with
    or without a name. Open connections keep the context they were served with."""

    def __init__(self, name: str, files: TlsFiles) -> None:
        self.name = name  # the listener's: "public" or "admin"
        self.files = files
        self.context = self.listening = server_context(files)
        self.listening.sni_callback = self._serve_current

    def _serve_current(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        current = self.context
        if connection.context is not current:
            connection.context = current

    @classmethod
    def of(cls, section: Section, config: Listener) -> TlsCertificate | None:
        """The certificate of the listener `[section]` configures; None: plain HTTP."""
        if config.tls_cert is None or config.tls_key is None:
            return None
        password = config.tls_key_password
        files = TlsFiles(
            section,
            config.tls_cert,
            config.tls_key,
            None if password is None else password.get_secret_value(),
        )
        return cls(LISTENERS[section], files)

    def reload(self) -> None:
        """Read the files again and serve them to new connections; `TlsError` (and the
        running certificate stays) when they cannot be served."""
        self.context = server_context(self.files)
        logger.info("tls certificate reloaded", server=self.name, cert=str(self.files.cert))


def _read(files: TlsFiles, key: str, path: Path) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise TlsError(
            f"[{files.section}] {key}: cannot read {path}: {exc.strerror or exc}"
        ) from None


def _password(password: str | None) -> str | Callable[[], str]:
    if password is not None:
        return password

    def none_configured() -> str:
        raise _NoPassword

    return none_configured
