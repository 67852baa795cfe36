"""End to end through `shardline launch`: what the router does with a prompt's text. One TP=1 llama
server whose tokenizer adds BOS like real Llama ones, --max-input-tokens 64 (so text is bounded at
32 x 64 = 2048 bytes) and --default-max-new-tokens 5.

Covers: a multi-megabyte prompt is refused (INVALID_ARGUMENT naming the byte limit) without
stalling a running stream; Tokenize returns exactly the ids Generate uses (BOS once, also for a text
that starts with BOS), and greedy output on text equals transformers on the tokenizer's ids; and
parameters the SDK leaves unset take the router's defaults.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from pathlib import Path

import grpc
import pytest
from transformers import AutoTokenizer

from checkpoints import BOS_ID, BOS_TOKEN, reference_generate
from shardline.client import AsyncClient, Client, InvalidRequestError

pytestmark = pytest.mark.slow

MAX_TOTAL = 512  # the checkpoint's max_position_embeddings: room for a stream of a few seconds
HUGE = 3_500_000  # bytes: tokenizing it took seconds on the event loop, stalling every stream
TEXTS = ("The quick brown fox", "café au lait 🙂 and crème brûlée", "日本語のテキスト")


@pytest.fixture(scope="module")
def llama(shared_llama) -> Path:
    return shared_llama


@pytest.fixture(scope="module")
def server(shared_server):
    """The session's shared server (tests/conftest.py): one launch for this file and its neighbour."""
    return shared_server


@pytest.fixture(scope="module")
def tokenizer(llama):
    return AutoTokenizer.from_pretrained(str(llama))


def stream_arrivals(target: str, arrivals: list[float], done: threading.Event) -> None:
    """Streams a long greedy completion, recording when each token arrived."""
    with Client(target, retries=0) as client:
        for _ in client.generate_stream(prompt_token_ids=[5, 17, 42], max_new_tokens=MAX_TOTAL - 3,
                                        temperature=0, ignore_eos=True, timeout=120):
            arrivals.append(time.monotonic())
    done.set()


def test_a_huge_prompt_is_refused_without_stalling_a_running_stream(server):
    arrivals: list[float] = []
    done = threading.Event()
    streamer = threading.Thread(target=stream_arrivals, args=(server.target, arrivals, done), daemon=True)
    streamer.start()
    deadline = time.monotonic() + 60
    while len(arrivals) < 40:  # the stream's own pace first
        assert time.monotonic() < deadline and not done.is_set(), "the stream did not get going"
        time.sleep(0.01)
    typical = statistics.median(b - a for a, b in zip(arrivals[10:], arrivals[11:]))
    sent_at = time.monotonic()
    with Client(server.target, retries=0) as client:
        for n in range(3):
            with pytest.raises(InvalidRequestError) as error:
                client.generate(f"{n} " + "x" * HUGE, timeout=60)
            assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert error.value.message.startswith(f"prompt has {HUGE + 2} bytes, more than --max-request-bytes=2048")
    refused_at = time.monotonic()
    streamer.join(120)
    assert done.is_set() and len(arrivals) == MAX_TOTAL - 3
    assert arrivals[-1] > refused_at, "the stream ended before the huge prompts were refused: inconclusive"
    # The gaps of the tokens that arrived while the huge prompts were sent, and the one just after.
    window = [b - a for a, b in zip(arrivals, arrivals[1:]) if b > sent_at and a < refused_at]
    allowed = max(1.0, 25 * typical)
    assert max(window) < allowed, (f"a token waited {max(window):.2f}s while huge prompts were refused "
                                   f"(typical gap {typical * 1000:.1f} ms)")


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_gives_the_ids_generate_uses(server, tokenizer, llama, text):
    """BOS once (the tokenizer's rule), also when the text already starts with BOS; greedy output on
    the text equals transformers on tokenizer(text).input_ids, and equals Generate on those ids."""
    expected_ids = tokenizer(text).input_ids
    assert expected_ids[0] == BOS_ID and expected_ids[1] != BOS_ID
    reference = reference_generate(llama, [expected_ids], 8)[0]
    with Client(server.target) as client:
        for prompt in (text, BOS_TOKEN + text):
            assert client.tokenize(prompt) == expected_ids
            result = client.generate(prompt, temperature=0, ignore_eos=True, max_new_tokens=8)
            assert result.prompt_tokens == len(expected_ids)
            assert result.token_ids == reference
        by_ids = client.generate(prompt_token_ids=expected_ids, temperature=0, ignore_eos=True, max_new_tokens=8)
        assert by_ids.token_ids == reference


def test_tokenize_refuses_what_generate_refuses(server):
    with Client(server.target) as client:
        with pytest.raises(InvalidRequestError, match="text has 2049 bytes, more than --max-request-bytes=2048"):
            client.tokenize("y" * 2049)
        with pytest.raises(InvalidRequestError, match="text has 81 tokens, more than --max-input-tokens=64"):
            client.tokenize("x" * 80)  # 80 single-byte tokens plus BOS
        with pytest.raises(InvalidRequestError, match="prompt has 81 tokens, more than --max-input-tokens=64"):
            client.generate("x" * 80)


def test_unset_parameters_take_the_routers_defaults(server):
    """--default-max-new-tokens 5 applies to SDK users who do not set max_new_tokens."""
    with Client(server.target) as client:
        result = client.generate("The quick brown fox", ignore_eos=True)
        assert (result.completion_tokens, result.finish_reason) == (5, "length")
        chunks = list(client.generate_stream("The quick brown fox", ignore_eos=True, temperature=0))
        assert len(chunks) == 5 and chunks[-1].usage.completion_tokens == 5

    async def run() -> int:
        async with AsyncClient(server.target) as client:
            return (await client.generate("The quick", ignore_eos=True)).completion_tokens

    assert asyncio.run(run()) == 5
