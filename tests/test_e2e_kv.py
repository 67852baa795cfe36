"""End to end through `shardline launch`: KV allocated as tokens are generated, preemption that keeps
streams exact, and chunked prefill that keeps running streams flowing.

One server with a KV pool far smaller than its requests' total (256 tokens = 16 blocks) and a
64-token step budget, on a model wide enough that a long prefill takes measurable time.
"""

from __future__ import annotations

import statistics
import threading
import time

import pytest

from checkpoints import random_prompts, reference_generate
from router_harness import launched
from shardline.client import Client

pytestmark = pytest.mark.slow
VOCAB = 331
LIMITS = ("--max-input-tokens", "1000", "--max-total-tokens", "1100", "--max-batch-prefill-tokens", "64",
          "--kv-cache-tokens", "2048", "--kv-block-size", "16")


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    return checkpoint_factory(arch="llama", num_layers=4, hidden_size=256, intermediate_size=512, num_heads=8,
                              num_kv_heads=2, max_position_embeddings=1200, seed=5)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model):
    with launched(tmp_path_factory.mktemp("kv"), *LIMITS, model=model, metrics=True) as server:
        yield server


def greedy(n: int) -> dict:
    return {"temperature": 0, "ignore_eos": True, "max_new_tokens": n}


def stream_times(client: Client, prompt: list[int], n: int, out: dict, key,
                 streaming: threading.Event | None = None) -> None:
    """Streams one request; records its token ids and the arrival time of each token; sets
    `streaming` at its first token."""
    ids, times = [], []
    for chunk in client.generate_stream(prompt_token_ids=prompt, **greedy(n)):
        ids.append(chunk.token_id)
        times.append(time.monotonic())
        if streaming is not None:
            streaming.set()
    out[key] = (ids, times)


def test_preemption_keeps_every_stream_exact_and_everyone_starts_at_once(server, model):
    """8 requests x (12 + 300) tokens = 2496 > the 2048-token pool: the
    pool holds their prompts at once, then runs dry as they grow."""
    prompts = random_prompts(8, VOCAB, min_len=12, max_len=12, seed=21)
    expected = reference_generate(model, prompts, 300)
    before = server.gauge("shardline_preemptions_total")
    out: dict = {}
    with Client(server.target) as client:
        threads = [threading.Thread(target=stream_times, args=(client, p, 300, out, i)) for i, p in enumerate(prompts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert [out[i][0] for i in range(8)] == expected, "every stream equals its solo greedy run"
    first_tokens = [out[i][1][0] for i in range(8)]
    first_finish = min(out[i][1][-1] for i in range(8))
    assert max(first_tokens) < first_finish, "every request starts streaming before any finishes"
    assert server.gauge("shardline_preemptions_total") > before


def test_a_long_prompt_is_chunked_and_never_stalls_a_running_stream(server, model):
    runner, long = random_prompts(2, VOCAB, min_len=8, max_len=8, seed=4)[0], \
        random_prompts(1, VOCAB, min_len=900, max_len=900, seed=9)[0]
    with Client(server.target) as client:
        solo_start = time.monotonic()
        other = random_prompts(1, VOCAB, min_len=900, max_len=900, seed=10)[0]  # same length, nothing cached
        solo = client.generate(prompt_token_ids=other, **greedy(4))
        solo_prefill = time.monotonic() - solo_start
        out: dict = {}
        streaming = threading.Event()
        t = threading.Thread(target=stream_times, args=(client, runner, 200, out, "runner", streaming))
        t.start()
        assert streaming.wait(60), "the running stream never started"
        joined_at = time.monotonic()
        joined = client.generate(prompt_token_ids=long, **greedy(4))
        done_at = time.monotonic()
        t.join(timeout=120)
    ids, times = out["runner"]
    assert ids == reference_generate(model, [runner], 200)[0]
    assert joined.token_ids == reference_generate(model, [long], 4)[0] and len(solo.token_ids) == 4
    during = [b - a for a, b in zip(times, times[1:]) if joined_at <= a and b <= done_at]
    assert len(during) >= 5, "the stream kept decoding while the long prompt was prefilled"
    assert max(during) < solo_prefill / 2, (max(during), solo_prefill, statistics.median(during))
