"""End to end through `shardline launch`: TP=2 and PP=2 servers against transformers, batching,
streaming text and stop sequences, the SDK (Client and AsyncClient) and `shardline generate`.

Two servers live for the whole module (router + 2 shard processes each, gloo on CPU): a 4-layer
llama under --tp 2, and a 5-layer qwen3 with tied embeddings under --pp 2 (3 + 2 layers).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from checkpoints import EOS_ID, random_prompts, reference_generate
from router_harness import launch_args, launched
from shardline.client import AsyncClient, Client, StreamChunk

pytestmark = pytest.mark.slow

VOCAB = 331
REPLACEMENT = "\ufffd"
MULTIBYTE_PROMPTS = ("café au lait", "日本語のテキスト", "Emoji too: 🙂 🚀", "Ελληνικά, русский", "crème brûlée 中文",
                     "한국어 👍🏽", "Ünïcödé", "東京は大きい都市です。")


@pytest.fixture(scope="module")
def llama(checkpoint_factory) -> Path:
    return checkpoint_factory(arch="llama", num_layers=4)


@pytest.fixture(scope="module")
def qwen3_tied(checkpoint_factory) -> Path:
    return checkpoint_factory(arch="qwen3", num_layers=5, tie_word_embeddings=True, seed=3)


@pytest.fixture(scope="module")
def tp_server(tmp_path_factory, llama):
    with launched(tmp_path_factory.mktemp("tp2"), *launch_args(tp=2), model=llama, expect_shards=2) as server:
        yield server


@pytest.fixture(scope="module")
def pp_server(tmp_path_factory, qwen3_tied):
    with launched(tmp_path_factory.mktemp("pp2"), *launch_args(pp=2), model=qwen3_tied, expect_shards=2) as server:
        yield server


@pytest.fixture(scope="module")
def tokenizer(llama):
    return AutoTokenizer.from_pretrained(str(llama))


def greedy(**kwargs) -> dict:
    return {"temperature": 0, "ignore_eos": True, **kwargs}


def checkpoint_bytes(model: Path) -> int:
    total = 0
    for path in model.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                n = 1
                for d in t.get_shape():
                    n *= d
                total += n * 4  # float32
    return total


# -- parity with transformers ----------------------------------------------------------------------

def test_tp2_greedy_equals_transformers(tp_server, llama):
    prompts = random_prompts(4, VOCAB, min_len=1, max_len=40, seed=11) + [[7] * 64]  # 64 = --max-input-tokens
    expected = reference_generate(llama, prompts, 24)
    with Client(tp_server.target) as client:
        unary = [client.generate(prompt_token_ids=p, **greedy(max_new_tokens=24)) for p in prompts]
        streamed = [[c.token_id for c in client.generate_stream(prompt_token_ids=p, **greedy(max_new_tokens=24))]
                    for p in prompts[:2]]
    assert [r.token_ids for r in unary] == expected
    assert streamed == expected[:2]
    assert all(r.finish_reason == "length" and r.completion_tokens == 24 for r in unary)
    assert [r.prompt_tokens for r in unary] == [len(p) for p in prompts]


def test_pp2_greedy_equals_transformers(pp_server, qwen3_tied):
    prompts = random_prompts(5, VOCAB, min_len=2, max_len=50, seed=12)
    lengths = [5, 17, 30, 9, 24]
    expected = [reference_generate(qwen3_tied, [p], n)[0] for p, n in zip(prompts, lengths)]

    async def run() -> list[list[int]]:
        async with AsyncClient(pp_server.target) as client:
            results = await asyncio.gather(*(client.generate(prompt_token_ids=p, **greedy(max_new_tokens=n))
                                             for p, n in zip(prompts, lengths)))
            stream = [c.token_id async for c in client.generate_stream(prompt_token_ids=prompts[0],
                                                                       **greedy(max_new_tokens=lengths[0]))]
        assert stream == expected[0]
        return [r.token_ids for r in results]

    assert asyncio.run(run()) == expected


def reference_logprobs(model_dir: Path, prompt: list[int], new: list[int]) -> list[float]:
    """log-softmax of transformers' logits at each generated token (float32)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits, dim=-1)[torch.arange(len(new)), torch.tensor(new)].tolist()


def test_eos_ends_greedy_output_unless_ignored_and_logprobs(tp_server, llama, tokenizer):
    """Without ignore_eos a greedy request stops at the EOS transformers generates (finish "eos",
    the EOS id included, its text not); logprobs are those of transformers' distribution."""
    prompts = random_prompts(6, VOCAB, seed=31)
    expected = reference_generate(llama, prompts, 40)
    with Client(tp_server.target) as client:
        results = [client.generate(prompt_token_ids=p, max_new_tokens=40, temperature=0, logprobs=True)
                   for p in prompts]
    assert sum(EOS_ID in e for e in expected) >= 1, "no prompt reached EOS: nothing checked"
    for result, ids in zip(results, expected):
        if EOS_ID in ids:
            ids = ids[:ids.index(EOS_ID) + 1]
        assert result.token_ids == ids
        assert result.finish_reason == ("eos" if ids[-1] == EOS_ID else "length")
        assert result.text == tokenizer.decode(ids, skip_special_tokens=True)
    logprobs = reference_logprobs(llama, prompts[0], results[0].token_ids)
    assert results[0].logprobs == pytest.approx(logprobs, abs=1e-3)


# -- info, health, tokenize ------------------------------------------------------------------------

def test_info_and_health_describe_the_tp_group(tp_server, llama):
    full = checkpoint_bytes(llama)
    with Client(tp_server.target) as client:
        assert client.health() and client.health("shardline.v1.Generation")
        info = client.info()
    assert (info.tp_size, info.pp_size, info.vocab_size, info.model_type) == (2, 1, VOCAB, "llama")
    assert (info.max_input_tokens, info.max_total_tokens) == (64, 160)
    shards = sorted(info.shards, key=lambda s: s.rank)
    assert [(s.rank, s.tp_rank, s.pp_rank) for s in shards] == [(0, 0, 0), (1, 1, 0)]
    for s in shards:
        assert 0.3 * full < s.parameter_bytes < 0.6 * full, (s.parameter_bytes, full)  # about half each
        assert (s.first_layer, s.last_layer) == (0, 4)
        assert s.device == "cpu" and s.kv_capacity_tokens >= 160


def test_info_and_health_describe_the_pp_group(pp_server, qwen3_tied):
    full = checkpoint_bytes(qwen3_tied)

    async def run():
        async with AsyncClient(pp_server.target) as client:
            return await client.health(), await client.info()

    healthy, info = asyncio.run(run())
    assert healthy
    assert (info.tp_size, info.pp_size, info.model_type) == (1, 2, "qwen3")
    shards = sorted(info.shards, key=lambda s: s.rank)
    assert [(s.tp_rank, s.pp_rank) for s in shards] == [(0, 0), (0, 1)]
    # Extra layers never on the last stage: 5 layers split 3 + 2.
    assert [(s.first_layer, s.last_layer) for s in shards] == [(0, 3), (3, 5)]
    assert all(0 < s.parameter_bytes < full for s in shards)


def test_tokenize_matches_the_checkpoint_tokenizer(tp_server, tokenizer):
    text = "Shardline café 🙂 日本語"
    with Client(tp_server.target) as client:
        ids = client.tokenize(text)

    async def run() -> list[int]:
        async with AsyncClient(tp_server.target) as client:
            return await client.tokenize(text)

    assert ids == tokenizer.encode(text) == asyncio.run(run())
    assert tokenizer.decode(ids) == text


# -- continuous batching ---------------------------------------------------------------------------

def max_overlap(spans: list[tuple[float, float]]) -> int:
    """Most spans (first token, last token) in progress at one instant."""
    return max(sum(start <= t <= end for start, end in spans) for t, _ in spans)


def test_24_concurrent_streams_each_equal_the_request_alone(tp_server, llama):
    """16 greedy streams (vs transformers) and 8 seeded sampled ones (vs the same request sent
    alone afterwards), all of different prompt and output lengths, streamed at once."""
    prompts = random_prompts(24, VOCAB, min_len=1, max_len=60, seed=21)
    lengths = [8 + (7 * i) % 33 for i in range(24)]
    kwargs = [greedy(max_new_tokens=n) if i < 16 else
              {"max_new_tokens": n, "temperature": 0.9, "top_k": 40, "seed": 1000 + i, "ignore_eos": True}
              for i, n in enumerate(lengths)]

    async def stream(client: AsyncClient, prompt, kw) -> tuple[list[int], tuple[float, float]]:
        ids, times = [], []
        async for chunk in client.generate_stream(prompt_token_ids=prompt, **kw):
            ids.append(chunk.token_id)
            times.append(time.monotonic())
        return ids, (times[0], times[-1])

    async def run():
        async with AsyncClient(tp_server.target) as client:
            together = await asyncio.gather(*(stream(client, p, kw) for p, kw in zip(prompts, kwargs)))
            alone = [(await client.generate(prompt_token_ids=p, **kw)).token_ids
                     for p, kw in zip(prompts[16:], kwargs[16:])]
        return together, alone

    together, alone = asyncio.run(run())
    ids = [t[0] for t in together]
    assert [len(x) for x in ids] == lengths
    assert ids[:16] == [reference_generate(llama, [p], n)[0] for p, n in zip(prompts[:16], lengths[:16])]
    assert ids[16:] == alone
    assert max_overlap([t[1] for t in together]) >= 12  # really batched, not served one by one


# -- streaming text --------------------------------------------------------------------------------

def split_characters(tokenizer, ids: list[int]) -> int:
    """Places where decoding a prefix of `ids` ends inside a character the full text completes."""
    full = tokenizer.decode(ids, skip_special_tokens=True)
    count = 0
    for i in range(1, len(ids)):
        prefix = tokenizer.decode(ids[:i], skip_special_tokens=True)
        head = prefix[:-1]
        if prefix.endswith(REPLACEMENT) and full.startswith(head) and len(full) > len(head) \
                and full[len(head)] not in (REPLACEMENT,) and ord(full[len(head)]) > 127:
            count += 1
    return count


def test_stream_deltas_concatenate_to_decode_with_multibyte_characters(tp_server, tokenizer):
    """Sampled output of a random byte-level model is full of partial UTF-8: the deltas must hold
    incomplete characters back and still add up to decode(ids) exactly."""
    async def stream(client: AsyncClient, prompt: str, seed: int) -> list[StreamChunk]:
        return [c async for c in client.generate_stream(prompt, max_new_tokens=48, temperature=1.0, seed=seed)]

    async def run() -> list[list[StreamChunk]]:
        async with AsyncClient(tp_server.target) as client:
            return await asyncio.gather(*(stream(client, p, s) for s, p in enumerate(MULTIBYTE_PROMPTS)))

    split = 0
    for chunks in asyncio.run(run()):
        ids = [c.token_id for c in chunks]
        text = "".join(c.text for c in chunks)
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
        assert chunks[-1].finish_reason in ("length", "eos") and chunks[-1].usage.completion_tokens == len(ids)
        assert all(c.finish_reason is None for c in chunks[:-1])
        split += split_characters(tokenizer, ids)
    assert split > 0, "no generated character spanned two tokens: the test checked no multi-byte hold-back"


def test_unary_text_equals_decode_of_its_ids(tp_server, tokenizer):
    with Client(tp_server.target) as client:
        results = [client.generate(p, max_new_tokens=32, temperature=1.0, seed=7) for p in MULTIBYTE_PROMPTS[:4]]
    for r in results:
        assert r.text == tokenizer.decode(r.token_ids, skip_special_tokens=True)
        assert r.completion_tokens == len(r.token_ids) > 0


def pick_stop(text: str) -> str:
    """A 3-character ASCII piece from the middle of `text` (so it certainly appears)."""
    for start in range(len(text) // 3, len(text) - 3):
        piece = text[start:start + 3]
        if piece.isascii() and piece.strip() == piece and piece.isprintable():
            return piece
    raise AssertionError(f"no ASCII stop candidate in {text!r}")


def test_stop_sequence_ends_the_stream_with_the_text_before_it(tp_server):
    prompt = "The quick brown fox"
    with Client(tp_server.target) as client:
        full = client.generate(prompt, **greedy(max_new_tokens=60))
        stop = pick_stop(full.text)
        cut = full.text.index(stop)
        chunks = list(client.generate_stream(prompt, stop=[stop, "zzz-never"], **greedy(max_new_tokens=60)))
        unary = client.generate(prompt, stop=stop, **greedy(max_new_tokens=60))
        missing = client.generate(prompt, stop="zzz-never", **greedy(max_new_tokens=60))
    ids = [c.token_id for c in chunks]
    assert "".join(c.text for c in chunks) == full.text[:cut]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage.completion_tokens == len(ids)
    assert ids == full.token_ids[:len(ids)] and len(ids) < 60
    assert (unary.text, unary.finish_reason, unary.token_ids) == (full.text[:cut], "stop", ids)
    assert (missing.text, missing.finish_reason) == (full.text, "length")


# -- the CLI ---------------------------------------------------------------------------------------

def test_generate_cli_streams_the_text(tp_server):
    prompt = "café au lait"
    with Client(tp_server.target) as client:
        expected = client.generate(prompt, **greedy(max_new_tokens=16)).text
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-m", "shardline.client.cli", "generate", "--target", tp_server.target,
                           "--max-new-tokens", "16", "--temperature", "0", "--ignore-eos", prompt],
                          capture_output=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode("utf-8") == expected + "\n"
    assert "finish=length" in done.stderr.decode() and "tokens=" in done.stderr.decode()


# -- prefix cache ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shared", [32, 37])  # two whole 16-token blocks; and ending inside the third
def test_prefix_cached_runs_equal_transformers_tp2_and_pp2(tp_server, pp_server, llama, qwen3_tied, shared):
    prefix = random_prompts(1, VOCAB, min_len=shared, max_len=shared, seed=shared)[0]
    prompts = [prefix + [5, 9, 11], prefix + [7], prefix + [2, 3, 4, 5, 6, 7]]
    for server, model in ((tp_server, llama), (pp_server, qwen3_tied)):
        expected = reference_generate(model, prompts, 12)
        with Client(server.target) as client:
            results = [client.generate(prompt_token_ids=p, **greedy(max_new_tokens=12)) for p in prompts]
        assert [r.token_ids for r in results] == expected
        assert all(r.cached_prompt_tokens == shared // 16 * 16 for r in results[1:]), \
            [r.cached_prompt_tokens for r in results]
