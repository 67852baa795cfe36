"""Side-by-side throughput on this machine, all in one run (the numbers in BENCHMARKS.md).

    python benchmarks/compare.py --out bench-results

Builds a random Llama-shaped checkpoint of about 25M parameters (the demo tokenizer), then runs
the same mixed workload (32 requests, prompts of 16-64 tokens, 16-128 new tokens, greedy, EOS
ignored) through: shardline served (tp=1, all requests in flight), the shardline engine
in-process at the same concurrency, transformers `generate` on a static left-padded batch, and
transformers continuous batching (`init_continuous_batching` with per-request max_new_tokens).
Throughput counts useful tokens only: each request's own new tokens. Then batch-1 decode step
time against this machine's memory-bandwidth floor (parameter bytes / measured read bandwidth).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from shardline.client.bench import run_served
from shardline.common.bench_stats import workload
from shardline.demo import model_dir as demo_dir
from shardline.shard.bench_engine import run_engine

SHAPE = dict(hidden_size=640, intermediate_size=1728, num_hidden_layers=5, num_attention_heads=10,
             num_key_value_heads=5, max_position_embeddings=512)


def build_checkpoint(out: Path, **shape: int) -> Path:
    """A seeded random Llama of `shape` (default SHAPE) with the demo tokenizer, saved once to `out`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    vocab = json.loads((demo_dir() / "config.json").read_text())["vocab_size"]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, bos_token_id=0, eos_token_id=1, **(shape or SHAPE)))
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_dir() / name, out / name)
    return out


def hf_static(model, specs) -> float:
    """One left-padded batch; every row runs to the longest output. Returns seconds."""
    longest = max(len(s.prompt) for s in specs)
    ids = torch.tensor([[0] * (longest - len(s.prompt)) + s.prompt for s in specs])
    mask = torch.tensor([[0] * (longest - len(s.prompt)) + [1] * len(s.prompt) for s in specs])
    start = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(s.max_new_tokens for s in specs),
                   do_sample=False, eos_token_id=None, pad_token_id=0)
    return time.perf_counter() - start


def hf_continuous(model, specs) -> float:
    """transformers' own continuous batching with each request's max_new_tokens. Returns seconds."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, max_new_tokens=max(s.max_new_tokens for s in specs),
                           eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=cfg)
    manager.start()
    start = time.perf_counter()
    ids = [manager.add_request(s.prompt, max_new_tokens=s.max_new_tokens, eos_token_id=-1) for s in specs]
    got = {}
    while len(got) < len(ids):
        out = manager.get_result(timeout=60)
        if out is not None and out.is_finished():
            got[out.request_id] = len(out.generated_tokens)
    elapsed = time.perf_counter() - start
    manager.stop(block=True)
    short = [i for i, s in zip(ids, specs) if got.get(i, 0) < s.max_new_tokens]
    if short:
        raise RuntimeError(f"{len(short)} requests stopped early")
    return elapsed


def served(model: Path, specs, concurrency: int) -> dict:
    proc = subprocess.Popen([sys.executable, "-m", "shardline.client.cli", "launch", "--model", str(model),
                             "--host", "127.0.0.1", "--port", "8597", "--metrics-port", "0", "--http-port", "0",
                             "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "ready on" in line:
                break
        asyncio.run(run_served("127.0.0.1:8597", specs[:2], 2, float("inf"), show_progress=False))  # warm
        return asyncio.run(run_served("127.0.0.1:8597", specs, concurrency, float("inf"), show_progress=False))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def read_bandwidth() -> float:
    """Bytes/s this machine reads from memory (best of several sums over 1 GiB)."""
    a = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - start))
    return best


def decode_step_ms(model: Path) -> tuple[float, int]:
    """Median batch-1 decode step of the engine, and the parameter bytes it reads per step."""
    from shardline.shard.bench_engine import LocalRouter, warmed_engine

    engine = warmed_engine(model, 16, 400, 1)
    router = LocalRouter(engine)
    router.step({1: list(range(2, 18))})
    times = []
    for _ in range(150):
        start = time.perf_counter()
        router.step()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1000, engine.parameter_bytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_checkpoint(args.out / "llama-25m")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    params = sum(p.numel() for p in hf.parameters())
    specs = workload(32, (16, 64), (16, 128), hf.config.vocab_size, seed=0)
    useful = sum(s.max_new_tokens for s in specs)
    rows = {}
    rows["transformers generate (static padded batch)"] = useful / hf_static(hf, specs)
    try:
        rows["transformers continuous batching (generate_batch manager)"] = useful / hf_continuous(hf, specs)
    except Exception as exc:  # recorded, not hidden: the baseline may not run on this machine
        rows["transformers continuous batching (generate_batch manager)"] = f"failed: {exc!r}"[:200]
    del hf
    engine = run_engine(model, specs, 32)
    rows["shardline engine in-process (concurrency 32)"] = engine["output_throughput"]
    serve = served(model, specs, 32)
    rows["shardline served, tp=1, 32 in flight"] = serve["output_throughput"]
    sequential = served(model, specs, 1)
    rows["shardline served, one request at a time"] = sequential["output_throughput"]
    step_ms, weight_bytes = decode_step_ms(model)
    bandwidth = read_bandwidth()
    floor_ms = weight_bytes / bandwidth * 1000
    report = {"parameters": params, "useful_tokens": useful, "tokens_per_s": rows,
              "served": serve, "engine": engine, "served_sequential": sequential,
              "decode_step_ms": step_ms, "bandwidth_gb_s": bandwidth / 1e9, "floor_ms": floor_ms,
              "machine": {"cores": torch.get_num_threads(), "torch": torch.__version__}}
    (args.out / "compare.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"model: Llama-shaped, {params / 1e6:.1f}M parameters, float32; {useful} useful tokens")
    print("| run | useful tokens/s |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value:.1f} |" if isinstance(value, float) else f"| {name} | {value} |")
    print(f"\nbatch-1 decode step: {step_ms:.2f} ms; floor {floor_ms:.2f} ms "
          f"({weight_bytes / 1e6:.1f} MB of weights at {bandwidth / 1e9:.1f} GB/s) -> {floor_ms / step_ms:.0%} of the floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
