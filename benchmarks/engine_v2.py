"""Engine v2 measurements, each side by side with its baseline in the same run (BENCHMARKS.md).

    python benchmarks/engine_v2.py --out bench-results [--baseline-python /path/to/old/venv/bin/python]

Sections (each prints a table and lands in engine_v2.json):
- kv:       a 2,048-token KV budget, 16 requests asking for 400 new tokens each: requests that start
            before the first one finishes, the last TTFT, preemptions. Against `--baseline-python`
            (a venv with an older shardline installed) when given.
- streams:  per-token time of 48 concurrent streams vs one stream, on a cheap model (hidden 128).
- prefix:   TTFT of a request whose 1,500-token prefix was served a moment ago, vs cold.
- gap:      the longest inter-token gap of a running stream while a 1,500-token prompt is
            prefilled, as a fraction of that prompt's solo prefill time.
- overhead: `shardline bench`'s default workload served vs the in-process engine (interleaved
            runs, medians), and the router's CPU time per step from its metrics.
- bf16:     in-process engine throughput in bfloat16 vs float32 (interleaved, medians), and the
            agreement of bf16 greedy tokens with transformers run in bf16.
Model: the 25M-parameter Llama shape of benchmarks/compare.py with 2,048 positions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import SHAPE, build_checkpoint  # noqa: E402

from shardline.client import AsyncClient  # noqa: E402
from shardline.client.bench import run_served  # noqa: E402
from shardline.common.bench_stats import workload  # noqa: E402
from shardline.shard.bench_engine import run_engine  # noqa: E402

VOCAB = 3072  # the demo tokenizer's, which build_checkpoint gives every benchmark model
LONG = ("--max-input-tokens", "1600", "--max-total-tokens", "2048")
READY = re.compile(r"ready on (\S+):(\d+)")


@contextlib.contextmanager
def launched(model: Path, *flags: str, python: str = sys.executable, port: int = 8591, metrics: int = 0):
    cmd = [python, "-m", "shardline.client.cli", "launch", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", str(metrics), "--log-level", "warning", *flags]
    if python == sys.executable:
        cmd += ["--http-port", "0"]  # this version also serves HTTP; the baseline has no such flag
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if READY.search(line):
                break
        else:
            raise RuntimeError(f"{' '.join(cmd)} exited before ready")
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def stream(client: AsyncClient, prompt: list[int], n: int) -> list[float]:
    """Arrival times (time.monotonic) of each token of one greedy stream."""
    times = []
    async for _ in client.generate_stream(prompt_token_ids=prompt, max_new_tokens=n, temperature=0,
                                          ignore_eos=True):
        times.append(time.monotonic())
    return times


def kv_section(model: Path, python: str) -> dict:
    async def run(target: str) -> dict:
        specs = workload(16, (16, 64), (400, 400), VOCAB, seed=1)
        async with AsyncClient(target, retries=0) as client:
            start = time.monotonic()
            times = await asyncio.gather(*(stream(client, s.prompt, 400) for s in specs))
        first_finish = min(t[-1] for t in times)
        return {"started_before_first_finish": sum(t[0] < first_finish for t in times),
                "max_ttft_s": max(t[0] for t in times) - start, "duration_s": max(t[-1] for t in times) - start}
    with launched(model, "--kv-cache-tokens", "2048", "--max-total-tokens", "2048", python=python,
                  metrics=9481) as target:
        out = asyncio.run(run(target))
        out["preemptions"] = metric(9481, "shardline_preemptions_total")
    return out


def streams_section(out_dir: Path) -> dict:
    cheap = build_checkpoint(out_dir / "llama-cheap", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    tpot = {1: [], 48: []}
    with launched(cheap) as target:
        for _ in range(3):
            for n in (1, 48):
                specs = workload(n if n > 1 else 8, (32, 32), (128, 128), VOCAB, seed=n)
                report = asyncio.run(run_served(target, specs, n, float("inf"), show_progress=False))
                tpot[n].append(report["tpot_s"]["p50"])
    one, many = statistics.median(tpot[1]), statistics.median(tpot[48])
    return {"tpot_1_ms": one * 1000, "tpot_48_ms": many * 1000, "ratio": many / one, "runs": tpot}


def prefix_section(model: Path) -> dict:
    async def ttft(client, prompt) -> float:
        start = time.monotonic()
        return (await stream(client, prompt, 1))[0] - start

    async def run(target: str) -> dict:
        cold, warm = [], []
        async with AsyncClient(target, retries=0) as client:
            for i in range(3):
                prefix = workload(1, (1500, 1500), (1, 1), VOCAB, seed=100 + i)[0].prompt
                cold.append(await ttft(client, prefix + [11, 12, 13]))
                warm.append(await ttft(client, prefix + [21, 22]))
        return {"cold_ttft_s": statistics.median(cold), "warm_ttft_s": statistics.median(warm),
                "warm_over_cold": statistics.median(warm) / statistics.median(cold), "runs": [cold, warm]}
    with launched(model, *LONG) as target:
        return asyncio.run(run(target))


def gap_section(model: Path) -> dict:
    async def run(target: str) -> dict:
        async with AsyncClient(target, retries=0) as client:
            solo_start = time.monotonic()
            await stream(client, workload(1, (1500, 1500), (1, 1), VOCAB, seed=7)[0].prompt, 1)
            solo = time.monotonic() - solo_start
            runner = asyncio.ensure_future(stream(client, [5, 6, 7, 8], 400))
            await asyncio.sleep(0.5)
            joined_at = time.monotonic()
            await stream(client, workload(1, (1500, 1500), (1, 1), VOCAB, seed=8)[0].prompt, 1)
            done_at = time.monotonic()
            times = await runner
        gaps = [b - a for a, b in zip(times, times[1:]) if b >= joined_at and a <= done_at]
        usual = [b - a for a, b in zip(times, times[1:]) if b < joined_at]
        return {"solo_prefill_s": solo, "joined_prefill_s": done_at - joined_at, "max_gap_s": max(gaps),
                "usual_gap_s": statistics.median(usual), "max_gap_over_prefill": max(gaps) / solo}
    with launched(model, *LONG) as target:
        return asyncio.run(run(target))


def overhead_section(model: Path) -> dict:
    specs = workload(32, (16, 64), (16, 128), VOCAB, seed=0)
    served, engine = [], []
    with launched(model, metrics=9482) as target:
        asyncio.run(run_served(target, specs[:2], 2, float("inf"), show_progress=False))
        for _ in range(3):
            served.append(asyncio.run(run_served(target, specs, 32, float("inf"), show_progress=False))["output_throughput"])
            engine.append(run_engine(model, specs, 32)["output_throughput"])
        cpu = metric(9482, "shardline_router_step_cpu_seconds_sum") / max(1, metric(9482, "shardline_router_step_cpu_seconds_count"))
    return {"served_tok_s": statistics.median(served), "engine_tok_s": statistics.median(engine),
            "served_over_engine": statistics.median(served) / statistics.median(engine),
            "router_cpu_per_step_ms": cpu * 1000, "runs": {"served": served, "engine": engine}}


def bf16_section(model: Path) -> dict:
    specs = workload(32, (16, 64), (16, 128), VOCAB, seed=0)
    rates = {"float32": [], "bfloat16": []}
    for _ in range(3):
        for dtype in rates:
            rates[dtype].append(run_engine(model, specs, 32, dtype=dtype)["output_throughput"])
    return {"float32_tok_s": statistics.median(rates["float32"]), "bfloat16_tok_s": statistics.median(rates["bfloat16"]),
            "speedup": statistics.median(rates["bfloat16"]) / statistics.median(rates["float32"]),
            "agreement": bf16_agreement(model), "runs": rates}


def bf16_agreement(model: Path) -> dict:
    """Greedy tokens of the engine in bf16 against transformers in bf16, 8 prompts x 64 tokens."""
    from transformers import AutoModelForCausalLM

    from shardline.shard.bench_engine import LocalRouter, warmed_engine

    prompts = [s.prompt for s in workload(8, (16, 64), (64, 64), VOCAB, seed=3)]
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    ref = [hf.generate(torch.tensor([p]), max_new_tokens=64, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    engine = warmed_engine(model, 64, 128, 8, dtype="bfloat16")
    router = LocalRouter(engine)
    got = {i: [] for i in range(8)}
    for g in router.step({i: p for i, p in enumerate(prompts)}):
        got[g.request_id].append(g.token_id)
    for _ in range(63):
        for g in router.step():
            got[g.request_id].append(g.token_id)
    same = sum(a == b for i in range(8) for a, b in zip(got[i], ref[i]))
    prefix = [next((k for k, (a, b) in enumerate(zip(got[i], ref[i])) if a != b), 64) for i in range(8)]
    return {"tokens_equal": same / (8 * 64), "mean_identical_prefix": statistics.fmean(prefix)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--baseline-python", default=None, help="python of a venv with the baseline shardline")
    ap.add_argument("--sections", default="kv,streams,prefix,gap,overhead,bf16")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_checkpoint(args.out / "llama-25m-2k", **{**SHAPE, "max_position_embeddings": 2048})
    report = {}
    for name in args.sections.split(","):
        if name == "kv":
            report["kv"] = {"shardline": kv_section(model, sys.executable)}
            if args.baseline_python:
                report["kv"]["baseline"] = kv_section(model, args.baseline_python)
        else:
            report[name] = globals()[f"{name}_section"](args.out if name == "streams" else model)
        print(name, json.dumps(report[name], indent=1, default=str), flush=True)
    (args.out / "engine_v2.json").write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
