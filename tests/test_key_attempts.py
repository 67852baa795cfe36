"""The failed API key attempt limit (issue 21, item 4): router/api/key_attempts.py, and through the
gRPC, HTTP and metrics gates of one in-process server.

One peer that keeps sending wrong keys is refused with RESOURCE_EXHAUSTED / 429 (with how long to
wait), right key or not, until its failures leave the window; another peer is not slowed at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from router_harness import free_port
from shardline.client import Client, UnauthenticatedError
from shardline.router.config import RouterConfig
from shardline.router.api.key_attempts import FailedAttempts, peer_of
from shardline.router.api.openai.gate import HttpGate
from shardline.router.api.security_config import SecurityConfig
from test_public_server import CONFIG, ServerThread
from test_openai_refusals import _tokenizer

KEY, WRONG = "sk-attempts-0000000001", "sk-attempts-wrong-0001"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_peer_is_refused_after_the_limit_until_its_failures_leave_the_window() -> None:
    clock = Clock()
    attempts = FailedAttempts(limit=3, window_s=10, clock=clock)
    for _ in range(3):
        assert attempts.retry_after("ipv4:10.0.0.7") == 0
        attempts.failed("ipv4:10.0.0.7")
        clock.now += 1
    assert attempts.retry_after("ipv4:10.0.0.7") == 7  # now t=103; the first failure (t=100) leaves at 110
    assert attempts.retry_after("ipv4:10.0.0.8") == 0  # nobody else is slowed
    clock.now = 110.0
    assert attempts.retry_after("ipv4:10.0.0.7") == 0
    assert "3 within --failed-key-window=10s" in attempts.message(7)


def test_memory_is_bounded_and_zero_turns_it_off() -> None:
    attempts = FailedAttempts(limit=1, window_s=60, max_peers=4)
    for n in range(100):
        attempts.failed(f"10.0.0.{n}")
    assert len(attempts._failures) == 4 and attempts.retry_after("10.0.0.99") > 0
    off = FailedAttempts(limit=0)
    for _ in range(50):
        off.failed("10.0.0.1")
    assert off.retry_after("10.0.0.1") == 0


def test_peers_are_addresses_without_ports() -> None:
    assert peer_of("ipv4:127.0.0.1:51234") == "ipv4:127.0.0.1"
    assert peer_of("ipv6:[::1]:51234") == "ipv6:[::1]"
    assert peer_of("10.1.2.3") == "10.1.2.3" and peer_of(None) == "unknown"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerThread]:
    folder = tmp_path_factory.mktemp("attempts")
    (folder / "keys").write_text(f"ops:{KEY}\n")
    security = SecurityConfig(api_key_file=folder / "keys", max_failed_key_attempts=3, failed_key_window=600)
    cfg = RouterConfig(**{**CONFIG.__dict__, "http_port": free_port(), "model": Path("/models/tiny"),
                          "security": security})
    running = ServerThread(cfg, _tokenizer(tmp_path_factory, llama_style=True))
    running.metrics_port = running.call(running.server.serve_metrics(running.servicer.metrics.registry, 0))
    yield running
    running.stop()


def test_grpc_slows_the_guessing_peer_only(server: ServerThread) -> None:
    with Client(server.target, api_key=WRONG, retries=0) as guesser:
        for _ in range(3):
            with pytest.raises(UnauthenticatedError):
                guesser.tokenize("hi")
    with grpc.insecure_channel(server.target) as channel:  # even the right key waits now
        tokenize = channel.unary_unary("/shardline.v1.Generation/Tokenize")
        with pytest.raises(grpc.RpcError) as slowed:
            tokenize(b"", metadata=[("authorization", f"Bearer {KEY}")], timeout=10)
    assert slowed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many failed API key attempts" in slowed.value.details()
    assert dict(slowed.value.trailing_metadata())["retry-after"].isdigit()
    # The count is this address's alone (the HTTP test below shows another address served meanwhile).
    attempts = server.server.attempts
    assert attempts.retry_after("ipv4:127.0.0.1") > 0 and attempts.retry_after("ipv6:[::1]") == 0
    attempts._failures.clear()


async def _asgi(gate: HttpGate, client: str, key: str | None) -> int:
    scope = {"type": "http", "method": "GET", "path": "/v1/models", "client": (client, 5000),
             "headers": [(b"authorization", f"Bearer {key}".encode())] if key else []}
    sent = []

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message) -> None:
        sent.append(message)

    gate.app = app
    await gate(scope, receive, send)
    return sent[0]["status"]


def test_http_and_metrics_gates_answer_429_to_the_guessing_peer_only(server: ServerThread) -> None:
    import asyncio

    keys = server.server.keys
    attempts = FailedAttempts(limit=2, window_s=600)
    http, metrics = (HttpGate(None, keys, 64, attempts=attempts),
                     HttpGate(None, keys, 64, attempts=attempts, open_routes=frozenset(), api="metrics"))
    run = asyncio.run
    assert [run(_asgi(http, "10.9.9.9", WRONG)) for _ in range(2)] == [401, 401]
    assert run(_asgi(http, "10.9.9.9", KEY)) == 429  # blocked before the key is looked at
    assert run(_asgi(metrics, "10.9.9.9", KEY)) == 429  # one count for every port
    assert run(_asgi(http, "10.1.1.1", KEY)) == 200 and run(_asgi(metrics, "10.1.1.1", KEY)) == 200
