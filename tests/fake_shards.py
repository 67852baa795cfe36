"""A fake shard group for router tests, exactly as strict as the real shards' bookkeeping.

`FakeGroup.step` runs every StepRequest through the real `shard.sequences.Sequences` (the same
checks the engine applies before its first collective: unknown frees, duplicate starts, decodes
without a sampled token, blocks outside the pool or too few for the tokens), so a router bug that
would make the real shards refuse a step makes this one refuse it too. Only the model is fake:
sequence s's n-th sampled token is `10 + (s + n) % 50` (n counts from 1), so a resumed sequence
continues exactly, whatever else runs beside it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from shardline.proto import shard_pb2
from shardline.router.shards import ShardGroupError
from shardline.shard.sequences import Limits, Sequences, StepRefused


def token(seq_id: int, n: int) -> int:
    return 10 + (seq_id + n) % 50


class FakeGroup:
    def __init__(self, num_blocks: int = 1000, block_size: int = 4, vocab: int = 320,
                 before_step: Callable[[shard_pb2.StepRequest], None] | None = None):
        self.limits = Limits(vocab, 100_000, num_blocks, block_size)
        self.sequences = Sequences()
        self.broken = asyncio.Event()
        self.broken_reason = ""
        self.steps: list[shard_pb2.StepRequest] = []
        self.refusals: list[str] = []
        self.before_step = before_step  # may raise ShardGroupError to fail a step

    def raise_if_broken(self, method: str) -> None:
        if self.broken.is_set():
            raise ShardGroupError(method, -1, grpc.StatusCode.UNAVAILABLE, self.broken_reason)

    async def step(self, request: shard_pb2.StepRequest, request_ids=()) -> shard_pb2.StepResponse:
        self.steps.append(shard_pb2.StepRequest.FromString(request.SerializeToString()))
        await asyncio.sleep(0)
        if self.before_step is not None:
            self.before_step(request)
        try:
            work = self.sequences.apply(request, self.limits)
        except StepRefused as exc:
            self.refusals.append(str(exc))
            raise ShardGroupError("Step", 0, grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        out = []
        for seq, run, sample in work:
            seq.computed += len(run)
            if sample:
                t = token(seq.id, seq.generated + 1)
                seq.tokens.append(t)
                out.append(shard_pb2.Generation(request_id=seq.id, token_id=t, logprob=-1.0))
        return shard_pb2.StepResponse(generations=out)

    async def clear(self) -> None:
        """Reset: every rank forgets every sequence."""
        self.sequences.clear()

    def started_with(self, seq_id: int) -> list[int]:
        """Indices of the steps that started sequence seq_id."""
        return [i for i, s in enumerate(self.steps) if any(n.id == seq_id for n in s.start)]
