"""Drives real shard groups (separate processes, gloo on CPU) through their gRPC API, for tests.

`running_group(...)` spawns one group (`ShardProcesses`) and always stops it; `connect(...)` opens
a `ShardGroup` client on it (one aio channel per rank) and always closes it. `shard_group(...)`
does both at once for a one-off test. Spawning is the expensive part (a few seconds per process),
so module fixtures keep one `RunningGroup` alive and each test connects to it in its own event
loop (`asyncio.run`), since grpc aio channels are bound to the loop that made them.

`warmup` sizes a group's KV pool (nothing can be stepped before it: the pool has no blocks), and
`greedy` / `drive` are the clients: `tests/step_driver.Driver` plays the router (blocks, starts,
frees, chunks) and `ShardGroup.step` runs each step on every rank over gRPC.
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

from step_driver import Driver, Events, run_async
from shardline.router.group.processes import GroupSpec, ShardProcesses
from shardline.router.group.shards import ShardGroup

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
               kv_cache_tokens: int = 0, kv_block_size: int = 16, dtype: str = "float32") -> GroupSpec:
    """A CPU group spec for tests: one torch thread per rank, collectives give up after a minute."""
    return GroupSpec(model=Path(model), tp=tp, pp=pp, pp_partition=pp_partition, dtype=dtype,
                     kv_cache_tokens=kv_cache_tokens, kv_block_size=kv_block_size, socket_dir=Path(socket_dir),
                     collective_timeout=60.0, threads=1, env={"OMP_NUM_THREADS": "1"})


@contextlib.contextmanager
def running_group(model: Path, socket_dir: Path, *, timeout: float = START_TIMEOUT,
                  **spec: Any) -> Iterator[RunningGroup]:
    """Starts a shard group and waits until it serves (synchronously); always stops its processes.

    `spec` takes group_spec's keywords (tp, pp, pp_partition, kv_cache_tokens, kv_block_size, dtype).
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



# -- the v2 client: warm up, then drive steps ------------------------------------------------------

WARMUP_STEP_TOKENS, WARMUP_BATCH = 64, 8


async def warmup(group: ShardGroup, max_kv_tokens: int = 0) -> tuple[int, int]:
    """Warms every rank up (small worst-case steps); (KV blocks, block size) as the group reports them."""
    return await group.warmup(WARMUP_STEP_TOKENS, WARMUP_BATCH, max_kv_tokens)


async def drive(group: ShardGroup, driver: Driver, events: Events = {}) -> Driver:
    """Runs `driver` (requests already added, or added by `events`) on the group to the end."""
    return await run_async(group, driver, events)


async def greedy(group: ShardGroup, driver: Driver, prompts: Sequence[Sequence[int]],
                 max_new_tokens: int) -> list[list[int]]:
    """Greedy token ids per prompt, EOS ignored, all prompts started in the same step."""
    ids = [fresh_id() for _ in prompts]
    for rid, prompt in zip(ids, prompts):
        driver.add(rid, list(prompt), max_new_tokens)
    await drive(group, driver)
    return [driver.tokens(rid) for rid in ids]
