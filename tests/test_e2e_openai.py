"""End to end through `shardline launch` with the official `openai` client: the OpenAI-compatible
HTTP API next to the gRPC SDK, on one TP=1 llama server whose tokenizer adds BOS and has a
Llama-3-style chat template (like real Llama ones), --max-concurrent-requests 4.

Completions and chat, whole and streamed, equal each other, the gRPC API's answer for the same
request, and transformers' greedy output (on the tokenizer's ids, or on the templated chat prompt);
usage in the stream; n=2; logprobs and top logprobs (equal to gRPC's); a bad request; overload (429); a client that disconnects frees
its slot. Chat over gRPC through the SDK, sync and async.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
import urllib.request
from pathlib import Path

import json
import openai
import pytest
from transformers import AutoTokenizer

from checkpoints import BOS_ID, reference_generate
from shardline.client import AsyncClient, Client

pytestmark = pytest.mark.slow

MAX_TOTAL = 512
PROMPT = "The quick brown fox"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the fox."}]
GREEDY = {"temperature": 0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}
NATIVE_GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
LONG = {"max_tokens": MAX_TOTAL - 40, "temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def llama(shared_llama) -> Path:
    return shared_llama


@pytest.fixture(scope="module")
def server(shared_server):
    """The session's shared server (tests/conftest.py): one launch for this file and its neighbour."""
    return shared_server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url, api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(llama):
    return AutoTokenizer.from_pretrained(str(llama))


def test_models_and_health(server, client):
    assert [(m.id, m.owned_by) for m in client.models.list().data] == [("tiny", "shardline")]
    with urllib.request.urlopen(server.http_url.removesuffix("/v1") + "/health", timeout=10) as response:
        assert response.status == 200


def test_completion_whole_streamed_grpc_and_transformers_agree(server, client, tokenizer, llama):
    ids = tokenizer(PROMPT).input_ids
    assert ids[0] == BOS_ID
    expected = reference_generate(llama, [ids], 12)[0]
    whole = client.completions.create(model="tiny", prompt=PROMPT, **GREEDY)
    streamed = list(client.completions.create(model="tiny", prompt=PROMPT, stream=True, **GREEDY))
    with Client(server.target) as native:
        grpc_answer = native.generate(PROMPT, **NATIVE_GREEDY)
    assert grpc_answer.token_ids == expected
    assert whole.choices[0].text == "".join(c.choices[0].text for c in streamed) == grpc_answer.text
    assert whole.choices[0].finish_reason == streamed[-1].choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), 12)
    assert whole.object == "text_completion" and whole.model == "tiny" and whole.id.startswith("cmpl-")
    by_ids = client.completions.create(model="tiny", prompt=ids, **GREEDY)  # a list of token ids
    assert by_ids.choices[0].text == whole.choices[0].text


def test_chat_whole_streamed_grpc_and_transformers_agree(server, client, tokenizer, llama):
    templated = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    templated = list(templated["input_ids"] if hasattr(templated, "keys") else templated)  # 5.x: a BatchEncoding
    assert templated[0] == BOS_ID and templated[1] != BOS_ID  # BOS once: the template writes it
    expected = reference_generate(llama, [list(templated)], 12)[0]
    whole = client.chat.completions.create(model="tiny", messages=CHAT, **GREEDY)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, stream=True, **GREEDY))
    with Client(server.target) as native:
        sync = native.chat(CHAT, **NATIVE_GREEDY)
        sync_stream = "".join(c.text for c in native.chat_stream(CHAT, **NATIVE_GREEDY))

    async def run() -> tuple[str, str]:
        async with AsyncClient(server.target) as native:
            result = await native.chat(CHAT, **NATIVE_GREEDY)
            return result.text, "".join([c.text async for c in native.chat_stream(CHAT, **NATIVE_GREEDY)])

    async_whole, async_stream = asyncio.run(run())
    assert sync.token_ids == expected and sync.prompt_tokens == len(templated)
    text = whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert text == sync.text == sync_stream == async_whole == async_stream
    assert whole.choices[0].message.role == "assistant" and whole.usage.prompt_tokens == len(templated)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"


def test_stream_usage_n2_and_logprobs(server, client):
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, stream=True, n=2, seed=11, max_tokens=16,
                                            temperature=1.0, logprobs=0, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 32
    assert all(c.usage is None for c in chunks[:-1])
    texts = {i: "".join(c.choices[0].text for c in chunks[:-1] if c.choices[0].index == i) for i in (0, 1)}
    assert texts[0] != texts[1]  # distinct derived seeds
    whole = client.completions.create(model="tiny", prompt=PROMPT, n=2, seed=11, max_tokens=16, temperature=1.0,
                                      logprobs=0)
    assert [c.index for c in whole.choices] == [0, 1] and [c.text for c in whole.choices] == [texts[0], texts[1]]
    with Client(server.target) as native:  # choice 0 is the request with the seed itself
        same = native.generate(PROMPT, seed=11, max_new_tokens=16, temperature=1.0, logprobs=True)
    assert same.text == texts[0]
    logprobs = whole.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 16
    assert logprobs.token_logprobs == pytest.approx(same.logprobs, abs=1e-5)
    chat = client.chat.completions.create(model="tiny", messages=CHAT, logprobs=True, **GREEDY)
    assert len(chat.choices[0].logprobs.content) == 12 and all(t.logprob <= 0 for t in chat.choices[0].logprobs.content)


def test_top_logprobs_over_http_and_grpc_agree(server, client):
    """Greedy: the sampled token is the most likely alternative, with the same log-probability."""
    with Client(server.target) as native:
        grpc_answer = native.generate(PROMPT, logprobs=True, top_logprobs=3, **NATIVE_GREEDY)
    assert [step[0].token_id for step in grpc_answer.top_logprobs] == grpc_answer.token_ids
    assert all(len(step) == 3 and step[0].logprob >= step[1].logprob >= step[2].logprob
               for step in grpc_answer.top_logprobs)
    # Completions give {token text: logprob} per step (tokens with the same text share one key).
    expected = [pytest.approx({a.text: a.logprob for a in step}, abs=1e-5) for step in grpc_answer.top_logprobs]
    completion = client.completions.create(model="tiny", prompt=PROMPT, logprobs=3, **GREEDY).choices[0].logprobs
    assert completion.token_logprobs == pytest.approx([s[0].logprob for s in grpc_answer.top_logprobs], abs=1e-5)
    assert completion.top_logprobs == expected
    chat = client.chat.completions.create(model="tiny", messages=CHAT, logprobs=True, top_logprobs=2, **GREEDY)
    for entry in chat.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model="tiny", prompt=PROMPT, logprobs=3, stream=True, **GREEDY) if c.choices[0].logprobs]
    assert [lp.top_logprobs[0] for lp in streamed] == expected


def test_stop_string_and_a_bad_request(client):
    whole = client.completions.create(model="tiny", prompt=PROMPT, **GREEDY)
    stop = whole.choices[0].text[3:6]
    stopped = client.completions.create(model="tiny", prompt=PROMPT, stop=stop, **GREEDY)
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=MAX_TOTAL)
    assert "max_tokens" in error.value.body["message"] and error.value.body["param"] == "max_tokens"


def test_overload_is_429_and_a_disconnect_frees_the_slot(server, client):
    streams = [client.completions.create(model="tiny", prompt=PROMPT, stream=True, **LONG) for _ in range(4)]
    for stream in streams:
        next(iter(stream))
    with pytest.raises(openai.RateLimitError) as full:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    assert full.value.status_code == 429 and "the server's max_concurrent_requests=4" in full.value.body["message"]
    streams[0].close()  # a streaming client that goes away
    assert admitted_soon(client).choices[0].finish_reason == "length"
    # A non-streaming client that goes away before its answer frees its slot too.
    post_and_hang_up(server.http_url, {"model": "tiny", "prompt": PROMPT, **_flat(LONG)})
    assert admitted_soon(client).choices[0].finish_reason == "length"
    for stream in streams[1:]:
        stream.close()
    metrics = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    assert float(re.search(r'shardline_requests_received_total\{api="http"\} (\S+)', metrics).group(1)) > 10


def admitted_soon(client: openai.OpenAI):
    """A request admitted within a second (freeing a slot travels apart from the next request)."""
    deadline = time.monotonic() + 1.0
    while True:
        try:
            return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the slot of the client that went away was never freed"
            time.sleep(0.01)


def post_and_hang_up(base_url: str, body: dict) -> None:
    """POST /completions on a raw socket, wait until it is admitted (it holds the freed slot), hang up."""
    host, port = base_url.removeprefix("http://").split("/")[0].split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        time.sleep(0.5)


def _flat(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k != "extra_body"} | kwargs.get("extra_body", {})
