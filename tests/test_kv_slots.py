"""The router's blocks against a fake shard group whose tokens depend on the KV slots it reads:
tight pools, shared prefixes, preemption and cache reuse must give every request exactly the tokens
of a run whose K/V are all its own. Also: a failed admission leaves the cache intact, a request
preempted while its last token is in flight is never prefilled again, and eviction stays O(1)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from fake_shards import KvFakeGroup, kv_expected
from test_batcher import batcher_for, ids, make, serve, tokenizer  # noqa: F401

from shardline.proto import shard_pb2
from shardline.router.scheduling.blocks import BlockAllocator
from shardline.router.scheduling.prefix_cache import PrefixCache


def test_the_fake_notices_a_block_two_sequences_write():
    group = KvFakeGroup(num_blocks=4, block_size=2)
    start = [shard_pb2.NewSequence(id=i, prompt_len=2) for i in (1, 2)]
    step = shard_pb2.StepRequest(start=start, work=[
        shard_pb2.Work(id=1, token_ids=[5, 6], new_blocks=[0], sample=True),
        shard_pb2.Work(id=2, token_ids=[7, 8], new_blocks=[0], sample=True)])  # aliases block 0
    reply = asyncio.run(group.step(step))
    assert reply.generations[0].token_id != kv_expected(1, [5, 6], 1)[0]
    assert reply.generations[1].token_id == kv_expected(2, [7, 8], 1)[0]


@pytest.mark.parametrize("seed", range(6))
def test_tight_pools_shared_prefixes_and_preemption_give_exact_tokens(tokenizer, seed):  # noqa: F811
    rng = random.Random(seed)
    group = KvFakeGroup(num_blocks=rng.choice([14, 20, 40]), block_size=2)
    batcher = batcher_for(group, max_batch_prefill_tokens=rng.choice([3, 8, 64]))
    stem = [rng.randrange(3, 300) for _ in range(6)]
    reqs = []
    for i in range(10):
        prompt = stem[:rng.randint(0, 6)] + [rng.randrange(3, 300) for _ in range(rng.randint(1, 4))]
        reqs.append(make(tokenizer, 10 * seed + i, rng.choice([1, 2, 5, 9]), prompt=prompt,
                         priority=rng.randint(0, 1)))
    results = serve(batcher, group, reqs)
    assert not group.refusals
    for r, events in zip(reqs, results):
        assert ids(events) == kv_expected(r.id, list(r.valid.prompt_token_ids), r.valid.max_new_tokens)
    again = make(tokenizer, 999, 3, prompt=reqs[0].valid.prompt_token_ids)  # reuses cached blocks
    (events,) = serve(batcher, group, [again])
    assert ids(events) == kv_expected(999, list(again.valid.prompt_token_ids), 3)


def test_a_failed_admission_evicts_nothing(tokenizer):  # noqa: F811
    """A running request holds part of the pool; a big newcomer cannot fit even after evicting
    every cached block; while it waits (every step retries it), the cached blocks stay."""
    group = KvFakeGroup(num_blocks=12, block_size=2)
    batcher = batcher_for(group)
    serve(batcher, group, [make(tokenizer, 1, 1, prompt=[7, 8, 9, 10, 11])])
    root = batcher.cache.root

    def warm_cached() -> bool:
        return (7, 8) in root.children and (9, 10) in root.children[(7, 8)].children
    assert warm_cached() and batcher.cache.evictable == 2
    seen = []
    group.before_step = lambda step: seen.append((warm_cached(), any(w.id == 3 for w in step.work)))
    runner, big = make(tokenizer, 2, 10, prompt=[3] * 4), make(tokenizer, 3, 2, prompt=[4] * 19)
    results = serve(batcher, group, [runner, big])
    waiting = [cached for cached, big_runs in seen[:seen.index((False, True))]]
    assert len(waiting) >= 10 and all(waiting), "a failing admission evicted cached blocks"
    assert [ids(e) for e in results] == [kv_expected(2, [3] * 4, 10), kv_expected(3, [4] * 19, 2)]


def test_allocation_that_cannot_succeed_leaves_the_cache_alone():
    a = BlockAllocator(6, 2)
    cache = PrefixCache(a)
    held = a.allocate(4)
    cache.insert([1, 2, 3, 4], held[:2])
    a.release(held[:2])
    assert a.free == 2 and cache.evictable == 2
    assert a.allocate(5) is None
    assert cache.cached_blocks == 2 and cache.match([1, 2, 3, 4, 5])[0] == held[:2]


def test_a_request_preempted_while_its_last_token_is_in_flight_is_never_prefilled_again(tokenizer):  # noqa: F811
    """Its token lands after it left the shards: it finishes from the queue, not after a re-prefill."""
    preempted_in_flight = 0
    for seed in range(12):
        rng = random.Random(seed)
        group = KvFakeGroup(num_blocks=10, block_size=2)
        batcher = batcher_for(group, prefix_cache=rng.random() < 0.5)
        reqs = [make(tokenizer, i, rng.choice([2, 3, 6]), prompt=[5 + i] * rng.randint(1, 3),
                     priority=rng.randint(0, 1)) for i in range(1, 7)]
        results = serve(batcher, group, reqs)
        for r, events in zip(reqs, results):
            assert ids(events) == kv_expected(r.id, list(r.valid.prompt_token_ids), r.valid.max_new_tokens)
            last = min(i for i, seq, n in group.samples if seq == r.id and n == r.valid.max_new_tokens)
            assert all(i <= last for i in group.started_with(r.id)), f"request {r.id} was started after its last token"
            freed = [i for i, s in enumerate(group.steps) if r.id in s.free]
            preempted_in_flight += bool(freed and freed[-1] == last + 1)
    assert preempted_in_flight, "the workloads never preempted a request whose last token was in flight"


def _per_eviction_seconds(cached: int, evictions: int = 2000) -> float:
    a = BlockAllocator(cached + 1, 1)
    cache = PrefixCache(a)
    for i in range(cached):  # `cached` one-block prefixes, each held only by the cache
        (b,) = a.allocate(1)
        cache.insert([i], [b])
        a.release([b])
    a.allocate(1)  # the pool is dry: every allocation from here evicts
    start = time.perf_counter()
    for _ in range(evictions):
        a.release(a.allocate(1))
    return (time.perf_counter() - start) / evictions


def test_eviction_cost_stays_flat_with_50000_cached_blocks():
    small, large = _per_eviction_seconds(500), _per_eviction_seconds(50_000)
    assert large < 5 * small + 20e-6, f"{large * 1e6:.1f} us per eviction at 50,000 blocks, {small * 1e6:.1f} at 500"
