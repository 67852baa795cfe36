"""TLS and API keys on the router's public ports, in-process and without shards (issue 15).

One RouterServer with a certificate made here (tls_certs.py) and two tenants' keys serves gRPC,
the HTTP API and /metrics: each port speaks only TLS; every RPC of every service but health, every
HTTP route but /health, and /metrics answer UNAUTHENTICATED / 401 to no key and to a wrong key, in
one shape; health answers without a key. The method and route lists come from the proto
descriptors and the app itself, so an RPC or route added later is covered too.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from router_harness import free_port
from shardline.client import Client, UnauthenticatedError, UnavailableError
from shardline.proto import serving_pb2
from shardline.router.config import RouterConfig
from shardline.router.api.openai.app import create_app
from shardline.router.api.security_config import SecurityConfig
from shardline.common.tls import TlsFiles
from test_openai_refusals import _tokenizer
from test_public_server import CONFIG, ServerThread
from tls_certs import Pki, make_pki

ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"
KEYS = f"# the test's tenants\nalice:{ALICE}\n\nbob:{BOB}   # bob's key\n"
WRONG = "mallory-key-000000000"
SERVICES = [serving_pb2.DESCRIPTOR.services_by_name["Generation"],
            reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]]
EVERY_RPC = [f"/{s.full_name}/{m.name}" for s in SERVICES for m in s.methods] + [
    "/shardline.v1.Generation/NoSuchMethod", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"]
STREAMING = {"/shardline.v1.Generation/GenerateStream": "unary_stream"} | {
    f"/{SERVICES[1].full_name}/ServerReflectionInfo": "stream_stream",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": "stream_stream"}


def serve(tmp: Path, pki: Pki, tokenizer, mutual: bool = False, **security) -> ServerThread:
    keys = tmp / "keys.txt"
    keys.write_text(KEYS)
    tls = TlsFiles(pki.server_cert, pki.server_key, pki.ca if mutual else None)
    cfg = RouterConfig(**{**CONFIG.__dict__, "http_port": free_port(), "model": Path("/models/tiny"),
                          "security": SecurityConfig(tls=tls, api_key_file=keys, **security)})
    running = ServerThread(cfg, tokenizer)
    running.target = f"localhost:{running.port}"
    running.metrics_port = running.call(running.server.serve_metrics(running.servicer.metrics.registry, 0))
    return running


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return _tokenizer(tmp_path_factory, llama_style=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory, pki: Pki, tokenizer) -> Iterator[ServerThread]:
    # Hundreds of wrong keys from one address below: the failed-attempt limit (test_key_attempts.py) is off here.
    running = serve(tmp_path_factory.mktemp("server"), pki, tokenizer, max_metadata_entries=16,
                    max_failed_key_attempts=0)
    yield running
    running.stop()


def secure_channel(server: ServerThread, pki: Pki) -> grpc.Channel:
    return grpc.secure_channel(server.target, grpc.ssl_channel_credentials(pki.ca_pem))


def call(channel: grpc.Channel, method: str, metadata) -> None:
    """Calls `method` with an empty message; returns normally or raises grpc.RpcError."""
    kind = STREAMING.get(method, "unary_unary")
    stub = getattr(channel, kind)(method)
    request = iter([b""]) if kind == "stream_stream" else b""
    reply = stub(request, metadata=metadata, timeout=10)
    if kind != "unary_unary":
        list(reply)


# -- gRPC ---------------------------------------------------------------------------------------------

def test_the_grpc_port_speaks_only_tls(server: ServerThread, pki: Pki) -> None:
    with Client(server.target, retries=0, api_key=ALICE) as plaintext, pytest.raises(UnavailableError):
        plaintext.tokenize("Hello", timeout=5)


def test_the_sdk_with_root_certificates_and_a_key_works(server: ServerThread, pki: Pki) -> None:
    with Client(server.target, root_certificates=pki.ca_pem, api_key=ALICE) as client:
        assert client.tokenize("Hello world") and client.health("liveness")
        with pytest.raises(UnavailableError, match="still loading"):  # through the gate: no shards here
            client.generate("Hello", max_new_tokens=2)


@pytest.mark.parametrize("method", EVERY_RPC)
@pytest.mark.parametrize("key", [None, WRONG, ""], ids=["no-key", "wrong-key", "empty-key"])
def test_every_rpc_but_health_needs_a_valid_key(server: ServerThread, pki: Pki, method: str, key) -> None:
    metadata = None if key is None else [("authorization", f"Bearer {key}")]
    with secure_channel(server, pki) as channel, pytest.raises(grpc.RpcError) as refused:
        call(channel, method, metadata)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused.value.details() == ("invalid API key" if key else
                                       "missing API key: send the header 'authorization: Bearer <key>'")


@pytest.mark.parametrize("method", [m for m in EVERY_RPC if "NoSuch" not in m and ".v1.Server" not in m])
def test_with_a_key_every_rpc_reaches_its_handler(server: ServerThread, pki: Pki, method: str) -> None:
    with secure_channel(server, pki) as channel:
        try:
            call(channel, method, [("authorization", f"bearer {BOB}")])  # the scheme is case-insensitive
        except grpc.RpcError as error:  # an empty request is refused by the handler itself
            assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE), error


def test_health_answers_without_a_key(server: ServerThread, pki: Pki) -> None:
    with secure_channel(server, pki) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()


def test_the_sdk_raises_unauthenticated_error(server: ServerThread, pki: Pki) -> None:
    for key in (None, WRONG):
        with Client(server.target, root_certificates=pki.ca_pem, api_key=key, retries=0) as client:
            with pytest.raises(UnauthenticatedError):
                client.tokenize("Hello")


def test_too_many_metadata_entries_are_refused_before_the_key(server: ServerThread, pki: Pki) -> None:
    metadata = [("authorization", f"Bearer {ALICE}")] + [(f"x-pad-{i}", "1") for i in range(20)]
    with secure_channel(server, pki) as channel, pytest.raises(grpc.RpcError) as refused:
        call(channel, "/grpc.health.v1.Health/Check", metadata)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than --max-metadata-entries=16" in refused.value.details()


# -- HTTP ---------------------------------------------------------------------------------------------

def https(server: ServerThread, pki: Pki, path: str, method: str = "GET", key: str | None = None,
          headers: dict[str, str] | None = None, port: int | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request over TLS."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    all_headers = {"content-type": "application/json", **(headers or {})}
    if key is not None:
        all_headers["authorization"] = f"Bearer {key}"
    body = b"{}" if method == "POST" else None
    url = f"https://localhost:{port or server.server.http_port}{path}"
    request = urllib.request.Request(url, data=body, method=method, headers=all_headers)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            raw, status, got = response.read(), response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        raw, status, got = error.read(), error.code, dict(error.headers)
    try:
        return status, json.loads(raw), {k.lower(): v for k, v in got.items()}
    except ValueError:
        return status, {"text": raw.decode()}, {k.lower(): v for k, v in got.items()}


def every_route(server: ServerThread) -> list[tuple[str, str]]:
    app = create_app(server.servicer, lambda: False)
    routes = [(r.path, m) for r in app.routes for m in sorted(r.methods) if r.path != "/health"]
    assert {p for p, _ in routes} >= {"/v1/models", "/v1/completions", "/v1/chat/completions"}
    return routes + [("/v1/no-such-route", "GET"), ("/health/", "GET"), ("//health", "GET"), ("/HEALTH", "GET")]


@pytest.mark.parametrize("key", [None, WRONG], ids=["no-key", "wrong-key"])
def test_every_http_route_but_health_needs_a_valid_key(server: ServerThread, pki: Pki, key) -> None:
    for path, method in every_route(server):
        status, body, headers = https(server, pki, path, method, key)
        assert status == 401, (path, method, status, body)
        assert body == {"error": {"message": "invalid API key" if key else
                                  "missing API key: send the header 'authorization: Bearer <key>'",
                                  "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
        assert headers["www-authenticate"] == "Bearer"


def test_no_host_or_forwarding_header_opens_a_route(server: ServerThread, pki: Pki) -> None:
    for headers in ({"host": "localhost"}, {"host": "127.0.0.1:1"}, {"x-forwarded-for": "127.0.0.1"},
                    {"x-forwarded-host": "internal"}, {"x-original-url": "/health"}):
        assert https(server, pki, "/v1/models", headers=headers)[0] == 401, headers


def test_http_with_a_key_and_health_without_one(server: ServerThread, pki: Pki) -> None:
    status, body, _ = https(server, pki, "/v1/models", key=ALICE)
    assert status == 200 and body["data"][0]["id"] == "tiny"
    status, body, _ = https(server, pki, "/health")
    assert status == 503 and body == {"status": "NOT_SERVING"}


def test_the_http_port_speaks_only_tls(server: ServerThread) -> None:
    with pytest.raises((OSError, http.client.HTTPException)):
        urllib.request.urlopen(f"http://127.0.0.1:{server.server.http_port}/health", timeout=5).read()


def test_too_many_header_lines_are_431(server: ServerThread, pki: Pki) -> None:
    status, body, _ = https(server, pki, "/health", headers={f"x-pad-{i}": "1" for i in range(20)})
    assert status == 431 and "more than --max-metadata-entries=16" in body["error"]["message"]


# -- metrics -------------------------------------------------------------------------------------------

def test_metrics_need_a_key_and_count_refusals(server: ServerThread, pki: Pki) -> None:
    for key in (None, WRONG):
        status, body, _ = https(server, pki, "/metrics", key=key, port=server.metrics_port)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    https(server, pki, "/v1/models", port=None)  # one more refused HTTP call
    status, body, _ = https(server, pki, "/metrics", key=ALICE, port=server.metrics_port)
    assert status == 200
    refused = {line.split()[0]: float(line.split()[1]) for line in body["text"].splitlines()
               if line.startswith("shardline_unauthenticated_requests_total")}
    assert refused['shardline_unauthenticated_requests_total{api="http"}'] >= 1
    assert ALICE not in body["text"] and BOB not in body["text"]


def test_health_is_get_and_head_only_and_says_only_its_status(server: ServerThread, pki: Pki) -> None:
    status, body, _ = https(server, pki, "/health", method="HEAD")
    assert status == 503 and body == {"text": ""}
    for method in ("POST", "PUT", "DELETE"):  # not open: the key first, and then no such route
        assert https(server, pki, "/health", method=method)[0] == 401
        assert https(server, pki, "/health", method=method, key=ALICE)[0] == 405


def test_one_startup_line_names_every_public_port_its_tls_and_keys(server: ServerThread) -> None:
    line = server.server.describe_ports()
    s = server.server
    assert line.startswith(f"public ports: gRPC 127.0.0.1:{s.port} (TLS, API keys), HTTP 127.0.0.1:{s.http_port} "
                           f"(TLS, API keys), metrics 127.0.0.1:{s.metrics_port} (TLS, API keys)"), line
    assert "WARNING" not in line
