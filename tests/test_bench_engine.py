"""shard/bench_engine.py, the in-process ceiling behind `shardline bench --engine`: its local block
allocator runs correct work (transformers' greedy tokens) and the benchmark loop serves every token."""

from __future__ import annotations

from checkpoints import random_prompts, reference_generate
from shardline.common.bench_stats import Spec
from shardline.shard.bench_engine import LocalRouter, run_engine, warmed_engine

VOCAB = 331


def test_local_router_decodes_like_transformers_and_frees_every_block(checkpoint_factory) -> None:
    checkpoint = checkpoint_factory(arch="llama", num_layers=2)
    prompts = random_prompts(3, VOCAB, min_len=5, max_len=20, seed=21)
    engine = warmed_engine(checkpoint, max_prompt=20, max_total=20 + 18, concurrency=3)
    router = LocalRouter(engine)
    tokens = {i: [g.token_id] for i, g in enumerate(router.step(dict(enumerate(prompts))))}
    for _ in range(17):
        for g in router.step():
            tokens[g.request_id].append(g.token_id)
    assert [tokens[i] for i in range(3)] == reference_generate(checkpoint, prompts, 18)
    for i in range(3):
        router.finish(i)
    router.step()
    assert sorted(router.free) == list(range(engine.pool.num_blocks)) and engine.sequences.live == {}


def test_run_engine_serves_every_token_at_the_concurrency(checkpoint_factory) -> None:
    prompts = random_prompts(7, VOCAB, min_len=2, max_len=30, seed=2)
    specs = [Spec(p, n) for p, n in zip(prompts, (1, 5, 9, 3, 12, 2, 7))]
    report = run_engine(checkpoint_factory(arch="llama", num_layers=2), specs, concurrency=3)
    assert (report["completed"], report["failures"], report["output_tokens"]) == (7, 0, 39)
