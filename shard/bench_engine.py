"""The in-process ceiling for `shardline bench --engine`: the shard engine with no gRPC or router.

A minimal continuous-batching loop at the same concurrency as the served benchmark: up to
`concurrency` requests run; freed slots are refilled by one prefill, and the next decode joins
the batches, as the router does.
"""

from __future__ import annotations

import time
from pathlib import Path

from shardline.client.bench_stats import Result, Spec, summarize
from shardline.proto import shard_pb2
from shardline.shard.config import ShardConfig
from shardline.shard.engine import Engine
from shardline.shard.models.registry import load_config
from shardline.shard.parallel import init_parallel


def vocab_size(model: Path) -> int:
    return load_config(model).vocab_size


def run_engine(model: Path, specs: list[Spec], concurrency: int, device: str = "cpu",
               dtype: str = "float32") -> dict[str, object]:
    cfg = ShardConfig(model_dir=model, device=device, dtype=dtype)
    engine = Engine(cfg, init_parallel(cfg.group, device))
    engine.warmup(64, 0)
    results = [Result(len(s.prompt)) for s in specs]
    pending, live, batch_ids = list(range(len(specs))), set(), []
    admitted = [0.0] * len(specs)  # each request is timed from when it got a slot, as in served mode
    start = time.perf_counter()
    while pending or live:
        free = concurrency - len(live)
        if pending and free > 0:
            new, pending = pending[:free], pending[free:]
            requests = [shard_pb2.Request(id=i, prompt_token_ids=specs[i].prompt,
                                          stopping=shard_pb2.StoppingCriteria(
                                              max_new_tokens=specs[i].max_new_tokens, ignore_eos=True))
                        for i in new]
            batch_id = 1_000_000 + new[0]
            for i in new:
                admitted[i] = time.perf_counter()
            live.update(new)
            _record(engine.prefill(shard_pb2.Batch(id=batch_id, requests=requests)), results, live, admitted)
            if batch_id in engine.batches:
                batch_ids.append(batch_id)
        batch_ids = [b for b in batch_ids if b in engine.batches]
        if batch_ids:
            gens, merged = engine.decode(batch_ids)
            batch_ids = [merged]
            _record(gens, results, live, admitted)
    return summarize(results, time.perf_counter() - start)


def _record(gens, results: list[Result], live: set[int], admitted: list[float]) -> None:
    now = time.perf_counter()
    for g in gens:
        results[g.request_id].token_times.append(now - admitted[g.request_id])
        if g.finish_reason != shard_pb2.FINISH_REASON_UNSPECIFIED:
            live.discard(g.request_id)
