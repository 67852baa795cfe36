"""Engine v3's step, in process: decode step time per attention backend and compile mode, interleaved.

    python benchmarks/engine_v3.py --out bench-results [--rounds 3]

For each model (the 25M mixed-workload Llama of compare.py and a cheap one: hidden 128, 4 layers,
head_dim 64) and batch size, `batch` sequences of 38 prompt tokens are prefilled, then decoded
through `Engine.step` (blocks from shard/bench_engine.py's LocalRouter). Each configuration
(reference eager, flex, reference + compiled stack) is built once (its Warmup time, which holds the
compilation, is reported), then the configurations take turns, `--rounds` times 20 decode steps
each; the median step time is reported. Writes OUT/engine_v3.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from compare import SHAPE, build_checkpoint
from shardline.shard.bench_engine import LocalRouter, warmed_engine

CONFIGS = {"reference": dict(attention_backend="reference", compile="off"),
           "flex": dict(attention_backend="flex", compile="off"),
           "reference+compile": dict(attention_backend="reference", compile="on")}
CHEAP = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=1024)
PROMPT, STEPS = 38, 20


def decoding(model: Path, batch: int, options: dict) -> tuple[LocalRouter, float]:
    start = time.perf_counter()
    engine = warmed_engine(model, PROMPT, PROMPT + 200, batch, **options)
    router = LocalRouter(engine)
    router.step({i: list(range(2, 2 + PROMPT)) for i in range(batch)})
    for _ in range(3):
        router.step()
    return router, time.perf_counter() - start


def timed_steps(router: LocalRouter) -> float:
    start = time.perf_counter()
    for _ in range(STEPS):
        router.step()
    return (time.perf_counter() - start) / STEPS * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    models = {"cheap": (build_checkpoint(args.out / "llama-cheap-4l", **CHEAP), (1, 64)),
              "llama-25m": (build_checkpoint(args.out / "llama-25m", **SHAPE), (1, 32))}
    report = {}
    for name, (model, batches) in models.items():
        for batch in batches:
            routers, warmup = {}, {}
            for config, options in CONFIGS.items():
                routers[config], warmup[config] = decoding(model, batch, options)
            times = {c: [] for c in CONFIGS}
            for _ in range(args.rounds):
                for config, router in routers.items():
                    times[config].append(timed_steps(router))
            row = {c: {"step_ms": statistics.median(t), "runs_ms": t, "build_s": warmup[c]} for c, t in times.items()}
            report[f"{name} batch {batch}"] = row
            print(f"{name} batch {batch}: " + ", ".join(f"{c} {r['step_ms']:.2f} ms (build {r['build_s']:.0f} s)"
                                                       for c, r in row.items()), flush=True)
    (args.out / "engine_v3.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
