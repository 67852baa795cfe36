"""The router's prefix cache and block allocator: exact matching, reference counts, LRU eviction,
and (through the batcher and the strict fake shards) cached and uncached runs giving the same tokens."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fake_shards import FakeGroup
from shardline.router.scheduling.blocks import BlockAllocator
from shardline.router.scheduling.prefix_cache import PrefixCache
from test_batcher import batcher_for, drain, expected, ids, make, serve, settle, tokenizer  # noqa: F401


def test_match_takes_whole_blocks_and_leaves_one_token_to_compute():
    a = BlockAllocator(10, 4)
    cache = PrefixCache(a)
    blocks = a.allocate(3)
    cache.insert(list(range(12)), blocks)
    assert cache.match(list(range(12)))[0] == blocks[:2], "the last token must be computed for its logits"
    assert cache.match(list(range(13)))[0] == blocks
    assert cache.match(list(range(6)) + [99] * 6)[0] == blocks[:1]
    assert cache.match([99] + list(range(1, 12)))[0] == [], "keys are the token ids themselves"


def test_shared_blocks_survive_eviction_and_unreferenced_ones_go_lru_first():
    a = BlockAllocator(6, 2)
    cache = PrefixCache(a)
    old, hot = a.allocate(2), a.allocate(2)
    cache.insert([1, 2, 3, 4], old)
    cache.insert([5, 6, 7, 8], hot)
    a.release(old)
    a.release(hot)
    held, _ = cache.match([5, 6, 7, 8, 9])  # a running request shares `hot`
    assert held == hot and a.free == 2
    got = a.allocate(4)
    assert got is not None and set(old) <= set(got), "evicted the unreferenced blocks"
    assert a.allocate(1) is None, "blocks shared by a running request are never evicted"
    assert cache.match([5, 6, 7, 8, 9])[0] == hot


def test_a_duplicate_prefix_keeps_the_first_block():
    a = BlockAllocator(4, 2)
    cache = PrefixCache(a)
    first, second = a.allocate(1), a.allocate(1)
    cache.insert([1, 2], first)
    cache.insert([1, 2], second)
    a.release(first + second)
    assert a.free == 3 and cache.match([1, 2, 3])[0] == first


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 2), min_size=1, max_size=9), st.booleans()), max_size=30))
def test_reference_counts_never_go_wrong(ops):
    """Random requests take a cached prefix plus fresh blocks, compute, cache, end: every block stays
    free xor referenced, and what a request got back from the cache holds exactly its tokens."""
    a = BlockAllocator(12, 2)
    cache = PrefixCache(a)
    content: dict[int, tuple[int, ...]] = {}
    live = []
    for tokens, end_one in ops:
        hit, _ = cache.match(tokens)
        for i, b in enumerate(hit):
            assert content[b] == tuple(tokens[2 * i:2 * i + 2])
        fresh = a.allocate(-(-len(tokens) // 2) - len(hit))
        if fresh is None:
            a.release(hit)
        else:
            blocks = hit + fresh
            for i, b in enumerate(fresh, start=len(hit)):
                content[b] = tuple(tokens[2 * i:2 * i + 2])
            cache.insert(tokens, blocks)
            live.append(blocks)
        if end_one and live:
            a.release(live.pop(random.Random(len(live)).randrange(len(live))))
        assert a.free + sum(1 for r in a.refs if r) == a.num_blocks
        assert all(a.refs[b] >= 1 for b in cache.nodes)
        assert cache.evictable == sum(1 for b in cache.nodes if a.refs[b] == 1)
    for blocks in live:
        a.release(blocks)
    assert a.used == cache.cached_blocks


@pytest.mark.parametrize("shared", [8, 10])  # ends on a block boundary (block 4), and inside one
def test_cached_and_uncached_runs_give_the_same_tokens(tokenizer, shared):  # noqa: F811
    prefix = list(range(20, 20 + shared))
    group = FakeGroup(block_size=4)
    batcher = batcher_for(group)
    first = make(tokenizer, 1, 5, prompt=prefix + [3])
    serve(batcher, group, [first])
    second = make(tokenizer, 2, 5, prompt=prefix + [4, 5])
    (events,) = serve(batcher, group, [second])
    start = next(s for s in group.steps if any(n.id == 2 for n in s.start))
    cached = list(next(n for n in start.start if n.id == 2).cached_token_ids)
    assert cached == prefix[:shared // 4 * 4]
    run = next(w for w in start.work if w.id == 2).token_ids
    assert list(run) == (prefix + [4, 5])[len(cached):], "only the rest of the prompt is computed"
    assert ids(events) == expected(2, 5) and second.usage().cached_prompt_tokens == len(cached)


def test_cache_off_computes_everything(tokenizer):  # noqa: F811
    group = FakeGroup(block_size=4)
    batcher = batcher_for(group, prefix_cache=False)
    serve(batcher, group, [make(tokenizer, 1, 3, prompt=list(range(30)))])
    serve(batcher, group, [make(tokenizer, 2, 3, prompt=list(range(30)))])
    assert all(not n.cached_token_ids for s in group.steps for n in s.start)
    assert batcher.allocator.used == 0
