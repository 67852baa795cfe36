"""A fake shard group for router tests, exactly as strict as the real shards' bookkeeping.

`FakeGroup.step` runs every StepRequest through the real `shard.sequences.Sequences` (the same
checks the engine applies before its first collective: unknown frees, duplicate starts, decodes
without a sampled token, blocks outside the pool or too few for the tokens), so a router bug that
would make the real shards refuse a step makes this one refuse it too. Only the model is fake:
sequence s's n-th sampled token is `10 + (s + n) % 50` (n counts from 1), so a resumed sequence
continues exactly, whatever else runs beside it. `KvFakeGroup` goes further: its tokens depend on
the token ids held in the KV slots it reads, so a wrong block table or a shared block that was
overwritten changes the output.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from shardline.proto import shard_pb2
from shardline.router.group.shards import ShardGroupError
from shardline.shard.sequences import Limits, Sequence, Sequences, StepRefused


def token(seq_id: int, n: int) -> int:
    return 10 + (seq_id + n) % 50


class FakeGroup:
    def __init__(self, num_blocks: int = 1000, block_size: int = 4, vocab: int = 320,
                 before_step: Callable[[shard_pb2.StepRequest], None] | None = None):
        self.limits = Limits(vocab, 100_000, num_blocks, block_size)
        self.sequences = Sequences()
        self.broken = asyncio.Event()
        self.empty = asyncio.Event()  # set whenever a step leaves no sequence on the shards
        self.empty.set()
        self.broken_reason = ""
        self.constraints = False  # the fakes sample without grammars
        self.steps: list[shard_pb2.StepRequest] = []
        self.refusals: list[str] = []
        self.samples: list[tuple[int, int, int]] = []  # (step index, sequence id, n-th token)
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
        if self.sequences.live:
            self.empty.clear()
        else:
            self.empty.set()
        for seq, run, _ in work:  # like the engine: every K/V of the step is written, then read
            self.write(seq, run)
        out = []
        for seq, _, sample in work:
            if sample:
                t = self.sample(seq)
                seq.tokens.append(t)
                self.samples.append((len(self.steps) - 1, seq.id, seq.generated))
                out.append(shard_pb2.Generation(request_id=seq.id, token_id=t, logprob=-1.0))
        return shard_pb2.StepResponse(generations=out)

    def write(self, seq: Sequence, run: list[int]) -> None:
        seq.computed += len(run)

    def sample(self, seq: Sequence) -> int:
        return token(seq.id, seq.generated + 1)

    async def clear(self) -> None:
        """Reset: every rank forgets every sequence."""
        self.sequences.clear()
        self.empty.set()

    def started_with(self, seq_id: int) -> list[int]:
        """Indices of the steps that started sequence seq_id."""
        return [i for i, s in enumerate(self.steps) if any(n.id == seq_id for n in s.start)]


def kv_token(seq_id: int, n: int, context: list[int]) -> int:
    """The n-th token `KvFakeGroup` samples for a sequence whose K/V hold `context`."""
    return 10 + (seq_id + n + sum((i + 1) * t for i, t in enumerate(context))) % 50


def kv_expected(seq_id: int, prompt: list[int], n: int) -> list[int]:
    """The n tokens a sequence generates when every K/V it reads is its own."""
    out: list[int] = []
    for i in range(1, n + 1):
        out.append(kv_token(seq_id, i, [*prompt, *out]))
    return out


class KvFakeGroup(FakeGroup):
    """A fake whose tokens depend on the KV slots it reads, like a model's.

    Each run token is written into its slot (block table x block size + offset) of one pool shared
    by all sequences; a sample reads every slot of the sequence's context back through its block
    table. A block shared by two live sequences and overwritten, a wrong block table, a cached
    prefix whose blocks do not hold its tokens, or a slot never written (None) changes the token.
    """

    def __init__(self, num_blocks: int = 1000, block_size: int = 4, **kw):
        super().__init__(num_blocks, block_size, **kw)
        self.pool: list[int | None] = [None] * (num_blocks * block_size)

    def _slot(self, seq: Sequence, pos: int) -> int:
        bs = self.limits.block_size
        return seq.blocks[pos // bs] * bs + pos % bs

    def write(self, seq: Sequence, run: list[int]) -> None:
        for i, t in enumerate(run, start=seq.computed):
            self.pool[self._slot(seq, i)] = t
        seq.computed += len(run)

    def sample(self, seq: Sequence) -> int:
        context = [self.pool[self._slot(seq, i)] for i in range(seq.computed)]
        context = [-1 if t is None else t for t in context]
        return kv_token(seq.id, seq.generated + 1, context)
