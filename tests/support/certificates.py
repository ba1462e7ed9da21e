"""Certificates for TLS tests: a test CA (trustme), and the server certificate and key
files a config names."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme


class Certificates:
    """A test CA, and the server certificate and key files a config names; `renew`
    writes a new pair in their place, as certbot does."""

    def __init__(self, folder: Path) -> None:
        self.ca = trustme.CA()
        self.ca_file = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.cert = folder / "cert.pem"
        self.key = folder / "key.pem"
        self.renew()

    def renew(self) -> bytes:
        """A new certificate and key in the files; the certificate, DER."""
        issued = self.ca.issue_cert("127.0.0.1", "localhost")
        self.cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
        self.key.write_bytes(issued.private_key_pem.bytes())
        self.served = ssl.PEM_cert_to_DER_cert(issued.cert_chain_pems[0].bytes().decode())
        return self.served

    def other_key(self) -> bytes:
        return self.ca.issue_cert("127.0.0.1").private_key_pem.bytes()

    def client(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def keys(self) -> str:
        return f'tls_cert = "{self.cert}"\ntls_key = "{self.key}"\n'

    def encrypt_key(self, password: bytes) -> None:
        """The key file, encrypted with `password` (PKCS#8, PEM)."""
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(self.key.read_bytes(), None)
        self.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(password),
            )
        )
