"""Profiles the engine's decode step (torch.profiler), the source of BENCHMARKS.md's breakdowns.

    python benchmarks/profile_decode.py --model bench-results/llama-25m --batch 1
    python benchmarks/profile_decode.py --model bench-results/llama-25m --batch 32

`--batch` sequences of `--prompt-len` tokens are prefilled in one step, then decoded together
through `Engine.step` (blocks from shard/bench_engine.py's `LocalRouter`): 10 warm-up steps, 30
timed, 10 profiled.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from shardline.shard.bench_engine import LocalRouter, warmed_engine

WARM, TIMED, PROFILED = 10, 30, 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=38)
    args = ap.parse_args()
    steps = WARM + TIMED + PROFILED
    engine = warmed_engine(args.model, args.prompt_len, args.prompt_len + steps + 1, args.batch)
    router = LocalRouter(engine)
    router.step({i: list(range(2, 2 + args.prompt_len)) for i in range(args.batch)})
    for _ in range(WARM):
        router.step()
    start = time.perf_counter()
    for _ in range(TIMED):
        router.step()
    print(f"decode step at batch {args.batch}: {(time.perf_counter() - start) / TIMED * 1000:.2f} ms")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(PROFILED):
            router.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
