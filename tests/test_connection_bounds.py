"""Connection bounds and certificate revocation on the router's public ports (issue 21, items 1-2).

One in-process router with mutual TLS (a client CA file holding two CAs), API keys, the HTTP API,
/metrics and a real batcher over the fake shard group (fake_shards.py), so that requests are
really served. Hundreds of idle connections (silent TCP, and TLS connections stuck in the middle
of a request head) are held against the HTTP and metrics ports while a keyed scrape, a chat
completion and a gRPC generate each answer promptly; the server then drops the idle ones after
--http-idle-timeout. Then one CA is removed from the file and SIGHUP sent: a client certificate
from it is refused on gRPC, HTTP and metrics, while the other CA's clients still connect.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import select
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from fake_shards import FakeGroup
from router_harness import free_port
from shardline.client import Client
from shardline.router.scheduling.batcher import Batcher
from shardline.router.scheduling.blocks import BlockAllocator
from shardline.router.config import RouterConfig
from shardline.router.api.security_config import SecurityConfig
from shardline.common.tls import TlsFiles
from test_openai_refusals import _tokenizer
from test_public_server import CONFIG, VOCAB, ServerThread
from tls_certs import Pki, make_pki

KEY = "sk-bounds-0000000000001"
IDLE_TIMEOUT = 6.0
SILENT, HALF_WRITTEN = 250, 50  # idle connections per port
PROMPT = 3.0  # seconds within which each request must be answered while the idle ones are held


@pytest.fixture(scope="module")
def pkis(tmp_path_factory) -> tuple[Pki, Pki]:
    folder = tmp_path_factory.mktemp("pki")
    return make_pki(folder / "a", tag="A"), make_pki(folder / "b", tag="B")


@pytest.fixture(scope="module")
def server(tmp_path_factory, pkis) -> Iterator[ServerThread]:
    a, b = pkis
    folder = tmp_path_factory.mktemp("bounds")
    (folder / "keys").write_text(f"ops:{KEY}\n")
    clients_ca = folder / "client-cas.pem"
    clients_ca.write_bytes(a.ca_pem + b.ca_pem)
    security = SecurityConfig(tls=TlsFiles(a.server_cert, a.server_key, clients_ca), api_key_file=folder / "keys",
                              http_idle_timeout=IDLE_TIMEOUT)
    cfg = RouterConfig(**{**CONFIG.__dict__, "http_port": free_port(), "model": Path("/models/tiny-llama"),
                          "security": security})
    running = ServerThread(cfg, _tokenizer(tmp_path_factory, llama_style=True))
    running.clients_ca = clients_ca
    running.metrics_port = running.call(running.server.serve_metrics(running.servicer.metrics.registry, 0))
    group = FakeGroup(vocab=VOCAB)  # the chat template's tokens are past 320
    running.call(_serve_fake(running, group))
    yield running
    running.stop()


async def _serve_fake(running: ServerThread, group: FakeGroup) -> None:
    batcher = Batcher(running.servicer.cfg, BlockAllocator(group.limits.num_blocks, group.limits.block_size),
                      eos_ids=frozenset())
    running.servicer.batcher = batcher
    running.batcher_task = asyncio.ensure_future(batcher.run(group))
    await running.server.set_ready(True)


def client_context(pki: Pki, server_ca: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(server_ca.ca))
    context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


def https(port: int, path: str, context: ssl.SSLContext, body: dict | None = None) -> tuple[int, str]:
    conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    try:
        headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
        conn.request("POST" if body else "GET", path, body=json.dumps(body) if body else None, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def grpc_client(pki: Pki, server_ca: Pki, port: int) -> Client:
    credentials = grpc.ssl_channel_credentials(server_ca.ca_pem, pki.client_key.read_bytes(),
                                               pki.client_cert.read_bytes())
    return Client(f"localhost:{port}", credentials=credentials, api_key=KEY, retries=0)


def hold_idle(port: int, context: ssl.SSLContext) -> list[socket.socket]:
    """SILENT connections that send nothing, HALF_WRITTEN that shake hands and stop mid-head."""
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(SILENT)]
    for _ in range(HALF_WRITTEN):
        tls = context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
        tls.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n")  # and never the blank line
        held.append(tls)
    return held


def readable(sock: socket.socket) -> bool:
    """Whether the server has written to (or closed) `sock` yet; poll() takes any descriptor number."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def closed_by_server(sock: socket.socket, deadline: float) -> bool:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        return sock.recv(1) == b""
    except (ssl.SSLError, ConnectionError):
        return True
    except TimeoutError:
        return False


def timed(fn):
    start = time.monotonic()
    result = fn()
    return result, time.monotonic() - start


def test_requests_are_answered_while_hundreds_of_idle_connections_are_held(server: ServerThread, pkis) -> None:
    a, _ = pkis
    context = client_context(a, a)
    held = hold_idle(server.server.http_port, context) + hold_idle(server.metrics_port, context)
    try:
        (status, text), took = timed(lambda: https(server.metrics_port, "/metrics", context))
        assert status == 200 and "shardline_" in text and took < PROMPT, (status, took)
        chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
                "ignore_eos": True}
        (status, text), took = timed(lambda: https(server.server.http_port, "/v1/chat/completions", context, chat))
        assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 4 and took < PROMPT, (text, took)
        with grpc_client(a, a, server.port) as client:
            result, took = timed(lambda: client.generate("Hello", max_new_tokens=4, ignore_eos=True))
        assert len(result.token_ids) == 4 and took < PROMPT, took
        # (TLS sockets are readable at once: TLS 1.3 session tickets; the silent ones tell.)
        silent = [s for s in held if not isinstance(s, ssl.SSLSocket)]
        assert len(silent) == 2 * SILENT and not any(readable(s) for s in silent), "held meanwhile"
        deadline = time.monotonic() + IDLE_TIMEOUT + 20
        still_open = [s for s in held if not closed_by_server(s, deadline)]
        assert not still_open, f"{len(still_open)} idle connections outlived --http-idle-timeout={IDLE_TIMEOUT}"
    finally:
        for sock in held:
            sock.close()


def refused_everywhere(server: ServerThread, client: Pki, server_ca: Pki) -> dict[str, bool]:
    """Whether each port refuses a client with `client`'s certificate."""
    context, found = client_context(client, server_ca), {}
    for name, port in (("http", server.server.http_port), ("metrics", server.metrics_port)):
        try:
            found[name] = https(port, "/metrics" if name == "metrics" else "/v1/models", context)[0] != 200
        except (ssl.SSLError, ConnectionError, http.client.HTTPException):
            found[name] = True
    with grpc_client(client, server_ca, server.port) as sdk:
        try:
            found["grpc"] = not sdk.tokenize("Hello")
        except Exception:  # noqa: BLE001 - any refusal will do (UNAVAILABLE: the handshake failed)
            found["grpc"] = True
    return found


def test_a_ca_removed_from_the_file_is_trusted_on_no_port_after_sighup(server: ServerThread, pkis) -> None:
    a, b = pkis
    assert refused_everywhere(server, b, a) == {"http": False, "metrics": False, "grpc": False}
    previous = signal.signal(signal.SIGHUP, lambda *_: server.loop.call_soon_threadsafe(server.server.reload_tls))
    try:  # the router's loop does the same: loop.add_signal_handler(SIGHUP, server.reload_tls)
        server.clients_ca.write_bytes(a.ca_pem)
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 30
        while (found := refused_everywhere(server, b, a)) != {"http": True, "metrics": True, "grpc": True}:
            assert time.monotonic() < deadline, found
        assert refused_everywhere(server, a, a) == {"http": False, "metrics": False, "grpc": False}
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_reload_that_fails_keeps_the_old_certificates(server: ServerThread, pkis, caplog) -> None:
    a, _ = pkis
    good = server.clients_ca.read_bytes()
    server.clients_ca.write_text("not a certificate\n")
    try:
        server.call(_reload(server))
        assert refused_everywhere(server, a, a) == {"http": False, "metrics": False, "grpc": False}
    finally:
        server.clients_ca.write_bytes(good)


async def _reload(server: ServerThread) -> None:
    server.server.reload_tls()
