"""A client whose own setup is wrong is told the likely cause and the flag that fixes it (issue 26):
a plaintext client to a TLS-only router, a TLS client that does not trust the router's certificate
or that reaches a plaintext router, a router that wants an API key. In-process gRPC servers (health
and a refusing Info), so no model is loaded; the CLI runs as a subprocess, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from shardline.client import Client, UnauthenticatedError, UnavailableError
from tls_certs import Pki, make_pki


def _server(credentials: grpc.ServerCredentials | None, refuse_info: bool = False) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    if refuse_info:
        def info(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing API key: send the header "
                                                           "'authorization: Bearer <key>'")
        handler = grpc.unary_unary_rpc_method_handler(info, request_deserializer=lambda b: b,
                                                      response_serializer=lambda b: b)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("shardline.v1.Generation",
                                                                              {"Info": handler})])
    address = "127.0.0.1:0"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_target(pki: Pki) -> Iterator[str]:
    creds = grpc.ssl_server_credentials([(pki.server_key.read_bytes(), pki.server_cert.read_bytes())])
    server, target = _server(creds)
    yield target
    server.stop(0)


@pytest.fixture(scope="module")
def plain_target() -> Iterator[str]:
    server, target = _server(None, refuse_info=True)
    yield target
    server.stop(0)


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardline.client.cli", *argv], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_plaintext_to_a_tls_router_names_tls_and_the_flag(tls_target: str) -> None:
    with Client(tls_target, retries=0) as client, pytest.raises(UnavailableError) as failed:
        client.info(timeout=10)
    assert "Socket closed" in failed.value.message
    assert "the router may serve TLS only" in failed.value.message and "--tls-ca-file" in failed.value.message


def test_an_untrusted_certificate_names_the_ca_flag_at_once(tls_target: str) -> None:
    start = time.monotonic()
    with Client(tls_target, tls=True) as client, pytest.raises(UnavailableError) as failed:
        client.info(timeout=30)
    assert time.monotonic() - start < 2, "a failed TLS handshake is not retried"
    assert "not signed by a CA this client trusts" in failed.value.message
    assert "--tls-ca-file" in failed.value.message


def test_tls_to_a_plaintext_router_says_so(plain_target: str, pki: Pki) -> None:
    with Client(plain_target, root_certificates=pki.ca_pem) as client, pytest.raises(UnavailableError) as failed:
        client.info(timeout=10)
    assert "the router may not serve TLS" in failed.value.message


def test_a_trusted_certificate_connects(tls_target: str, pki: Pki) -> None:
    with Client(tls_target, root_certificates=pki.ca_pem) as client:
        assert client.health(timeout=10)


def test_a_missing_key_names_the_flag_and_a_sent_one_does_not(plain_target: str) -> None:
    with Client(plain_target, retries=0) as client, pytest.raises(UnauthenticatedError) as failed:
        client.info(timeout=10)
    assert failed.value.message.endswith("; the router requires an API key: pass --api-key-file FILE "
                                         "(SDK: api_key=...)")
    with Client(plain_target, retries=0, api_key="wrong") as client, pytest.raises(UnauthenticatedError) as failed:
        client.info(timeout=10)
    assert "--api-key-file" not in failed.value.message


def test_generate_with_tls_and_a_self_signed_router_prints_one_line(tls_target: str) -> None:
    """No gRPC C-core log lines before the error (GRPC_VERBOSITY defaults to ERROR in the CLI)."""
    done = cli("generate", "--target", tls_target, "--tls", "--timeout", "20", "hello")
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: UNAVAILABLE:") and "--tls-ca-file" in lines[0], lines


def test_bench_without_a_key_says_the_router_wants_one(plain_target: str) -> None:
    done = cli("bench", "--target", plain_target, "--no-progress")
    assert done.returncode == 1, done.stderr
    line = done.stderr.strip()
    assert "no ready server" not in line and line.startswith(f"shardline: error: the router refused the call at "
                                                             f"{plain_target} (--target): UNAUTHENTICATED"), line
    assert "pass --api-key-file FILE" in line, line


def test_bench_against_nothing_says_no_ready_server(tmp_path: Path) -> None:
    done = cli("bench", "--target", f"unix://{tmp_path}/none.sock", "--no-progress")
    assert done.returncode == 1 and "no ready server at" in done.stderr, done.stderr
