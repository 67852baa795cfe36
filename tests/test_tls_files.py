"""TLS beyond the basics (issue 15): mutual TLS refuses clients without a certificate on gRPC and
HTTP, new certificates are picked up for new connections on reload (what SIGHUP does), a pair that
does not load is refused with the flag named, and the old one is kept."""

from __future__ import annotations

import shutil
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from shardline.client import Client, UnavailableError
from shardline.router.api.security_config import SecurityConfig
from shardline.common.tls import ClientTlsFiles, TlsError, TlsFiles
from test_openai_refusals import _tokenizer
from test_security_gates import ALICE, serve
from tls_certs import make_pki


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return _tokenizer(tmp_path_factory, llama_style=True)


def http_health(port: int, ca: Path, cert: Path | None = None, key: Path | None = None) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    try:
        return urllib.request.urlopen(f"https://localhost:{port}/health", timeout=10, context=context).status
    except urllib.error.HTTPError as error:
        return error.code


def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path: Path, tokenizer) -> None:
    pki = make_pki(tmp_path / "pki")
    server = serve(tmp_path, pki, tokenizer, mutual=True)
    try:
        with Client(server.target, root_certificates=pki.ca_pem, api_key=ALICE, retries=0) as anonymous:
            with pytest.raises(UnavailableError):
                anonymous.tokenize("Hello", timeout=5)
        mine = grpc.ssl_channel_credentials(pki.ca_pem, pki.client_key.read_bytes(), pki.client_cert.read_bytes())
        with Client(server.target, credentials=mine, api_key=ALICE) as client:
            assert client.tokenize("Hello")
        with pytest.raises((ssl.SSLError, OSError)):
            http_health(server.server.http_port, pki.ca)
        assert http_health(server.server.http_port, pki.ca, pki.client_cert, pki.client_key) == 503
    finally:
        server.stop()


def test_reload_serves_new_certificates_to_new_connections(tmp_path: Path, tokenizer) -> None:
    old, new = make_pki(tmp_path / "old", tag="old"), make_pki(tmp_path / "new", tag="new")
    live = make_pki(tmp_path / "live", tag="old")  # the files the server reads: the old pair first
    for name in ("server.crt", "server.key"):
        shutil.copy(old.ca.parent / name, live.ca.parent / name)
    server = serve(tmp_path, live, tokenizer)
    try:
        with Client(server.target, root_certificates=old.ca_pem, api_key=ALICE) as client:
            assert client.tokenize("Hello")
        for name in ("server.crt", "server.key"):
            shutil.copy(new.ca.parent / name, live.ca.parent / name)
        server.server.reload_tls()
        with Client(server.target, root_certificates=new.ca_pem, api_key=ALICE) as client:
            assert client.tokenize("Hello")
        with Client(server.target, root_certificates=old.ca_pem, api_key=ALICE, retries=0) as stale:
            with pytest.raises(UnavailableError):
                stale.tokenize("Hello", timeout=5)
        assert http_health(server.server.http_port, new.ca) == 503
        live.server_key.write_bytes(old.server_key.read_bytes())  # no longer matches: refused, kept
        server.server.reload_tls()
        with Client(server.target, root_certificates=new.ca_pem, api_key=ALICE) as client:
            assert client.tokenize("Hello")
    finally:
        server.stop()


def test_files_that_do_not_load_are_refused_naming_the_flag(tmp_path: Path) -> None:
    pki, other = make_pki(tmp_path / "a"), make_pki(tmp_path / "b")
    with pytest.raises(TlsError, match="--tls-cert-file and --tls-key-file go together"):
        TlsFiles(pki.server_cert).validate()
    with pytest.raises(TlsError, match="--tls-client-ca-file needs --tls-cert-file"):
        TlsFiles(client_ca_file=pki.ca).validate()
    with pytest.raises(TlsError, match="do not load as a PEM certificate chain"):
        TlsFiles(pki.server_cert, other.server_key).validate()
    with pytest.raises(TlsError, match="--tls-cert-file /nonexistent.pem: cannot read it"):
        TlsFiles(Path("/nonexistent.pem"), pki.server_key).validate()
    with pytest.raises(TlsError, match="--shard-tls-cert-file needs --shard-tls-ca-file"):
        ClientTlsFiles(cert_file=pki.client_cert, key_file=pki.client_key).validate()
    with pytest.raises(ValueError, match="--max-n must be >= 1, got 0"):
        SecurityConfig(max_n=0).validate()
