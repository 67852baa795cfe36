"""TLS for shardline's servers and for the router's channels to remote shards.

`TlsFiles` names a server's PEM files (certificate chain, private key, and optionally the CA that
client certificates must chain to: mutual TLS). `ServerTls` turns them into gRPC server
credentials and an `ssl.SSLContext` (HTTP API, metrics: `context()` is the current one, asked for
at each new connection), and `reload()` replaces both for new connections (SIGHUP): the files are
read once, the new context and gRPC configuration are built from what was read and checked, and
only then swapped in. Nothing of the old files survives a reload (a client CA removed from the
file is trusted on no port any more); a reload that fails raises TlsError and keeps the old ones. `ClientTlsFiles` is the other
side: the router's (or a health check's) channel to a TLS server, with its own certificate for mTLS.

It lives with the shard, the lowest component that serves TLS; the router imports it from here.
"""

from __future__ import annotations

import argparse
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc


class TlsError(ValueError):
    """A TLS file is missing, unreadable or does not load; the message names the flag."""


def read_pem(path: Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"{flag} {path}: cannot read it ({exc.strerror})") from None


@dataclass(frozen=True)
class TlsFiles:
    """A server's certificate chain and key; `client_ca_file` set means clients need certificates."""

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    flag: str = "--tls"  # the flags' prefix, for messages: --tls-cert-file ...

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    def validate(self) -> None:
        """Both of cert and key or neither, a client CA only with them, every file loadable."""
        if (self.cert_file is None) != (self.key_file is None):
            raise TlsError(f"{self.flag}-cert-file and {self.flag}-key-file go together; only one was given")
        if self.client_ca_file is not None and not self.enabled:
            raise TlsError(f"{self.flag}-client-ca-file needs {self.flag}-cert-file and {self.flag}-key-file")
        if self.enabled:
            self.load()

    def load(self) -> tuple[bytes, bytes, bytes | None]:
        """(chain, key, client CA) read and checked: the key must match the certificate."""
        chain = read_pem(self.cert_file, f"{self.flag}-cert-file")
        key = read_pem(self.key_file, f"{self.flag}-key-file")
        ca = read_pem(self.client_ca_file, f"{self.flag}-client-ca-file") if self.client_ca_file else None
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            probe.load_cert_chain(self.cert_file, self.key_file)
            if ca is not None:
                probe.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise TlsError(f"{self.flag}-cert-file {self.cert_file} / {self.flag}-key-file {self.key_file}"
                           f"{' / ' + self.flag + '-client-ca-file ' + str(self.client_ca_file) if ca else ''}: "
                           f"do not load as a PEM certificate chain, its private key and a CA ({exc})") from None
        return chain, key, ca


class ServerTls:
    """Credentials of one server from `files` (enabled), replaced as a whole by `reload()`."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._chain, self._key, self._ca, self._context = self._build()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()

    @property
    def mutual(self) -> bool:
        return self._ca is not None

    def _build(self) -> tuple[bytes, bytes, bytes | None, ssl.SSLContext]:
        """Reads the files, builds a server context from them and checks that the files did not
        change in between (the context loads paths, gRPC takes bytes: both must be the same files)."""
        chain, key, ca = self.files.load()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.files.cert_file, self.files.key_file)
            if ca is not None:
                context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
                context.verify_mode = ssl.CERT_REQUIRED
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise TlsError(f"{self.files.flag}-cert-file {self.files.cert_file}: does not load ({exc})") from None
        if self.files.load() != (chain, key, ca):
            raise TlsError(f"{self.files.flag}-cert-file {self.files.cert_file} and its key or CA changed while "
                           f"being read; send SIGHUP again once they are written")
        return chain, key, ca, context

    def _grpc_config(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self._key, self._chain)], root_certificates=self._ca)

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Server credentials that pick up `reload()` at the next handshake."""
        return grpc.dynamic_ssl_server_credentials(self._grpc_config(), self._fetch,
                                                   require_client_authentication=self.mutual)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:  # called by gRPC's core at each handshake: None keeps the current pair
            pending, self._pending = self._pending, None
        return pending

    def context(self) -> ssl.SSLContext:
        """The current server SSLContext (TLS 1.2+, client certificates required with a CA): ask
        for it at each new connection, never keep it."""
        return self._context

    def reload(self) -> None:
        """Replaces the credentials for connections made from now on: built and checked first,
        then swapped; raises TlsError (the old ones stay in use) when the files do not load."""
        chain, key, ca, context = self._build()  # raises before anything changes
        with self._lock:
            self._chain, self._key, self._ca, self._context = chain, key, ca, context
            self._pending = self._grpc_config()


@dataclass(frozen=True)
class ClientTlsFiles:
    """The client side of TLS: the CA to verify the server with, and a certificate for mTLS."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""  # expected name in the server's certificate, instead of the address's host
    flag: str = "--shard-tls"

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None

    def validate(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise TlsError(f"{self.flag}-cert-file and {self.flag}-key-file go together; only one was given")
        if self.cert_file is not None and not self.enabled:
            raise TlsError(f"{self.flag}-cert-file needs {self.flag}-ca-file (the CA of the servers)")
        if self.enabled:
            self.credentials()

    def credentials(self) -> grpc.ChannelCredentials:
        ca = read_pem(self.ca_file, f"{self.flag}-ca-file")
        key = read_pem(self.key_file, f"{self.flag}-key-file") if self.key_file else None
        chain = read_pem(self.cert_file, f"{self.flag}-cert-file") if self.cert_file else None
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)

    def options(self) -> list[tuple[str, str]]:
        """Channel options: the name to verify, when it differs from the address."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def add_server_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str) -> None:
    """--tls-cert-file, --tls-key-file, --tls-client-ca-file for the server that serves `what`."""
    p.add_argument("--tls-cert-file", type=Path, default=None, metavar="PEM",
                   help=f"serve {what} over TLS with this certificate chain (with --tls-key-file); "
                        f"SIGHUP reloads both files for new connections")
    p.add_argument("--tls-key-file", type=Path, default=None, metavar="PEM", help="the certificate's private key")
    p.add_argument("--tls-client-ca-file", type=Path, default=None, metavar="PEM",
                   help="mutual TLS: refuse clients without a certificate signed by this CA")


def server_files(args: argparse.Namespace) -> TlsFiles:
    return TlsFiles(getattr(args, "tls_cert_file", None), getattr(args, "tls_key_file", None),
                    getattr(args, "tls_client_ca_file", None))


def check_shard_port(listen: str, files: TlsFiles, insecure: bool) -> str | None:
    """A shard's --listen against its TLS: a TCP address needs mutual TLS (a certificate and a
    client CA, so that only the router can call Step or Reset), else TlsError naming the flags;
    with `insecure` (--insecure-shard-port) it is allowed, and the warning to log is returned."""
    if listen.startswith("unix://"):
        return None
    if files.enabled and files.client_ca_file is not None:
        return None
    what = "plaintext" if not files.enabled else "TLS without client certificates"
    if insecure:
        return (f"--listen {listen} is a TCP port served {what} (--insecure-shard-port): anyone who reaches it "
                f"can call Step, Reset and Warmup and corrupt or stall every stream; only the network "
                f"(NetworkPolicy, an internal network) protects it")
    raise TlsError(f"--listen {listen} is a TCP port, served {what}: a shard there needs mutual TLS "
                   f"(--tls-cert-file, --tls-key-file and --tls-client-ca-file) so that only the router can "
                   f"call it; pass --insecure-shard-port to run it so on purpose, behind a private network")
