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
    TokenLogprob,
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


@pytest.mark.parametrize("kwargs", [{}, {"prompt": "a", "prompt_token_ids": [1]}, {"prompt": "a", "messages": []}])
def test_exactly_one_prompt_form_is_required(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="exactly one of prompt, prompt_token_ids and messages"):
        build_request(**kwargs)


def test_messages_are_the_third_input_form() -> None:
    request = build_request(messages=[{"role": "system", "content": "Be brief."}, ("user", "Hi")])
    assert request.WhichOneof("input") == "messages"
    assert [(m.role, m.content) for m in request.messages.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert build_request(messages=[]).WhichOneof("input") == "messages"  # the router says it is empty
    with pytest.raises(TypeError, match="messages"):
        build_request(messages="Hi")
    with pytest.raises(TypeError, match=r"messages\[0\] needs a str role"):
        build_request(messages=[{"role": "user"}])


def test_chat_sync_and_async(client: Client, served: Served, fake: FakeGeneration) -> None:
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]
    result = client.chat(turns, max_new_tokens=3)
    assert (result.text, result.prompt_tokens) == ("t0 t1 t2 ", 4)
    assert [(m.role, m.content) for m in fake.requests[-1].messages.messages] == [
        ("system", "Be brief."), ("user", "hello world")]
    _check_stream(list(client.chat_stream(turns, max_new_tokens=3, logprobs=True)), logprobs=True,
                  request_id="req-2", prompt_tokens=4)

    async def body(c: AsyncClient) -> tuple[GenerateResult, list[StreamChunk]]:
        return await c.chat(turns, max_new_tokens=3), await _collect(c.chat_stream(turns, max_new_tokens=3))

    whole, chunks = _async(served, body)
    assert whole.text == "t0 t1 t2 " and whole.request_id == "req-3"
    _check_stream(chunks, logprobs=False, request_id="req-4", prompt_tokens=4)
    with pytest.raises(InvalidRequestError):
        client.chat([("user", "invalid request")])


def test_unset_parameters_are_not_sent() -> None:
    """So that the router's defaults (--default-max-new-tokens above all) apply to SDK users."""
    parameters = build_request("hi").parameters
    assert parameters.ListFields() == []
    assert build_request("hi", temperature=0).parameters.ListFields()[0][1] == 0.0  # 0 is set, not unset


# (keyword arguments, the message; INVALID_ARGUMENT worded as the router words its refusals)
CLIENT_SIDE = [
    ({"max_new_tokens": -1}, "parameters.max_new_tokens must be at least 1, got -1"),
    ({"max_new_tokens": 0}, "parameters.max_new_tokens must be at least 1, got 0"),
    ({"max_new_tokens": 2**32}, "parameters.max_new_tokens must be at most 4294967295, got 4294967296"),
    ({"top_k": -3}, "parameters.top_k must be at least 0 (0 disables it), got -3"),
    ({"seed": -1}, "parameters.seed must be at least 0, got -1"),
    ({"seed": 2**64}, f"parameters.seed must be at most {2**64 - 1}, got {2**64}"),
    ({"priority": 2**31}, "priority must be at most 2147483647, got 2147483648"),
    ({"prompt": None, "prompt_token_ids": [5, -1]}, "prompt_token_ids[1] = -1 is outside the vocabulary "
                                                    "(a token id is at least 0)"),
    ({"prompt_token_ids": [1]}, "exactly one of prompt, prompt_token_ids and messages is required, "
                                "got prompt and prompt_token_ids"),
    ({"messages": [("user", "hi")]}, "exactly one of prompt, prompt_token_ids and messages is required, "
                                     "got prompt and messages"),
]


@pytest.mark.parametrize(("kwargs", "message"), CLIENT_SIDE)
def test_client_side_checks_raise_invalid_request_error(client: Client, served: Served, fake: FakeGeneration,
                                                        kwargs: dict, message: str) -> None:
    kwargs = {"prompt": "hello", **kwargs}
    calls = [lambda: client.generate(**kwargs), lambda: client.generate_stream(**kwargs),
             lambda: _async(served, lambda c: c.generate(**kwargs)),
             lambda: _async(served, lambda c: _collect(c.generate_stream(**kwargs)))]
    for call in calls:
        with pytest.raises(InvalidRequestError) as info:
            call()
        assert isinstance(info.value, ValueError) and info.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.message == message
    assert fake.requests == []  # refused before sending


def test_top_logprobs_sync_stream_and_async(client: Client, served: Served, fake: FakeGeneration) -> None:
    result = client.generate("hello world", max_new_tokens=2, logprobs=True, top_logprobs=2)
    assert fake.requests[-1].parameters.top_logprobs == 2
    assert result.top_logprobs == [[TokenLogprob(100, 0.0, "t0 "), TokenLogprob(1, -1.0, "a1")],
                                   [TokenLogprob(101, -0.5, "t1 "), TokenLogprob(1, -1.5, "a1")]]
    chunks = list(client.generate_stream("hello world", max_new_tokens=2, logprobs=True, top_logprobs=2))
    assert [c.top_logprobs for c in chunks] == result.top_logprobs
    assert client.generate("hello world", max_new_tokens=2, logprobs=True).top_logprobs is None
    assert _async(served, lambda c: c.generate("hello world", max_new_tokens=2, logprobs=True,
                                               top_logprobs=2)).top_logprobs == result.top_logprobs


def test_sdk_sends_only_what_was_set(client: Client, fake: FakeGeneration) -> None:
    """The fake, like the router, generates its default 64 tokens when max_new_tokens is unset."""
    assert len(client.generate("hello world").token_ids) == 64
    assert fake.requests[-1].parameters.ListFields() == []
    client.generate("hello world", max_new_tokens=2, top_p=0.5)
    assert [f.name for f, _ in fake.requests[-1].parameters.ListFields()] == ["max_new_tokens", "top_p"]


def test_an_answer_over_grpcs_default_4_mib_reaches_the_sdk(client: Client, served: Served) -> None:
    """The fake's Tokenize answers 1.5M ids and token strings (about 6 MB)."""
    text = "a " * 1_500_000
    assert len(client.tokenize(text, timeout=60)) == 1_500_000
    assert len(_async(served, lambda c: c.tokenize(text, timeout=60))) == 1_500_000


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


def _check_stream(chunks: list[StreamChunk], logprobs: bool, request_id: str = "req-1", prompt_tokens: int = 2) -> None:
    assert [c.token_id for c in chunks] == [100, 101, 102]
    assert "".join(c.text for c in chunks) == "t0 t1 t2 "
    assert [c.logprob for c in chunks] == ([0.0, -0.5, -1.0] if logprobs else [None] * 3)
    assert [c.finish_reason for c in chunks] == [None, None, "length"]
    assert [c.usage for c in chunks] == [None, None, Usage(prompt_tokens=prompt_tokens, completion_tokens=3)]
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
