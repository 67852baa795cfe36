"""Drives real shard groups (separate processes, gloo on CPU) through their gRPC API, for tests.

`running_group(...)` spawns one group (`ShardProcesses`) and always stops it; `connect(...)` opens
a `ShardGroup` client on it (one aio channel per rank) and always closes it. `shard_group(...)`
does both at once for a one-off test. Spawning is the expensive part (a few seconds per process),
so module fixtures keep one `RunningGroup` alive and each test connects to it in its own event
loop (`asyncio.run`), since grpc aio channels are bound to the loop that made them.

`greedy`, `generate` and `joined_run` are the clients: they build shard_pb2 batches, run
Prefill then Decode until every request has finished, and return each request's token ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import grpc

from shardline.proto import shard_pb2
from shardline.router.processes import GroupSpec, ShardProcesses
from shardline.router.shards import ShardGroup

START_TIMEOUT = 120.0  # seconds for every rank to load and turn SERVING (a busy 2-core machine)
_ids = itertools.count(1)


def fresh_id() -> int:
    """A batch/request id never used before in this test process."""
    return next(_ids)


@dataclass
class RunningGroup:
    """A started group of shard processes."""

    spec: GroupSpec
    processes: ShardProcesses

    @classmethod
    def of(cls, spec: GroupSpec) -> "RunningGroup":
        """Not started yet: call processes.start()."""
        return cls(spec, ShardProcesses(spec, generation=0))

    @property
    def addresses(self) -> list[str]:
        return self.processes.addresses

    def exited(self) -> list[tuple[int, int]]:
        return self.processes.exited()

    @contextlib.asynccontextmanager
    async def connect(self, step_timeout: float = 60.0) -> AsyncIterator[ShardGroup]:
        """A client on this group for the current event loop; closed on exit."""
        group = ShardGroup(self.addresses, step_timeout=step_timeout)
        try:
            yield group
        finally:
            await group.close()


async def _wait_serving(running: RunningGroup, timeout: float) -> None:
    """Waits until every rank is SERVING; fails at once (with the exit codes) if a rank died."""
    deadline = time.monotonic() + timeout
    async with running.connect() as group:
        while not await group.serving(timeout=1.0):
            if running.exited():
                raise RuntimeError(f"shard ranks exited before serving: {running.exited()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"shards at {running.addresses} not serving after {timeout:.0f}s")
            await asyncio.sleep(0.1)


def group_spec(model: Path, socket_dir: Path, *, tp: int = 1, pp: int = 1, pp_partition: str = "",
               kv_cache_tokens: int = 0, dtype: str = "float32") -> GroupSpec:
    """A CPU group spec for tests: one torch thread per rank, collectives give up after a minute."""
    return GroupSpec(model=Path(model), tp=tp, pp=pp, pp_partition=pp_partition, dtype=dtype,
                     kv_cache_tokens=kv_cache_tokens, socket_dir=Path(socket_dir),
                     collective_timeout=60.0, threads=1, env={"OMP_NUM_THREADS": "1"})


@contextlib.contextmanager
def running_group(model: Path, socket_dir: Path, *, timeout: float = START_TIMEOUT,
                  **spec: Any) -> Iterator[RunningGroup]:
    """Starts a shard group and waits until it serves (synchronously); always stops its processes.

    `spec` takes group_spec's keywords (tp, pp, pp_partition, kv_cache_tokens, dtype).
    """
    running = RunningGroup.of(group_spec(model, socket_dir, **spec))
    try:
        running.processes.start()
        asyncio.run(_wait_serving(running, timeout))
        yield running
    finally:
        running.processes.stop(grace=5.0)


@contextlib.asynccontextmanager
async def shard_group(model: Path, socket_dir: Path, *, timeout: float = START_TIMEOUT,
                      **spec: Any) -> AsyncIterator[ShardGroup]:
    """Async one-off: start a group, yield a connected ShardGroup; always close it and stop the group."""
    running = RunningGroup.of(group_spec(model, socket_dir, **spec))
    try:
        running.processes.start()
        await _wait_serving(running, timeout)
        async with running.connect() as group:
            yield group
    finally:
        await asyncio.get_running_loop().run_in_executor(None, running.processes.stop)


async def call_all(group: ShardGroup, method: str, message) -> list:
    """Sends one call to every rank itself; each rank's reply, or its grpc.aio.AioRpcError."""
    async def one(stub):
        try:
            return await getattr(stub, method)(message, timeout=group.step_timeout)
        except grpc.aio.AioRpcError as exc:
            return exc
    return list(await asyncio.gather(*(one(s) for s in group.stubs)))


# -- requests ------------------------------------------------------------------------------------

def request(prompt: Sequence[int], max_new_tokens: int, *, request_id: int | None = None,
            temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
            repetition_penalty: float = 1.0, seed: int = 0, ignore_eos: bool = True) -> shard_pb2.Request:
    """One shard_pb2.Request with a fresh id unless one is given."""
    return shard_pb2.Request(
        id=fresh_id() if request_id is None else request_id, prompt_token_ids=list(prompt),
        sampling=shard_pb2.SamplingParameters(temperature=temperature, top_k=top_k, top_p=top_p,
                                              repetition_penalty=repetition_penalty, seed=seed),
        stopping=shard_pb2.StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos))


@dataclass
class Collected:
    """Tokens (and logprobs) per request id, plus which requests have finished."""

    tokens: dict[int, list[int]]
    logprobs: dict[int, list[float]]
    finished: set[int]

    @classmethod
    def empty(cls) -> "Collected":
        return cls({}, {}, set())

    def add(self, generations) -> None:
        for g in generations:
            assert g.request_id not in self.finished, f"request {g.request_id} got a token after finishing"
            self.tokens.setdefault(g.request_id, []).append(g.token_id)
            self.logprobs.setdefault(g.request_id, []).append(g.logprob)
            if g.finish_reason != shard_pb2.FINISH_REASON_UNSPECIFIED:
                self.finished.add(g.request_id)

    def running(self, requests: Sequence[shard_pb2.Request]) -> list[int]:
        return [r.id for r in requests if r.id not in self.finished]


async def run_batches(group: ShardGroup, requests: Sequence[shard_pb2.Request],
                      collected: Collected | None = None) -> Collected:
    """Prefills `requests` as one batch, then decodes it until every request has finished."""
    collected = collected or Collected.empty()
    batch_id = fresh_id()
    collected.add((await group.prefill(shard_pb2.Batch(id=batch_id, requests=list(requests)))).generations)
    steps = 0
    while collected.running(requests):
        collected.add((await group.decode([batch_id])).generations)
        steps += 1
        assert steps <= max(r.stopping.max_new_tokens for r in requests), "a request never finished"
    return collected


async def generate(group: ShardGroup, requests: Sequence[shard_pb2.Request]) -> list[list[int]]:
    """Token ids of each request (in order), all run together in one batch."""
    collected = await run_batches(group, requests)
    return [collected.tokens[r.id] for r in requests]


async def greedy(group: ShardGroup, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy token ids per prompt, EOS ignored, all prompts in one batch."""
    return await generate(group, [request(p, max_new_tokens) for p in prompts])


async def joined_run(group: ShardGroup, first: Sequence[shard_pb2.Request],
                     second: Sequence[shard_pb2.Request], *, join_after: int,
                     drop: Sequence[int] = (), drop_after: int = 0) -> Collected:
    """Continuous batching as the router does it.

    Prefill batch A (`first`), decode it alone `join_after` steps, prefill batch B (`second`),
    then decode the live batches merged (Decode([A, B]) merges into A). After `drop_after` merged
    steps, FilterBatch removes the request ids in `drop` from whichever batch holds them (their
    tokens so far stay in the result). A batch whose requests have all finished is gone from the
    shard (it filters finished requests itself), so it is no longer named. Ends when every request
    not dropped has finished.
    """
    collected = Collected.empty()
    everyone = list(first) + list(second)
    a, b = fresh_id(), fresh_id()
    members = {a: [r.id for r in first], b: [r.id for r in second]}
    collected.add((await group.prefill(shard_pb2.Batch(id=a, requests=list(first)))).generations)
    for _ in range(join_after):
        collected.add((await group.decode([a])).generations)
    collected.add((await group.prefill(shard_pb2.Batch(id=b, requests=list(second)))).generations)
    limit = max(r.stopping.max_new_tokens for r in everyone)
    for step in itertools.count():
        if drop and step == drop_after:
            for batch_id, ids in members.items():
                live = [i for i in ids if i not in collected.finished]
                if live and set(live) & set(drop):
                    kept = [i for i in live if i not in set(drop)]
                    assert await group.filter(batch_id, kept) == len(kept)
            collected.finished.update(drop)
        live_batches = [bid for bid, ids in members.items()
                        if any(i not in collected.finished for i in ids)]
        if not live_batches:
            return collected
        reply = await group.decode(live_batches)
        assert reply.batch_id == live_batches[0]
        members = {live_batches[0]: [i for bid in live_batches for i in members[bid]]}
        collected.add(reply.generations)
        assert step < limit, "a request never finished"
    raise AssertionError("unreachable")
