"""The batching loop against a fake shard group that is as strict as the real shards' bookkeeping.

Joins, requests ending at their first token or on the router's side, cancels, refusals, failures
charged to requests, restarts and preemptions; after each workload every block is free and the
shards hold no sequence.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from checkpoints import build_tokenizer
from fake_shards import FakeGroup, token
from transformers import AutoTokenizer

from shardline.proto import serving_pb2
from shardline.router.scheduling.batcher import Batcher, NeverFits
from shardline.router.scheduling.blocks import BlockAllocator
from shardline.router.config import RouterConfig
from shardline.router.scheduling.detokenizer import IncrementalDetokenizer
from shardline.router.scheduling.request import Failure, RouterRequest
from shardline.router.group.shards import ShardGroupError
from shardline.router.scheduling.params import ValidRequest


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path: Path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def make(tokenizer, rid: int, max_new: int, *, stop=(), prompt=(5, 6, 7), priority: int = 0,
         ignore_eos: bool = True) -> RouterRequest:
    valid = ValidRequest(prompt_token_ids=tuple(prompt), max_new_tokens=max_new, temperature=0.0, top_k=0,
                         top_p=1.0, repetition_penalty=1.0, seed=None, stop=tuple(stop), ignore_eos=ignore_eos,
                         logprobs=False, priority=priority)
    return RouterRequest(priority=priority, prompt_len=len(prompt), max_new_tokens=max_new, id=rid,
                         request_id=f"r{rid}", valid=valid, detokenizer=IncrementalDetokenizer(tokenizer, stop))


def expected(rid: int, n: int) -> list[int]:
    return [token(rid, i) for i in range(1, n + 1)]


def batcher_for(group: FakeGroup, eos=frozenset(), **cfg) -> Batcher:
    cfg = RouterConfig(model=Path("."), **cfg)
    return Batcher(cfg, BlockAllocator(group.limits.num_blocks, group.limits.block_size), eos_ids=eos)


async def drain(req: RouterRequest) -> list:
    events = []
    while not events or not isinstance(events[-1], Failure) and not events[-1].finish_reason:
        events.append(await asyncio.wait_for(req.events.get(), 10))
    return events


def ids(events: list) -> list[int]:
    return [m.token_id for m in events if not isinstance(m, Failure)]


async def settle(batcher: Batcher, group: FakeGroup) -> None:
    """Waits for the step that sends the last frees; then nothing may be left anywhere."""
    await asyncio.wait_for(group.empty.wait(), 10)
    assert not group.sequences.live, "the shards still hold sequences"
    cached = list(batcher.cache.nodes) if batcher.cache is not None else []
    assert batcher.allocator.used == len(cached), "blocks leaked: every block is free or cached"
    assert all(batcher.allocator.refs[b] == 1 for b in cached), "a cached block is still referenced"
    assert not batcher.admitted and not batcher.running


def serve(batcher: Batcher, group: FakeGroup, reqs: list[RouterRequest], during=None):
    async def main():
        loop = asyncio.create_task(batcher.run(group))
        try:
            for r in reqs:
                batcher.submit(r)
            if during is not None:
                await during()
            results = await asyncio.gather(*(drain(r) for r in reqs))
            await settle(batcher, group)
            return results
        finally:
            loop.cancel()
    return asyncio.run(main())


def test_late_requests_join_running_decodes(tokenizer):
    group = FakeGroup()
    batcher = batcher_for(group)
    first = make(tokenizer, 1, 8)
    late = [make(tokenizer, 2, 3), make(tokenizer, 3, 4)]
    late_results = []

    async def submit_late():
        await asyncio.wait_for(first.events.get(), 5)
        for r in late:
            batcher.submit(r)
        late_results.extend(await asyncio.gather(*(drain(r) for r in late)))
    results = serve(batcher, group, [first], during=submit_late)
    assert ids(results[0]) == expected(1, 8)[1:]
    assert [ids(e) for e in late_results] == [expected(2, 3), expected(3, 4)]
    joined = [s for s in group.steps if s.start and any(not w.token_ids for w in s.work)]
    assert joined, "a newcomer was started in a step that also decoded the running request"


@pytest.mark.parametrize("ending", ["max_new_tokens", "eos", "stop", "cancel"])
def test_a_request_ending_at_its_first_token_never_breaks_the_others(tokenizer, ending):
    """The landed v1 restarted the group here: the shard had deleted the batch the router named next."""
    group = FakeGroup()
    eos = frozenset({token(2, 1)}) if ending == "eos" else frozenset()
    batcher = batcher_for(group, eos=eos)
    long = make(tokenizer, 1, 12)
    short = make(tokenizer, 2, 1 if ending == "max_new_tokens" else 6, ignore_eos=ending != "eos",
                 stop=[tokenizer.decode([token(2, 1)])] if ending == "stop" else ())

    short_events = []

    async def add_short():
        await asyncio.wait_for(long.events.get(), 5)
        batcher.submit(short)
        if ending == "cancel":
            await asyncio.sleep(0)
            batcher.cancel(short)
            short.fail(grpc.StatusCode.CANCELLED, "client went away")
        short_events.extend(await drain(short))
    (events,) = serve(batcher, group, [long], during=add_short)
    assert ids(events) == expected(1, 12)[1:]
    assert not group.refusals
    if ending != "cancel":
        assert ids(short_events) == [token(2, 1)] and short_events[-1].finish_reason


def test_random_mixes_of_endings_keep_router_and_shards_in_agreement(tokenizer):
    import random
    rng = random.Random(7)
    for round_ in range(4):
        group = FakeGroup(num_blocks=40, block_size=2)
        batcher = batcher_for(group, max_batch_prefill_tokens=rng.choice([3, 8, 64]))
        reqs = [make(tokenizer, 100 * round_ + i, rng.choice([1, 1, 2, 5, 9]),
                     prompt=[5] * rng.randint(1, 7), priority=rng.randint(0, 2)) for i in range(12)]
        victims = rng.sample(reqs, 3)

        async def cancel_some():
            for _ in range(rng.randint(0, 6)):
                await asyncio.sleep(0)
            for v in victims:
                if not v.done:
                    batcher.cancel(v)
                    v.fail(grpc.StatusCode.CANCELLED, "client went away")
        results = serve(batcher, group, reqs, during=cancel_some)
        assert not group.refusals
        for r, events in zip(reqs, results):
            if r not in victims or r.done and not r.error:
                assert ids(events) == expected(r.id, r.valid.max_new_tokens)


def test_stop_string_frees_the_request_on_the_shards(tokenizer):
    group = FakeGroup()
    batcher = batcher_for(group)
    text = tokenizer.decode(expected(1, 2))
    stopper, other = make(tokenizer, 1, 20, stop=[text]), make(tokenizer, 2, 5)
    stopped, rest = serve(batcher, group, [stopper, other])
    assert stopped[-1].finish_reason == serving_pb2.FINISH_REASON_STOP and len(stopped) == 2
    assert rest[-1].finish_reason == serving_pb2.FINISH_REASON_LENGTH and ids(rest) == expected(2, 5)
    assert any(1 in s.free for s in group.steps)


def test_request_that_can_never_fit_is_refused_at_admission(tokenizer):
    group = FakeGroup(num_blocks=4, block_size=4)
    batcher = batcher_for(group)
    with pytest.raises(NeverFits, match=r"3 tokens\) \+ max_new_tokens \(14\) = 17 KV tokens.*\(16 tokens\)"):
        batcher.submit(make(tokenizer, 1, 14))
    assert not batcher.admitted


def test_preemption_keeps_every_stream_exact(tokenizer):
    """A pool far smaller than the requests' total: all start, some are preempted and resumed."""
    group = FakeGroup(num_blocks=12, block_size=2)
    batcher = batcher_for(group)
    reqs = [make(tokenizer, i, 14, prompt=[5, 6], priority=i % 2) for i in range(1, 7)]
    results = serve(batcher, group, reqs)
    assert [ids(e) for e in results] == [expected(r.id, 14) for r in reqs]
    assert batcher.metrics.preemptions._value.get() > 0
    first_finish = min(i for i, s in enumerate(group.steps) if s.free)
    assert all(group.started_with(r.id)[0] < first_finish for r in reqs), "every request streams before any ends"


def test_preemption_takes_the_lowest_priority_newest_request(tokenizer):
    group = FakeGroup(num_blocks=6, block_size=2)
    batcher = batcher_for(group)
    high, low_old, low_new = (make(tokenizer, 1, 6, prompt=[5], priority=1),
                              make(tokenizer, 2, 6, prompt=[5]), make(tokenizer, 3, 6, prompt=[5]))
    serve(batcher, group, [high, low_old, low_new])
    restarts = {r.id: len(group.started_with(r.id)) for r in (high, low_old, low_new)}
    assert restarts[1] == 1 and restarts[3] > 1 and restarts[3] >= restarts[2]


def _failing(code: grpc.StatusCode, poison_id: int):
    def before_step(request):
        if any(w.id == poison_id for w in request.work):
            raise ShardGroupError("Step", 0, code, "torch.multinomial: invalid probability")
    return before_step


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT])
def test_a_poison_request_is_failed_alone_and_never_uses_up_restarts(tokenizer, code):
    group = FakeGroup()
    counted = []

    async def restart(exc, is_counted):
        counted.append(is_counted)
        group.sequences.clear()
        return group
    group.before_step = _failing(code, 2)
    batcher = batcher_for(group)
    batcher.on_group_failure = restart
    good, poison, late = make(tokenizer, 1, 6), make(tokenizer, 2, 6), make(tokenizer, 3, 4)
    results = serve(batcher, group, [good, poison, late])
    assert isinstance(results[1][-1], Failure) and results[1][-1].code == grpc.StatusCode.INTERNAL
    assert "failed on the shards in 2 steps" in results[1][-1].message and "multinomial" in results[1][-1].message
    assert ids(results[0]) == expected(1, 6) and ids(results[2]) == expected(3, 4)
    assert not any(counted), "failures charged to a request must not count against --max-restarts"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert not counted, "a refused step changes nothing on the shards: no restart"


def test_a_dead_shard_restarts_the_group_and_streams_resume_exactly(tokenizer):
    group, fresh = FakeGroup(), FakeGroup()
    calls = {"n": 0}

    def die_once(request):
        calls["n"] += 1
        if calls["n"] == 4:
            raise ShardGroupError("Step", 1, grpc.StatusCode.UNAVAILABLE, "Socket closed")
    group.before_step = die_once
    counted = []

    async def restart(exc, is_counted):
        counted.append(is_counted)
        return fresh
    batcher = batcher_for(group)
    batcher.on_group_failure = restart
    reqs = [make(tokenizer, 7, 9), make(tokenizer, 8, 5)]

    async def main():
        loop = asyncio.create_task(batcher.run(group))
        try:
            for r in reqs:
                batcher.submit(r)
            results = await asyncio.gather(*(drain(r) for r in reqs))
            await settle(batcher, fresh)
            return results
        finally:
            loop.cancel()
    results = asyncio.run(main())
    assert [ids(e) for e in results] == [expected(7, 9), expected(8, 5)]
    assert counted == [True]
    resumed = [w for s in fresh.steps for w in s.work if w.token_ids]
    assert {w.id for w in resumed} == {7, 8} and all(len(w.token_ids) > 3 for w in resumed), \
        "resumed from prompt + streamed tokens"


def test_chunked_prefill_never_stalls_running_decodes(tokenizer):
    group = FakeGroup()
    batcher = batcher_for(group, max_batch_prefill_tokens=8)
    runner, long = make(tokenizer, 1, 30), make(tokenizer, 2, 3, prompt=[5] * 40)

    async def add_long():
        await asyncio.wait_for(runner.events.get(), 5)
        batcher.submit(long)
    serve(batcher, group, [runner], during=add_long)
    chunks = [s for s in group.steps if any(w.id == 2 and w.token_ids for w in s.work)]
    assert len(chunks) >= 5, "a 40-token prompt is split under an 8-token step budget"
    for s in chunks:
        assert sum(len(w.token_ids) or 1 for w in s.work) <= 8
        if not runner.done:
            assert any(w.id == 1 and not w.token_ids for w in s.work), "the running stream decodes in every chunk step"
    assert long.token_ids == expected(2, 3)


@pytest.mark.parametrize("ending", ["length", "stop", "cancel"])
def test_the_overlapped_extra_step_never_streams_an_extra_token(tokenizer, ending):
    """Step N+1 is sent before N's tokens are seen, so a request ending in N by a stop string (or
    cancelled) is computed once more; one ending by max_new_tokens is known to end and is not."""
    group = FakeGroup()
    batcher = batcher_for(group)
    stop = [tokenizer.decode(expected(1, 3)[2:])] if ending == "stop" else ()
    req, other = make(tokenizer, 1, 3 if ending == "length" else 20, stop=stop), make(tokenizer, 2, 10)

    async def cancel_after_two():
        if ending == "cancel":
            seen = [await asyncio.wait_for(req.events.get(), 5) for _ in range(2)]
            batcher.cancel(req)
            req.fail(grpc.StatusCode.CANCELLED, "client went away")
            assert ids(seen) == expected(1, 2)
    results = serve(batcher, group, [req, other], during=cancel_after_two)
    assert ids(results[1]) == expected(2, 10)
    if ending != "cancel":
        assert ids(results[0]) == expected(1, 3)
    decoded = sum(1 for s in group.steps for w in s.work if w.id == 1 and w.sample)
    if ending == "length":
        assert decoded == 3, "a request known to end (max_new_tokens) gets no overlap decode"
    else:  # EOS / stop / cancel are only known once the token is seen
        assert decoded > (2 if ending == "cancel" else 3), "the overlap ran an extra step for the ended request"
    if ending == "cancel":  # tokens already queued for the client when it left are not extra
        assert req.token_ids == expected(1, len(req.token_ids)) and len(req.token_ids) < 20
    else:
        assert req.token_ids == expected(1, 3)
