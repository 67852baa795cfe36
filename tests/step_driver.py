"""Plays the router for shard tests: allocates KV blocks, builds Step calls, collects tokens.

`Driver` is deliberately simple and independent of the router's scheduler (so shard tests do not
trust the code they would be checking): requests start when added, prompts run in chunks of at
most `chunk` tokens, every running request decodes each step, blocks come from a free list, and a
request finishes after `max_new_tokens` (EOS ignored). `drop(id)` ends a request early.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardline.proto import shard_pb2


@dataclass
class Tracked:
    id: int
    prompt: list[int]
    max_new: int
    sampling: shard_pb2.SamplingParameters
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    fed: int = 0  # tokens of prompt + generated already sent
    blocks: list[int] = field(default_factory=list)
    started: bool = False

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.max_new


class Driver:
    def __init__(self, block_size: int, num_blocks: int, chunk: int = 1 << 30):
        self.block_size, self.chunk = block_size, chunk
        self.free_blocks = list(range(num_blocks))
        self.live: dict[int, Tracked] = {}
        self.finished: dict[int, Tracked] = {}
        self.to_free: list[int] = []

    def add(self, rid: int, prompt: list[int], max_new: int, **sampling) -> None:
        self.live[rid] = Tracked(rid, list(prompt), max_new, shard_pb2.SamplingParameters(**sampling))

    def drop(self, rid: int) -> None:
        t = self.live.pop(rid)
        self.finished[rid] = t
        self._release(t)

    def _release(self, t: Tracked) -> None:
        self.free_blocks += t.blocks
        t.blocks = []
        if t.started:
            self.to_free.append(t.id)

    def _blocks_for(self, t: Tracked, end: int) -> list[int]:
        need = -(-end // self.block_size) - len(t.blocks)
        if need > len(self.free_blocks):
            raise RuntimeError(f"test pool exhausted: request {t.id} needs {need} more blocks")
        new, self.free_blocks = self.free_blocks[:need], self.free_blocks[need:]
        t.blocks += new
        return new

    def next_step(self) -> shard_pb2.StepRequest | None:
        if not self.live and not self.to_free:
            return None
        step = shard_pb2.StepRequest(free=self.to_free)
        self.to_free = []
        for t in self.live.values():
            sequence = t.prompt + t.generated
            if t.fed < len(t.prompt):
                tokens = t.prompt[t.fed:t.fed + self.chunk]
            else:
                tokens = []  # decode the token the shard sampled
            end = t.fed + max(1, len(tokens))
            if not t.started:
                step.start.append(shard_pb2.NewSequence(id=t.id, sampling=t.sampling, prompt_len=len(t.prompt)))
                t.started = True
            step.work.append(shard_pb2.Work(id=t.id, token_ids=tokens, new_blocks=self._blocks_for(t, end),
                                            sample=end >= len(sequence)))
            t.fed = end
        return step

    def absorb(self, generations) -> None:
        for g in generations:
            t = self.live[g.request_id]
            t.generated.append(g.token_id)
            t.logprobs.append(g.logprob)
            if t.done:
                self.drop(t.id)

    def tokens(self, rid: int) -> list[int]:
        t = self.finished.get(rid) or self.live[rid]
        return t.generated


def run_sync(step_fn, driver: Driver, max_steps: int = 10_000) -> Driver:
    """Runs steps through `step_fn(StepRequest) -> generations` until every request finished."""
    for _ in range(max_steps):
        step = driver.next_step()
        if step is None:
            return driver
        driver.absorb(step_fn(step))
    raise AssertionError("requests never finished")


async def run_async(group, driver: Driver, max_steps: int = 10_000) -> Driver:
    """The same against a ShardGroup (every rank, over gRPC)."""
    for _ in range(max_steps):
        step = driver.next_step()
        if step is None:
            return driver
        driver.absorb((await group.step(step)).generations)
    raise AssertionError("requests never finished")
