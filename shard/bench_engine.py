"""The in-process ceiling for `shardline bench --engine`: the shard engine with no gRPC or router.

`LocalRouter` does the least a router must for one engine: KV blocks from a free list, allocated
as tokens are generated, and one `Engine.step` per call that frees finished sequences, starts new
ones (whole prompts) and decodes every running one. `run_engine` keeps up to `concurrency`
requests running, as the served benchmark does: a finished request's slot is refilled in the next
step, next to the running decodes. `benchmarks/profile_decode.py` uses `LocalRouter` too.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

from shardline.common.bench_stats import Result, Spec, summarize
from shardline.proto import shard_pb2
from shardline.shard.config import ShardConfig
from shardline.shard.engine import Engine
from shardline.shard.models.registry import load_config
from shardline.shard.parallel import init_parallel


def vocab_size(model: Path) -> int:
    return load_config(model).vocab_size


class LocalRouter:
    """Sequences on one in-process engine: their block tables and how many tokens each has run."""

    def __init__(self, engine: Engine):
        self.engine, self.block_size = engine, engine.block_size
        self.free = list(range(engine.pool.num_blocks))
        self.blocks: dict[int, list[int]] = {}
        self.length: dict[int, int] = {}  # tokens run so far (their KV is in the pool)
        self.to_free: list[int] = []

    def _grow(self, rid: int, end: int) -> list[int]:
        """The new blocks `rid` needs to hold `end` tokens, taken from the free list."""
        need = -(-end // self.block_size) - len(self.blocks[rid])
        if need > len(self.free):
            raise RuntimeError(f"KV pool exhausted: sequence {rid} needs {need} more blocks, "
                               f"{len(self.free)} of {self.engine.pool.num_blocks} are free")
        new, self.free = self.free[:need], self.free[need:]
        self.blocks[rid] += new
        return new

    def finish(self, rid: int) -> None:
        """The sequence leaves: its blocks are free at once, the engine forgets it next step."""
        self.free += self.blocks.pop(rid)
        del self.length[rid]
        self.to_free.append(rid)

    def step(self, new: dict[int, list[int]] | None = None) -> list[shard_pb2.Generation]:
        """One step: decode every running sequence, start `new` ({id: prompt}); every work samples."""
        step = shard_pb2.StepRequest(free=self.to_free)
        self.to_free = []
        for rid, n in self.length.items():
            step.work.append(shard_pb2.Work(id=rid, new_blocks=self._grow(rid, n + 1), sample=True))
            self.length[rid] = n + 1
        for rid, prompt in (new or {}).items():
            self.blocks[rid], self.length[rid] = [], len(prompt)
            step.start.append(shard_pb2.NewSequence(id=rid, prompt_len=len(prompt)))
            step.work.append(shard_pb2.Work(id=rid, token_ids=prompt, new_blocks=self._grow(rid, len(prompt)),
                                            sample=True))
        return self.engine.step(step)


def warmed_engine(model: Path, max_prompt: int, max_total: int, concurrency: int, device: str = "cpu",
                  dtype: str = "float32", **options: str) -> Engine:
    """An engine warmed up for `concurrency` sequences of at most `max_total` tokens each; `options`
    are further ShardConfig fields (attention_backend, compile)."""
    cfg = ShardConfig(model_dir=model, device=device, dtype=dtype, **options)
    engine = Engine(cfg, init_parallel(cfg.group, device))
    per_sequence = -(-max_total // engine.block_size) * engine.block_size
    engine.warmup(concurrency * max(1, max_prompt), concurrency, concurrency * per_sequence)
    return engine


def run_engine(model: Path, specs: list[Spec], concurrency: int, device: str = "cpu",
               dtype: str = "float32") -> dict[str, object]:
    engine = warmed_engine(model, max(len(s.prompt) for s in specs),
                           max(len(s.prompt) + s.max_new_tokens for s in specs), concurrency, device, dtype)
    router = LocalRouter(engine)
    results = [Result(len(s.prompt)) for s in specs]
    pending = deque(range(len(specs)))
    admitted = [0.0] * len(specs)  # each request is timed from when it got a slot, as in served mode
    start = time.perf_counter()
    while pending or router.length:
        new = {}
        while pending and len(router.length) + len(new) < concurrency:
            i = pending.popleft()
            new[i], admitted[i] = list(specs[i].prompt), time.perf_counter()
        gens = router.step(new)
        now = time.perf_counter()
        for g in gens:
            times = results[g.request_id].token_times
            times.append(now - admitted[g.request_id])
            if len(times) >= specs[g.request_id].max_new_tokens:
                router.finish(g.request_id)
    elapsed = time.perf_counter() - start
    router.step()  # the engine forgets the last finished sequences
    return summarize(results, elapsed)
