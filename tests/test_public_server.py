"""The public gRPC server (router/api/server.py) in-process, without shards: its port, gRPC's message
size limits, and the bounds and threading of tokenization on the Generate and Tokenize paths.

With no shard group the servicer answers UNAVAILABLE after validation, so a text prompt that gets
UNAVAILABLE was bounded, tokenized and validated; one that gets INVALID_ARGUMENT was refused.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from transformers import AutoTokenizer

from checkpoints import BOS_ID, BOS_TOKEN, build_tokenizer
from shardline.client import Client, InvalidRequestError, UnavailableError
from shardline.client.cli import build_parser
from shardline.router.config import RouterConfig
from shardline.router.launch.settings import router_config
from shardline.router.api.server import GenerationServicer, RouterServer, message_limit
from shardline.router.api.validation import Limits
from test_tokenization import SlowTokenizer

VOCAB = 331
# --max-input-tokens 64: text prompts are bounded at 32 x 64 = 2048 bytes.
CONFIG = RouterConfig(model=Path("."), host="127.0.0.1", port=0, http_port=0, max_input_tokens=64,
                      max_total_tokens=160)


class ServerThread:
    """A RouterServer on its own event loop in a thread, so that sync clients can call it."""

    def __init__(self, cfg: RouterConfig, tokenizer) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servicer = GenerationServicer(cfg, tokenizer, VOCAB)
        self.server = self.call(self._make(cfg))
        self.port = self.call(self.server.start())
        self.target = f"127.0.0.1:{self.port}"

    async def _make(self, cfg: RouterConfig) -> RouterServer:
        return RouterServer(cfg, self.servicer)  # grpc.aio servers are made inside their loop

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("llama-tokenizer")
    build_tokenizer(out, llama_style=True)
    return AutoTokenizer.from_pretrained(str(out))


@pytest.fixture(scope="module")
def server(tokenizer) -> Iterator[ServerThread]:
    running = ServerThread(CONFIG, SlowTokenizer(tokenizer, delay=1.5))
    yield running
    running.stop()


# ---- ports ----------------------------------------------------------------------------------------

def test_a_second_server_on_the_same_port_fails_with_one_line(tokenizer) -> None:
    """Without SO_REUSEPORT off, both would bind and clients would be split between them silently."""
    first = ServerThread(CONFIG, tokenizer)
    try:
        with pytest.raises(RuntimeError) as error:
            ServerThread(RouterConfig(**{**CONFIG.__dict__, "port": first.port}), tokenizer)
        message = str(error.value)
        assert f"port {first.port} (--port) is already in use" in message and "\n" not in message
        with Client(first.target, retries=0) as client:
            assert client.health("liveness", timeout=5)
    finally:
        first.stop()


def test_a_port_held_by_another_program_fails_with_one_line(tokenizer) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(RuntimeError, match=rf"^port {port} \(--port\) is already in use on 127.0.0.1"):
            ServerThread(RouterConfig(**{**CONFIG.__dict__, "port": port}), tokenizer)


# ---- message sizes and byte bounds ----------------------------------------------------------------

def test_message_limit_is_explicit_and_above_the_request_bounds() -> None:
    small = Limits(max_input_tokens=64, max_total_tokens=160, vocab_size=VOCAB)
    assert message_limit(small) == 16 << 20
    big = Limits(max_input_tokens=1_000_000, max_total_tokens=2_000_000, vocab_size=VOCAB)
    assert message_limit(big) >= 2 * 42 * 2_000_000


def test_multi_megabyte_prompts_get_invalid_argument_naming_the_byte_limit(server: ServerThread) -> None:
    """6 MB is above gRPC's 4 MiB default: the explicit limit lets validation answer it, at once."""
    with Client(server.target, retries=0) as client:
        for size in (3_500_000, 6_000_000):
            started = time.monotonic()
            with pytest.raises(InvalidRequestError) as error:
                client.generate("slow " + "x" * size, max_new_tokens=1, timeout=30)
            assert time.monotonic() - started < 1.0  # never tokenized (that would take 1.5 s and more)
            assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert error.value.message == (f"prompt has {size + 5} bytes, more than --max-request-bytes=2048 "
                                           f"(32 bytes per token of --max-input-tokens=64)")


def test_a_message_over_grpcs_limit_is_an_invalid_request_in_the_sdk(server: ServerThread) -> None:
    with Client(server.target, retries=0) as client, pytest.raises(InvalidRequestError) as error:
        client.tokenize("x" * (17 << 20), timeout=30)
    assert isinstance(error.value, ValueError) and "larger than max" in error.value.message


def test_tokenize_has_the_bounds_of_generate(server: ServerThread, tokenizer) -> None:
    with Client(server.target, retries=0) as client:
        with pytest.raises(InvalidRequestError, match=r"text has 2049 bytes, more than --max-request-bytes=2048"):
            client.tokenize("x" * 2049, timeout=10)
        with pytest.raises(InvalidRequestError, match=r"text has \d+ tokens, more than --max-input-tokens=64"):
            client.tokenize("Numbers 0123456789 " * 10, timeout=10)
        assert client.tokenize(BOS_TOKEN + "The quick brown fox", timeout=10) == tokenizer(
            "The quick brown fox").input_ids
        assert client.tokenize("", timeout=10) == [BOS_ID]  # what the tokenizer's rule gives


# ---- tokenization off the event loop --------------------------------------------------------------

def loop_ticker(stop: threading.Event) -> float:
    """Runs on the server's loop until `stop`; returns the longest gap between its ticks."""
    async def tick() -> float:
        longest, last = 0.0, time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            longest, last = max(longest, now - last), now
        return longest
    return tick()


@pytest.mark.parametrize("rpc", ["generate", "tokenize"])
def test_tokenizing_a_prompt_does_not_block_the_servers_loop(server: ServerThread, rpc: str) -> None:
    """The tokenizer takes 1.5 s for this prompt; meanwhile the server's loop (which runs every
    stream) keeps ticking. Generate then answers UNAVAILABLE: validated, but no shards here."""
    stop = threading.Event()
    ticker = asyncio.run_coroutine_threadsafe(loop_ticker(stop), server.loop)
    with Client(server.target, retries=0) as client:
        started = time.monotonic()
        if rpc == "generate":
            with pytest.raises(UnavailableError):
                client.generate("slow prompt", max_new_tokens=1, timeout=30)
        else:
            assert client.tokenize("slow prompt", timeout=30)[0] == BOS_ID
        assert time.monotonic() - started >= 1.5
    stop.set()
    gap = ticker.result(10)
    assert gap < 0.5, f"the server's event loop stalled for {gap:.2f}s while a prompt was tokenized"


def test_max_request_bytes_is_a_router_flag(tokenizer) -> None:
    args = build_parser().parse_args(["launch", "--max-request-bytes", "100000"])
    cfg = router_config(args, Path("."))
    assert GenerationServicer(cfg, tokenizer, VOCAB).limits.max_request_bytes == 100000
    assert build_parser().parse_args(["launch"]).max_request_bytes == 0  # derived from --max-input-tokens


def test_the_startup_line_warns_of_plaintext_without_keys(server: ServerThread) -> None:
    line = server.server.describe_ports()
    assert line.startswith(f"public ports: gRPC 127.0.0.1:{server.port} (no TLS, NO API keys)"), line
    assert "WARNING: plaintext without API keys: anyone who reaches 127.0.0.1 can read and use them" in line


def test_the_grpc_port_bounds_streams_and_enforces_keepalive() -> None:
    from shardline.router.api.server import server_options

    options = dict(server_options(Limits(max_input_tokens=64, max_total_tokens=160, vocab_size=VOCAB)))
    assert options["grpc.max_concurrent_streams"] == 256 and options["grpc.http2.max_ping_strikes"] == 2
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert options["grpc.max_connection_idle_ms"] == 300_000 and options["grpc.server_handshake_timeout_ms"] == 10_000
    assert options["grpc.so_reuseport"] == 0
