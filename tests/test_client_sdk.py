"""Tests of the client SDK (client/): Client, AsyncClient, errors, retries and `shardline generate`.

Everything runs against a real in-process grpc server on port 0 (and one on a unix socket) whose
fake `Generation` servicer picks its behaviour from the prompt's first word: "invalid",
"overloaded", "internal", "down" (always UNAVAILABLE), "flaky" (UNAVAILABLE on the first call
only), "cut" (one token, then UNAVAILABLE), "slow" (one token every 20 ms until cancelled); any
other prompt gets `max_new_tokens` tokens "t0 ", "t1 ", ... with ids 100, 101, ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shardline.client import (
    AsyncClient,
    Client,
    GenerateResult,
    InvalidRequestError,
    OverloadedError,
    ShardlineError,
    StreamChunk,
    UnavailableError,
    Usage,
)
from shardline.client import generate_cli
from shardline.client.errors import DeadlineExceededError, RequestCancelledError, to_error
from shardline.client.requests import build_request
from shardline.client.results import finish_reason_from_pb
from shardline.proto import serving_pb2 as pb
from shardline.proto import serving_pb2_grpc as pb_grpc

T = TypeVar("T")
FAILURES = {
    "invalid": (grpc.StatusCode.INVALID_ARGUMENT, "parameters.max_new_tokens: 0 is below 1"),
    "overloaded": (grpc.StatusCode.RESOURCE_EXHAUSTED, "64 requests already admitted"),
    "internal": (grpc.StatusCode.INTERNAL, "boom"),
    "down": (grpc.StatusCode.UNAVAILABLE, "shards not ready"),
}


class FakeGeneration(pb_grpc.GenerationServicer):
    """A Generation servicer driven by the prompt's first word; counts calls per prompt."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.requests: list[pb.GenerateRequest] = []
        self.ended = threading.Event()  # a "slow" stream terminated
        self.completed = False  # ... by running to its end rather than being cancelled
        self._lock = threading.Lock()

    def _start(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> int:
        """Record the call, abort per the scenario, and return this prompt's call number."""
        with self._lock:
            self.requests.append(request)
            self.calls[request.prompt] += 1
            number = self.calls[request.prompt]
        scenario = request.prompt.split(" ")[0]
        if scenario in FAILURES or (scenario == "flaky" and number == 1):
            context.abort(*FAILURES.get(scenario, FAILURES["down"]))
        return number

    def _chunks(self, request: pb.GenerateRequest, number: int) -> list[pb.GenerateStreamResponse]:
        count = request.parameters.max_new_tokens if request.parameters.HasField("max_new_tokens") else 64
        chunks = [pb.GenerateStreamResponse(token_id=100 + i, text=f"t{i} ", request_id=f"req-{number}")
                  for i in range(count)]
        for i, chunk in enumerate(chunks):
            if request.parameters.logprobs:
                chunk.logprob = -0.5 * i
        prompt_tokens = len(request.prompt_token_ids.ids) or len(request.prompt.split())
        chunks[-1].finish_reason = pb.FINISH_REASON_STOP if request.parameters.stop else pb.FINISH_REASON_LENGTH
        chunks[-1].usage.CopyFrom(pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=count))
        return chunks

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        chunks = self._chunks(request, self._start(request, context))
        return pb.GenerateResponse(
            text="".join(c.text for c in chunks), token_ids=[c.token_id for c in chunks],
            logprobs=[c.logprob for c in chunks if c.HasField("logprob")],
            finish_reason=chunks[-1].finish_reason, usage=chunks[-1].usage, request_id=chunks[-1].request_id,
        )

    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator:
        number = self._start(request, context)
        scenario = request.prompt.split(" ")[0]
        if scenario == "slow":
            context.add_callback(self.ended.set)
            for i in range(500):
                yield pb.GenerateStreamResponse(token_id=i, text="x", request_id=f"req-{number}")
                time.sleep(0.02)
            self.completed = True
            return
        for chunk in self._chunks(request, number):
            yield chunk
            if scenario == "cut":
                context.abort(grpc.StatusCode.UNAVAILABLE, "shard group restarting")

    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        words = request.text.split()
        return pb.TokenizeResponse(ids=[len(w) for w in words], tokens=words)

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        shard = pb.ShardInfo(rank=1, tp_rank=1, pp_rank=0, device="cpu", dtype="float32", parameter_bytes=1234,
                             kv_capacity_tokens=4096, first_layer=0, last_layer=2,
                             environment={"NCCL_SHM_DISABLE": "1"})
        return pb.InfoResponse(model="/models/tiny", model_type="qwen3", vocab_size=331, tp_size=2, pp_size=1,
                               max_input_tokens=100, max_total_tokens=128, max_concurrent_requests=8,
                               max_batch_prefill_tokens=512, max_batch_total_tokens=4096, version="0.1.0",
                               shards=[shard], restarts=3)


@dataclass
class Served:
    target: str
    servicer: FakeGeneration


def _serve(address: str) -> tuple[grpc.Server, Served]:
    servicer = FakeGeneration()
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    checker.set("readiness", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port(address)
    server.start()
    target = f"127.0.0.1:{port}" if address.endswith(":0") else address
    return server, Served(target, servicer)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    server, served = _serve("127.0.0.1:0")
    yield served
    server.stop(None)


@pytest.fixture
def fake(served: Served) -> FakeGeneration:
    """The module's servicer with its call counts reset."""
    served.servicer.__init__()  # type: ignore[misc]
    return served.servicer


@pytest.fixture
def client(served: Served) -> Iterator[Client]:
    with Client(served.target, retries=3, backoff=0.01) as c:
        yield c


def _async(served: Served, body: Callable[[AsyncClient], Awaitable[T]]) -> T:
    """Run `body(client)` with a fresh AsyncClient on a fresh event loop."""
    async def main() -> T:
        async with AsyncClient(served.target, backoff=0.01) as c:
            return await body(c)
    return asyncio.run(main())


async def _collect(stream: AsyncIterator[StreamChunk]) -> list[StreamChunk]:
    return [chunk async for chunk in stream]


# ---- request building and conversions ---------------------------------------------------------

def test_build_request_maps_every_argument() -> None:
    request = build_request(prompt_token_ids=[5, 6], max_new_tokens=3, temperature=0, top_k=5, top_p=0.5,
                            repetition_penalty=1.25, seed=2**63, stop="\n", ignore_eos=True, logprobs=True,
                            priority=-2)
    assert list(request.prompt_token_ids.ids) == [5, 6] and request.WhichOneof("input") == "prompt_token_ids"
    p = request.parameters
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (3, 0.0, 5, 0.5, 1.25)
    assert (p.seed, list(p.stop), p.ignore_eos, p.logprobs, request.priority) == (2**63, ["\n"], True, True, -2)
    assert not build_request("hi").parameters.HasField("seed")
    assert build_request(prompt_token_ids=[]).WhichOneof("input") == "prompt_token_ids"


@pytest.mark.parametrize("kwargs", [{}, {"prompt": "a", "prompt_token_ids": [1]}])
def test_exactly_one_prompt_form_is_required(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="exactly one of prompt and prompt_token_ids"):
        build_request(**kwargs)


def test_negative_unsigned_field_names_it() -> None:
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        build_request("a", max_new_tokens=-1)


def test_finish_reasons_are_short_strings() -> None:
    names = [finish_reason_from_pb(v) for v in pb.FinishReason.values()]
    assert names == [None, "length", "eos", "stop", "cancelled"]


def test_error_mapping_and_str() -> None:
    class Fake(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode) -> None:
            self._code = code

        def code(self) -> grpc.StatusCode:
            return self._code

        def details(self) -> str:
            return "why"

    assert type(to_error(Fake(grpc.StatusCode.DEADLINE_EXCEEDED))) is DeadlineExceededError
    assert type(to_error(Fake(grpc.StatusCode.CANCELLED))) is RequestCancelledError
    error = to_error(Fake(grpc.StatusCode.INTERNAL))
    assert type(error) is ShardlineError and error.code is grpc.StatusCode.INTERNAL and error.message == "why"
    assert str(error) == "INTERNAL: why"


# ---- Client and AsyncClient against the fake server -------------------------------------------

EXPECTED = GenerateResult(text="t0 t1 t2 ", token_ids=[100, 101, 102], finish_reason="length", prompt_tokens=2,
                          completion_tokens=3, logprobs=[0.0, -0.5, -1.0], request_id="req-1")


def _check_stream(chunks: list[StreamChunk], logprobs: bool, request_id: str = "req-1") -> None:
    assert [c.token_id for c in chunks] == [100, 101, 102]
    assert "".join(c.text for c in chunks) == "t0 t1 t2 "
    assert [c.logprob for c in chunks] == ([0.0, -0.5, -1.0] if logprobs else [None] * 3)
    assert [c.finish_reason for c in chunks] == [None, None, "length"]
    assert [c.usage for c in chunks] == [None, None, Usage(prompt_tokens=2, completion_tokens=3)]
    assert {c.request_id for c in chunks} == {request_id}


def test_generate_maps_request_and_result(client: Client, fake: FakeGeneration) -> None:
    result = client.generate("hello world", max_new_tokens=3, temperature=0, seed=7, logprobs=True, priority=4)
    assert result == EXPECTED
    sent = fake.requests[-1]
    assert (sent.prompt, sent.parameters.temperature, sent.parameters.seed, sent.priority) == ("hello world", 0, 7, 4)
    assert client.generate("hello world", max_new_tokens=3).logprobs is None


def test_generate_stream_sync(client: Client, fake: FakeGeneration) -> None:
    _check_stream(list(client.generate_stream("hello world", max_new_tokens=3, logprobs=True)), logprobs=True)


def test_async_generate_and_stream(served: Served, fake: FakeGeneration) -> None:
    async def body(c: AsyncClient) -> tuple[GenerateResult, list[StreamChunk]]:
        result = await c.generate("hello world", max_new_tokens=3, logprobs=True)
        return result, await _collect(c.generate_stream("hello world", max_new_tokens=3))

    result, chunks = _async(served, body)
    assert result == EXPECTED
    _check_stream(chunks, logprobs=False, request_id="req-2")


def test_tokenize_and_info(client: Client, served: Served) -> None:
    assert client.tokenize("a bb ccc") == [1, 2, 3]
    info = client.info()
    assert (info.model_type, info.vocab_size, info.tp_size, info.max_total_tokens, info.restarts) == (
        "qwen3", 331, 2, 128, 3)
    shard = info.shards[0]
    assert (shard.rank, shard.tp_rank, shard.parameter_bytes, shard.last_layer) == (1, 1, 1234, 2)
    assert shard.environment == {"NCCL_SHM_DISABLE": "1"}
    assert _async(served, lambda c: c.info()) == info
    assert _async(served, lambda c: c.tokenize("a bb")) == [1, 2]


@pytest.mark.parametrize(("prompt", "kind"), [
    ("invalid", InvalidRequestError), ("overloaded", OverloadedError), ("down", UnavailableError),
    ("internal", ShardlineError),
])
def test_status_codes_map_to_errors(client: Client, fake: FakeGeneration, prompt: str, kind: type) -> None:
    code, message = FAILURES[prompt]
    for call in (client.generate, lambda p: list(client.generate_stream(p))):
        with pytest.raises(kind) as info:
            call(prompt)
        assert type(info.value) is kind and info.value.code is code and info.value.message == message
        assert str(info.value) == f"{code.name}: {message}"


def test_no_retry_on_invalid_argument(client: Client, fake: FakeGeneration) -> None:
    with pytest.raises(InvalidRequestError):
        client.generate("invalid")
    assert fake.calls["invalid"] == 1


def test_unavailable_retried_then_given_up(served: Served, fake: FakeGeneration) -> None:
    with Client(served.target, retries=2, backoff=0.01) as c, pytest.raises(UnavailableError):
        c.generate("down")
    assert fake.calls["down"] == 3


@pytest.mark.parametrize("streaming", [False, True])
def test_unavailable_before_first_token_is_retried(client: Client, fake: FakeGeneration, streaming: bool) -> None:
    if streaming:
        text = "".join(c.text for c in client.generate_stream("flaky", max_new_tokens=2))
    else:
        text = client.generate("flaky", max_new_tokens=2).text
    assert text == "t0 t1 " and fake.calls["flaky"] == 2


def test_async_retries_before_first_token(served: Served, fake: FakeGeneration) -> None:
    chunks = _async(served, lambda c: _collect(c.generate_stream("flaky", max_new_tokens=2)))
    assert len(chunks) == 2 and fake.calls["flaky"] == 2
    assert _async(served, lambda c: c.generate("flaky again", max_new_tokens=1)).text == "t0 "
    assert fake.calls["flaky again"] == 2


def test_no_retry_once_a_token_was_streamed(client: Client, fake: FakeGeneration) -> None:
    seen: list[StreamChunk] = []
    with pytest.raises(UnavailableError, match="shard group restarting"):
        seen.extend(client.generate_stream("cut", max_new_tokens=3))
    assert [c.token_id for c in seen] == [100] and fake.calls["cut"] == 1


def test_async_no_retry_once_a_token_was_streamed(served: Served, fake: FakeGeneration) -> None:
    seen: list[StreamChunk] = []

    async def body(c: AsyncClient) -> None:
        async for chunk in c.generate_stream("cut", max_new_tokens=3):
            seen.append(chunk)

    with pytest.raises(UnavailableError):
        _async(served, body)
    assert len(seen) == 1 and fake.calls["cut"] == 1


def test_breaking_out_of_async_stream_cancels_the_rpc(served: Served, fake: FakeGeneration) -> None:
    async def body(c: AsyncClient) -> bool:
        async for _ in c.generate_stream("slow"):
            break
        for _ in range(250):  # the event loop closes the abandoned generator, which cancels the call
            if fake.ended.is_set():
                return True
            await asyncio.sleep(0.02)
        return False

    assert _async(served, body) and not fake.completed and fake.calls["slow"] == 1


def test_closing_sync_stream_cancels_the_rpc(client: Client, fake: FakeGeneration) -> None:
    stream = client.generate_stream("slow")
    next(stream)
    stream.close()
    assert fake.ended.wait(5) and not fake.completed


def test_timeout_raises_deadline_exceeded(client: Client, fake: FakeGeneration) -> None:
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        list(client.generate_stream("slow", timeout=0.2))
    assert time.monotonic() - started < 3


def test_health(client: Client, served: Served, tmp_path: Path) -> None:
    assert client.health() is True
    assert client.health("readiness") is False
    assert client.health("no-such-service") is False
    assert _async(served, lambda c: c.health()) is True
    with Client(f"unix://{tmp_path}/nobody.sock") as nobody:
        assert nobody.health(timeout=2) is False


def test_unix_socket_target(tmp_path: Path) -> None:
    server, served = _serve(f"unix://{tmp_path}/router.sock")
    try:
        with Client(served.target) as c:
            assert c.generate("a b", max_new_tokens=1).text == "t0 "
        assert _async(served, lambda c: c.generate("a b", max_new_tokens=2)).token_ids == [100, 101]
    finally:
        server.stop(None)


# ---- the `shardline generate` subcommand ------------------------------------------------------

def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    generate_cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["generate", *argv])


def test_cli_streams_text_then_summary(served: Served, fake: FakeGeneration, capsys: pytest.CaptureFixture) -> None:
    args = _parse("--target", served.target, "hello world", "--max-new-tokens", "3", "--stop", "x", "--stop", "y",
                  "--temperature", "0", "--seed", "5", "--priority", "2")
    assert args.run(args) == 0
    out, err = capsys.readouterr()
    assert out == "t0 t1 t2 \n"
    assert "finish=stop" in err and "tokens=2+3" in err and "id=req-1" in err
    sent = fake.requests[-1]
    assert (list(sent.parameters.stop), sent.parameters.seed, sent.priority) == (["x", "y"], 5, 2)


def test_cli_json(served: Served, fake: FakeGeneration, capsys: pytest.CaptureFixture) -> None:
    args = _parse("--target", served.target, "hello world", "--max-new-tokens", "2", "--json", "--logprobs")
    assert args.run(args) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["text"] == "t0 t1 " and payload["logprobs"] == [0.0, -0.5]
    assert payload["finish_reason"] == "length" and payload["completion_tokens"] == 2


@pytest.mark.parametrize(("prompt", "status"), [("invalid", 2), ("overloaded", 1)])
def test_cli_errors(served: Served, fake: FakeGeneration, capsys: pytest.CaptureFixture, prompt: str,
                    status: int) -> None:
    args = _parse("--target", served.target, prompt)
    assert args.run(args) == status
    code, message = FAILURES[prompt]
    assert capsys.readouterr().err == f"error: {code.name}: {message}\n"


def test_cli_target_from_env_and_help_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDLINE_TARGET", "unix:///run/router.sock")
    parser = argparse.ArgumentParser()
    sub = generate_cli.add_parser(parser.add_subparsers())
    assert parser.parse_args(["generate", "hi"]).target == "unix:///run/router.sock"
    assert sub.formatter_class is argparse.ArgumentDefaultsHelpFormatter
    assert all(action.help for action in sub._actions)
