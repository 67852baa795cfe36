"""Profiles the engine's decode step (torch.profiler), the source of BENCHMARKS.md's breakdowns.

    python benchmarks/profile_decode.py --model bench-results/llama-25m --batch 1
    python benchmarks/profile_decode.py --model bench-results/llama-25m --batch 32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from shardline.proto import shard_pb2
from shardline.shard.config import ShardConfig
from shardline.shard.engine import Engine
from shardline.shard.parallel import init_parallel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=38)
    args = ap.parse_args()
    cfg = ShardConfig(model_dir=args.model)
    engine = Engine(cfg, init_parallel(cfg.group, "cpu"))
    stopping = shard_pb2.StoppingCriteria(max_new_tokens=300, ignore_eos=True)
    engine.prefill(shard_pb2.Batch(id=1, requests=[
        shard_pb2.Request(id=i, prompt_token_ids=list(range(2, 2 + args.prompt_len)), stopping=stopping)
        for i in range(args.batch)]))
    for _ in range(10):
        engine.decode([1])
    start = time.perf_counter()
    for _ in range(30):
        engine.decode([1])
    print(f"decode step at batch {args.batch}: {(time.perf_counter() - start) / 30 * 1000:.2f} ms")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            engine.decode([1])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
