"""Certificates made in the test: a self-signed CA, a server certificate for localhost/127.0.0.1
and a client certificate, all signed by it, written as PEM files (with `cryptography`)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    """PEM files of one CA and the certificates it signed."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @property
    def ca_pem(self) -> bytes:
        return self.ca.read_bytes()


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _cert(subject: str, key, issuer: x509.Name, signer, *, ca: bool = False, usage=None,
          names: tuple[str, ...] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if names:
        sans = [x509.DNSName(n) for n in names if not n[0].isdigit()]
        sans += [x509.IPAddress(ipaddress.ip_address(n)) for n in names if n[0].isdigit()]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))


def make_pki(folder: Path, names: tuple[str, ...] = ("localhost", "127.0.0.1"), tag: str = "") -> Pki:
    """A fresh CA in `folder` and a server (for `names`) and a client certificate it signed."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, server_key, client_key = _key(), _key(), _key()
    ca_name = _name(f"shardline test CA {tag}")
    ca = _cert(f"shardline test CA {tag}", ca_key, ca_name, ca_key, ca=True)
    server = _cert("server", server_key, ca_name, ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH, names=names)
    client = _cert("client", client_key, ca_name, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write(folder / "server", server, server_key)
    _write(folder / "client", client, client_key)
    return Pki(folder / "ca.crt", folder / "server.crt", folder / "server.key", folder / "client.crt",
               folder / "client.key")
