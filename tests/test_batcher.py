"""The continuous-batching loop against a fake shard group: joins, filters, refusals, restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from checkpoints import build_tokenizer
from transformers import AutoTokenizer

from shardline.proto import serving_pb2, shard_pb2
from shardline.router.batcher import Batcher
from shardline.router.config import RouterConfig
from shardline.router.detokenizer import IncrementalDetokenizer
from shardline.router.request import Failure, RouterRequest
from shardline.router.shards import ShardGroupError
from shardline.router.validation import ValidRequest


class FakeGroup:
    """Answers like a shard group: request r's n-th token is 10 + (r + n) % 50."""

    def __init__(self, refuse: grpc.StatusCode | None = None):
        self.refuse, self.broken = refuse, asyncio.Event()
        self.batches: dict[int, list[shard_pb2.Request]] = {}
        self.counts: dict[int, int] = {}
        self.calls: list[tuple] = []

    def raise_if_broken(self, method: str) -> None:
        return None

    def _gen(self, r: shard_pb2.Request) -> shard_pb2.Generation:
        n = self.counts[r.id] = self.counts.get(r.id, len(r.generated_token_ids)) + 1
        done = n >= r.stopping.max_new_tokens
        return shard_pb2.Generation(request_id=r.id, token_id=10 + (r.id + n) % 50, logprob=-1.0,
                                    finish_reason=shard_pb2.FINISH_REASON_LENGTH if done else 0)

    def _step(self, batch_id: int) -> list[shard_pb2.Generation]:
        gens = [self._gen(r) for r in self.batches[batch_id]]
        finished = {g.request_id for g in gens if g.finish_reason}
        self.batches[batch_id] = [r for r in self.batches[batch_id] if r.id not in finished]
        return gens

    async def prefill(self, batch, request_ids=()):
        self.calls.append(("prefill", [r.id for r in batch.requests]))
        if self.refuse is not None:
            raise ShardGroupError("Prefill", 0, self.refuse, "token id 999 is outside the vocabulary")
        self.batches[batch.id] = list(batch.requests)
        return shard_pb2.PrefillResponse(generations=self._step(batch.id), batch_id=batch.id)

    async def decode(self, batch_ids):
        self.calls.append(("decode", list(batch_ids)))
        merged = self.batches[batch_ids[0]]
        for other in batch_ids[1:]:
            merged += self.batches.pop(other)
        await asyncio.sleep(0)
        return shard_pb2.DecodeResponse(generations=self._step(batch_ids[0]), batch_id=batch_ids[0])

    async def filter(self, batch_id, request_ids):
        self.calls.append(("filter", sorted(request_ids)))
        self.batches[batch_id] = [r for r in self.batches[batch_id] if r.id in request_ids]
        return len(self.batches[batch_id])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path: Path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def make(tokenizer, rid: int, max_new: int, stop=()) -> RouterRequest:
    valid = ValidRequest(prompt_token_ids=(5, 6, 7), max_new_tokens=max_new, temperature=0.0, top_k=0, top_p=1.0,
                         repetition_penalty=1.0, seed=None, stop=tuple(stop), ignore_eos=True, logprobs=False,
                         priority=0)
    return RouterRequest(priority=0, prompt_len=3, max_new_tokens=max_new, id=rid, request_id=f"r{rid}",
                         valid=valid, detokenizer=IncrementalDetokenizer(tokenizer, stop))


async def drain(req: RouterRequest) -> list:
    events = []
    while not events or not isinstance(events[-1], Failure) and not events[-1].finish_reason:
        events.append(await asyncio.wait_for(req.events.get(), 10))
    return events


def config(**kw) -> RouterConfig:
    return RouterConfig(model=Path("."), max_waiting_tokens=1, **kw)


async def run(batcher: Batcher, group: FakeGroup, reqs: list[RouterRequest]) -> list[list]:
    loop = asyncio.create_task(batcher.run(group))
    try:
        return await asyncio.gather(*(drain(r) for r in reqs))
    finally:
        loop.cancel()


def test_late_requests_join_the_running_batch(tokenizer):
    async def main():
        group, batcher = FakeGroup(), Batcher(config(), 10_000)
        first = make(tokenizer, 1, 6)
        batcher.submit(first)
        loop = asyncio.create_task(batcher.run(group))
        await asyncio.wait_for(first.events.get(), 5)  # first is running
        late = [make(tokenizer, 2, 3), make(tokenizer, 3, 4)]
        for r in late:
            batcher.submit(r)
        results = await asyncio.gather(*(drain(r) for r in late))
        rest = await drain(first)
        loop.cancel()
        return group, results, rest
    group, results, rest = asyncio.run(main())
    assert [len(r) for r in results] == [3, 4] and len(rest) == 5
    assert [m.token_id for m in results[0]] == [10 + (2 + n) % 50 for n in (1, 2, 3)]
    assert ("decode", [1, 2]) in group.calls, "the late batch was joined to the running one"


def test_stop_string_filters_the_request_out_of_the_shards_batch(tokenizer):
    async def main():
        group, batcher = FakeGroup(), Batcher(config(), 10_000)
        text = tokenizer.decode([10 + (1 + n) % 50 for n in (1, 2)])
        stopper, other = make(tokenizer, 1, 20, stop=[text]), make(tokenizer, 2, 5)
        for r in (stopper, other):
            batcher.submit(r)
        return group, await run(batcher, group, [stopper, other])
    group, (stopped, other) = asyncio.run(main())
    assert stopped[-1].finish_reason == serving_pb2.FINISH_REASON_STOP and len(stopped) == 2
    assert ("filter", [2]) in group.calls
    assert other[-1].finish_reason == serving_pb2.FINISH_REASON_LENGTH and len(other) == 5


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_a_refused_prefill_fails_its_requests_not_the_group(tokenizer, code):
    restarts = []

    async def main():
        group, batcher = FakeGroup(refuse=code), Batcher(config(), 10_000)

        async def restart(exc):
            restarts.append(exc)
            return group
        batcher.on_group_failure = restart
        bad = make(tokenizer, 1, 4)
        batcher.submit(bad)
        events = await run(batcher, group, [bad])
        group.refuse = None
        good = make(tokenizer, 2, 3)
        batcher.submit(good)
        return events, await run(batcher, group, [good]), batcher
    (failed,), (served,), batcher = asyncio.run(main())
    assert isinstance(failed[-1], Failure) and failed[-1].code == code
    assert "outside the vocabulary" in failed[-1].message
    assert not restarts, "a refused batch must not restart the group"
    assert len(served) == 3 and not batcher.admitted


def test_a_failed_step_requeues_running_requests_with_their_tokens(tokenizer):
    async def main():
        group, batcher = FakeGroup(), Batcher(config(), 10_000)
        fresh = FakeGroup()
        calls = {"n": 0}
        real_decode = group.decode

        async def flaky(batch_ids):
            calls["n"] += 1
            if calls["n"] == 2:
                raise ShardGroupError("Decode", 1, grpc.StatusCode.UNAVAILABLE, "Socket closed")
            return await real_decode(batch_ids)
        group.decode = flaky

        async def restart(exc):
            return fresh
        batcher.on_group_failure = restart
        req = make(tokenizer, 7, 6)
        batcher.submit(req)
        return fresh, await run(batcher, group, [req])
    fresh, (events,) = asyncio.run(main())
    assert [m.token_id for m in events] == [10 + (7 + n) % 50 for n in range(1, 7)]
    resumed = [c for c in fresh.calls if c[0] == "prefill"]
    assert resumed == [("prefill", [7])], "re-prefilled on the new group"
