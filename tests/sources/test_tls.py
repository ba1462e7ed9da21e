"""The listeners' certificates (receiver/sources/tls.py) on real files from a test CA,
each served in a real TLS handshake (in memory, the client verifying against the CA):
a renewal reaches new handshakes through the context the server was given, a pair that
cannot be served is refused in one line and leaves the running one, and a relay's
SIGHUP (no handlers, certificates only) reloads them and counts the outcome."""

from __future__ import annotations

import ssl

import pytest

from receiver.metrics import Metrics
from receiver.runtime.reload import Reloader
from receiver.sources.tls import TlsCertificate, TlsError, TlsFiles, server_context
from tests.support.certificates import Certificates


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """A TLS handshake between the two contexts over memory; the client's end, done."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_end = client.wrap_bio(to_client, to_server, server_hostname="127.0.0.1")
    from_client, from_server = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_end = server.wrap_bio(from_client, from_server, server_side=True)
    for _ in range(10):
        done = 0
        for end in (client_end, server_end):
            try:
                end.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        from_client.write(to_server.read())
        to_client.write(from_server.read())
        if done == 2:
            return client_end
    raise AssertionError("the handshake did not end")


def served(certificate: TlsCertificate, certificates: Certificates) -> bytes:
    """What a new connection to a server given `certificate.listening` is served (DER)."""
    peer = handshake(certificate.listening, certificates.client()).getpeercert(True)
    assert peer is not None
    return peer


def files(certificates: Certificates, password: str | None = None) -> TlsFiles:
    return TlsFiles("http", certificates.cert, certificates.key, password)


def test_a_renewal_reaches_new_handshakes_and_open_ones_keep_theirs(certificates):
    certificate = TlsCertificate("public", files(certificates))
    first = certificates.served
    client = certificates.client()
    client.set_alpn_protocols(["h2", "http/1.1"])
    before = handshake(certificate.listening, client)
    renewed = certificates.renew()
    assert served(certificate, certificates) == first  # read again only on reload
    certificate.reload()
    assert served(certificate, certificates) == renewed
    assert before.getpeercert(True) == first
    assert before.selected_alpn_protocol() == "http/1.1"  # never h2: not served


def test_an_encrypted_key_needs_its_password(certificates):
    certificates.encrypt_key(b"s3cret")
    with pytest.raises(TlsError) as refused:
        server_context(files(certificates))
    assert str(refused.value) == (
        f"[http] tls_key: {certificates.key} is encrypted: set tls_key_password"
    )
    with pytest.raises(TlsError) as refused:
        server_context(files(certificates, "wrong"))
    assert str(refused.value) == (
        f"[http] tls_key: {certificates.key} holds no PEM private key"
        " (or tls_key_password is wrong)"
    )
    certificate = TlsCertificate("public", files(certificates, "s3cret"))
    assert served(certificate, certificates) == certificates.served


def test_a_renewal_that_cannot_be_served_leaves_the_running_one(certificates):
    certificate = TlsCertificate("public", files(certificates))
    running, first = certificate.context, certificates.served
    certificates.renew()
    certificates.cert.write_text("not a certificate\n")
    with pytest.raises(TlsError, match=r"^\[http\] tls_cert: .* holds no PEM certificate$"):
        certificate.reload()
    assert certificate.context is running
    assert served(certificate, certificates) == first


async def test_a_relay_reload_takes_the_certificates_and_counts_each_outcome(certificates):
    certificate = TlsCertificate("public", files(certificates))
    metrics = Metrics()
    reload = Reloader(None, None, metrics, [certificate]).reload
    renewed = certificates.renew()
    assert await reload() is True
    assert served(certificate, certificates) == renewed
    certificates.key.write_bytes(certificates.other_key())
    assert await reload() is False
    assert served(certificate, certificates) == renewed
    outcomes = {
        sample.labels["outcome"]: sample.value
        for sample in metrics.config_reloads.collect()[0].samples
        if sample.name.endswith("_total")
    }
    assert outcomes == {"applied": 1.0, "refused": 1.0}
