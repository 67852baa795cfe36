"""Plays the router for shard tests: allocates KV blocks, builds Step calls, collects tokens.

`Driver` is deliberately simple and independent of the router's scheduler (so shard tests do not
trust the code they would be checking): requests start when added, prompts run in chunks of at
most `chunk` tokens, every running request decodes each step, blocks come from a free list (in
the order given: tests pass a shuffled one to scatter each sequence over the pool), and a request
finishes after `max_new_tokens` (EOS ignored). `add(..., cached_blocks=[...])` starts a request
whose prompt begins with those whole blocks' tokens, already written by another request (a
prefix cache hit: sent as `cached_token_ids`, not run again; the blocks stay the owner's, the owner
must outlive the reader). `drop(id)` ends a request early; `resume(id)`
frees it on the shards and starts it again from prompt + tokens generated so far, as the router
does after a preemption or a restart. `peek()` is the step the driver would send next, without
changing its state (tests spoil it to build refused steps). `run_sync`/`run_async` take `events`:
callbacks run before the step of that index, to add, drop or resume requests mid-run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from shardline.proto import shard_pb2

Events = Mapping[int, Callable[["Driver"], None]]


@dataclass
class Tracked:
    id: int
    prompt: list[int]
    max_new: int
    sampling: shard_pb2.SamplingParameters
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # top_logprobs per token
    fed: int = 0  # tokens of prompt + generated already run on the shards
    replay: int = 0  # generated tokens to send again as input (after a resume)
    blocks: list[int] = field(default_factory=list)
    shared: int = 0  # leading blocks borrowed from another request (never released by this one)
    started: bool = False

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.max_new

    def next_tokens(self, chunk: int) -> list[int]:
        """Tokens to send now: the next chunk of prompt (+ replayed tokens), or [] to decode."""
        explicit = len(self.prompt) + self.replay
        sequence = self.prompt + self.generated
        return sequence[self.fed:min(self.fed + chunk, explicit)] if self.fed < explicit else []


class Driver:
    def __init__(self, block_size: int, num_blocks: int, chunk: int = 1 << 30,
                 free_list: list[int] | None = None):
        self.block_size, self.chunk = block_size, chunk
        self.free_blocks = list(range(num_blocks)) if free_list is None else list(free_list)
        self.live: dict[int, Tracked] = {}
        self.finished: dict[int, Tracked] = {}
        self.to_free: list[int] = []
        self.history: list[shard_pb2.StepRequest] = []  # every step sent, in order

    def add(self, rid: int, prompt: list[int], max_new: int, cached_blocks: list[int] = (), **sampling) -> None:
        t = Tracked(rid, list(prompt), max_new, shard_pb2.SamplingParameters(**sampling))
        t.blocks, t.shared, t.fed = list(cached_blocks), len(cached_blocks), len(cached_blocks) * self.block_size
        assert t.fed < len(prompt), "a cached prefix must leave at least one prompt token to run"
        self.live[rid] = t

    def drop(self, rid: int) -> None:
        t = self.live.pop(rid)
        self.finished[rid] = t
        self._release(t)

    def resume(self, rid: int) -> None:
        """Frees the sequence on the shards and starts it again from prompt + generated."""
        t = self.live[rid]
        self._release(t)
        t.started, t.fed, t.replay, t.shared = False, 0, len(t.generated), 0

    def _release(self, t: Tracked) -> None:
        self.free_blocks += t.blocks[t.shared:]
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

    def peek(self) -> shard_pb2.StepRequest | None:
        """The step `next_step` would return, leaving this driver unchanged."""
        return copy.deepcopy(self).next_step()

    def next_step(self) -> shard_pb2.StepRequest | None:
        if not self.live and not self.to_free:
            return None
        step = shard_pb2.StepRequest(free=self.to_free)
        self.to_free = []
        for t in self.live.values():
            tokens = t.next_tokens(self.chunk)
            end = t.fed + max(1, len(tokens))
            blocks = [] if t.started else t.blocks[:t.shared]  # a start names its cached blocks too
            if not t.started:
                cached = t.prompt[:t.shared * self.block_size]
                step.start.append(shard_pb2.NewSequence(id=t.id, sampling=t.sampling, prompt_len=len(t.prompt),
                                                        cached_token_ids=cached))
                t.started = True
            step.work.append(shard_pb2.Work(id=t.id, token_ids=tokens, new_blocks=blocks + self._blocks_for(t, end),
                                            sample=end >= len(t.prompt) + len(t.generated)))
            t.fed = end
        self.history.append(step)
        return step

    def absorb(self, generations) -> None:
        for g in generations:
            t = self.live[g.request_id]
            t.generated.append(g.token_id)
            t.logprobs.append(g.logprob)
            t.top.append([(x.token_id, x.logprob) for x in g.top_logprobs])
            if t.done:
                self.drop(t.id)

    def tracked(self, rid: int) -> Tracked:
        return self.finished.get(rid) or self.live[rid]

    def tokens(self, rid: int) -> list[int]:
        return self.tracked(rid).generated


def _steps(driver: Driver, events: Events, max_steps: int):
    """Yields the steps to send, running `events` first; ends when nothing is left to do."""
    for i in range(max_steps):
        if i in events:
            events[i](driver)
        step = driver.next_step()
        if step is not None:
            yield step
        elif not any(k > i for k in events):
            return
    raise AssertionError("requests never finished")


def _checked(step: shard_pb2.StepRequest, generations) -> list:
    """The generations, after checking there is one per sampled work, in work order."""
    generations = list(generations)
    wanted = [w.id for w in step.work if w.sample]
    got = [g.request_id for g in generations]
    if got != wanted:
        raise AssertionError(f"generations for {got}, the step sampled {wanted}")
    return generations


def run_sync(step_fn, driver: Driver, events: Events = {}, max_steps: int = 10_000) -> Driver:
    """Runs steps through `step_fn(StepRequest) -> generations` until every request finished."""
    for step in _steps(driver, events, max_steps):
        driver.absorb(_checked(step, step_fn(step)))
    return driver


async def run_async(group, driver: Driver, events: Events = {}, max_steps: int = 10_000) -> Driver:
    """The same against a ShardGroup (every rank, over gRPC)."""
    for step in _steps(driver, events, max_steps):
        driver.absorb(_checked(step, (await group.step(step)).generations))
    return driver
