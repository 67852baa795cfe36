"""Tests of the client SDK (client/): Client, AsyncClient, errors, retries, cancellation and health,
against the fake router in fake_router.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from fake_router import (  # noqa: F401 (fixtures)
    FAILURES,
    FakeGeneration,
    Served,
    _async,
    _collect,
    _serve,
    client,
    fake,
    served,
)
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
from shardline.client.errors import (
    DeadlineExceededError,
    RequestCancelledError,
    to_error,
)
from shardline.client.requests import build_request
from shardline.client.results import finish_reason_from_pb
from shardline.proto import serving_pb2 as pb

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
