"""The KV block pool (shard/kv_cache.py) and its sizing at Warmup, in-process at world size 1.

Tokens written through blocks handed out in scattered, non-contiguous order (a shuffled or
reversed free list) must still give transformers' greedy tokens, for block sizes 1, 16 and one
larger than any sequence, prompts whole or chunked. Warmup sizes the pool to
`--kv-cache-tokens // --kv-block-size` blocks (or from free memory, capped by the router's
max_kv_tokens), forgets every sequence, and before it the pool has no blocks at all. A sequence
started with `cached_token_ids` reads blocks another sequence wrote (a prefix cache hit) and
generates what the whole prompt computed from scratch would.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from checkpoints import random_prompts, reference_generate
from shardline.proto import shard_pb2
from shardline.shard.config import GroupConfig, ShardConfig
from shardline.shard.engine import Engine, StepRefused
from shardline.shard.kv_cache import KVPool, bytes_per_token, pool_blocks
from shardline.shard.parallel import init_parallel
from step_driver import Driver, run_sync

VOCAB = 331
PROMPTS = random_prompts(4, VOCAB, min_len=1, max_len=18, seed=11)
NEW_TOKENS = 16


def make_engine(model_dir: Path, block_size: int = 16, kv_cache_tokens: int = 1024) -> Engine:
    cfg = ShardConfig(model_dir=model_dir, kv_cache_tokens=kv_cache_tokens, kv_block_size=block_size)
    return Engine(cfg, init_parallel(GroupConfig(), "cpu"))


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory) -> Path:
    return checkpoint_factory(arch="llama", num_layers=2)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> list[list[int]]:
    return reference_generate(checkpoint, PROMPTS, NEW_TOKENS)


def test_pool_writes_and_gathers_through_slots_with_a_zero_null_slot() -> None:
    pool = KVPool(layers=2, num_blocks=3, block_size=4, kv_heads=2, head_dim=5, dtype=torch.float32,
                  device=torch.device("cpu"))
    assert pool.k.shape == (2, 13, 2, 5) and pool.null_slot == 12
    k, v = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    slots = torch.tensor([9, 2, 5])
    pool.write(1, slots, k, v)
    keys, values = pool.gather(1, torch.tensor([[5, 12, 9], [2, 2, 12]]))
    assert keys.shape == (2, 2, 3, 5)  # [rows, kv_heads, length, head_dim]
    assert torch.equal(keys[0, :, 0], k[2]) and torch.equal(keys[0, :, 2], k[0]) and torch.equal(values[1, :, 1], v[1])
    assert not keys[0, :, 1].any() and not values[1, :, 2].any()  # the null slot reads zeros


def _scattered(num_blocks: int, order: str) -> list[int]:
    blocks = list(range(num_blocks))
    if order == "shuffled":
        random.Random(7).shuffle(blocks)
    return blocks[::-1] if order == "reversed" else blocks


@pytest.mark.parametrize("block_size, order, chunk", [
    (16, "shuffled", 1 << 30), (16, "reversed", 5), (1, "shuffled", 1 << 30), (1, "shuffled", 3),
    (64, "shuffled", 1 << 30), (64, "reversed", 7), (5, "shuffled", 4)])
def test_scattered_blocks_give_transformers_tokens(checkpoint: Path, reference, block_size: int,
                                                   order: str, chunk: int) -> None:
    engine = make_engine(checkpoint, block_size)
    blocks = engine.warmup(64, 8, 0)
    driver = Driver(block_size, blocks, chunk, free_list=_scattered(blocks, order))
    for i, prompt in enumerate(PROMPTS):
        driver.add(i, prompt, NEW_TOKENS)
    tables: dict[int, list[int]] = {}

    def step(request):
        out = engine.step(request)
        tables.update({i: list(s.blocks) for i, s in engine.sequences.live.items()})
        return out
    run_sync(step, driver)
    assert [driver.tokens(i) for i in range(len(PROMPTS))] == reference
    if block_size < 64:  # the tables really were scattered
        assert any(t != list(range(t[0], t[0] + len(t))) for t in tables.values()), tables
    else:  # one block holds a whole sequence, most of it never written
        assert all(len(t) == 1 for t in tables.values())


@pytest.mark.parametrize("block_size, tokens, blocks", [(16, 1024, 64), (16, 100, 6), (5, 100, 20), (1, 37, 37),
                                                        (64, 1000, 15)])
def test_warmup_sizes_the_pool_from_kv_cache_tokens(checkpoint: Path, block_size: int, tokens: int,
                                                    blocks: int) -> None:
    engine = make_engine(checkpoint, block_size, kv_cache_tokens=tokens)
    assert engine.pool.num_blocks == 0
    assert engine.warmup(32, 4, 0) == blocks == engine.pool.num_blocks
    assert engine.pool.k.shape == (2, blocks * block_size + 1, engine.kv_heads, engine.spec.head_dim)
    assert engine.warmup(32, 4, max_kv_tokens=3 * block_size) == min(3, blocks)  # the router's cap


def test_warmup_from_free_memory_respects_the_router_cap(checkpoint: Path) -> None:
    engine = make_engine(checkpoint, 16, kv_cache_tokens=0)
    per_token = bytes_per_token(2, engine.kv_heads, engine.spec.head_dim, torch.float32)
    assert per_token == 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads of 16 floats
    assert engine.warmup(32, 4, max_kv_tokens=300) == 300 // 16
    assert engine.warmup(32, 4, 0) > 10_000 // 16


def test_pool_blocks_arithmetic() -> None:
    assert pool_blocks(per_token=1024, block_size=16, free_bytes=10 * 2**20, fraction=0.5) == 320
    assert pool_blocks(1024, 16, 10 * 2**20, 0.5, max_tokens=100) == 6
    assert pool_blocks(0, 16, 0, 0.5) == 2**31  # a rank without layers never limits the group


def test_no_blocks_before_warmup_and_warmup_forgets_sequences(checkpoint: Path) -> None:
    engine = make_engine(checkpoint)
    start = shard_pb2.StepRequest(start=[shard_pb2.NewSequence(id=1, prompt_len=3)],
                                  work=[shard_pb2.Work(id=1, token_ids=[3, 4, 5], new_blocks=[0], sample=True)])
    with pytest.raises(StepRefused, match=r"block 0 is outside the pool \(0 blocks\)"):
        engine.step(start)
    engine.warmup(32, 4, 0)
    assert len(engine.step(start)) == 1 and list(engine.sequences.live) == [1]
    engine.warmup(32, 4, 0)
    assert engine.sequences.live == {}
    with pytest.raises(StepRefused, match="does not hold"):
        engine.step(shard_pb2.StepRequest(work=[shard_pb2.Work(id=1, sample=True)]))


# -- a cached prefix: blocks written by one sequence, read by another -----------------------------

SHARED_PROMPT = random_prompts(1, VOCAB, min_len=40, max_len=40, seed=40)[0]
SUFFIX = random_prompts(1, VOCAB, min_len=6, max_len=6, seed=6)[0]


def _with_prefix_readers(engine: Engine, **sampling) -> Driver:
    """Owner 0 runs SHARED_PROMPT; at step 2, readers 1 (two cached blocks) and 2 (one) start with
    that prefix + SUFFIX, and readers 3 and 4 with the same prompts computed from scratch."""
    driver = Driver(16, engine.pool.num_blocks)
    driver.add(0, SHARED_PROMPT, 16)

    def readers(d: Driver) -> None:
        owner = d.tracked(0).blocks
        for rid, blocks in ((1, 2), (2, 1)):
            d.add(rid, SHARED_PROMPT[:16 * blocks] + SUFFIX, 12, cached_blocks=owner[:blocks], **sampling)
            d.add(rid + 2, SHARED_PROMPT[:16 * blocks] + SUFFIX, 12, **sampling)
    return run_sync(engine.step, driver, events={2: readers})


def test_a_cached_prefix_reads_the_owners_blocks(checkpoint: Path) -> None:
    engine = make_engine(checkpoint)
    engine.warmup(64, 8, 0)
    driver = _with_prefix_readers(engine)
    prompts = [SHARED_PROMPT, SHARED_PROMPT[:32] + SUFFIX, SHARED_PROMPT[:16] + SUFFIX]
    expected = reference_generate(checkpoint, prompts, 16)
    assert [driver.tokens(i) for i in range(3)] == [expected[0], expected[1][:12], expected[2][:12]]
    start = driver.history[2]
    assert [list(n.cached_token_ids) for n in start.start] == [SHARED_PROMPT[:32], [], SHARED_PROMPT[:16], []]
    assert [len(w.token_ids) for w in start.work] == [0, len(SUFFIX), 38, len(SUFFIX), 22]  # cached: not run


@pytest.mark.parametrize("sampling", [dict(repetition_penalty=1.3), dict(temperature=0.8, top_k=30, seed=5)],
                         ids=["penalty", "seeded"])
def test_cached_tokens_count_for_the_penalty_and_the_sampler(checkpoint: Path, sampling: dict) -> None:
    """A reader started from a cached prefix draws exactly what the same prompt computed whole draws."""
    engine = make_engine(checkpoint)
    engine.warmup(64, 8, 0)
    driver = _with_prefix_readers(engine, **sampling)
    assert driver.tokens(1) == driver.tokens(3) and driver.tokens(2) == driver.tokens(4)
    assert driver.tokens(1) != driver.tokens(2)
