"""First contact with a GPU, in one run and with nothing downloaded (run by benchmarks/gpu_check.sh).

On the device it builds random checkpoints with transformers, then measures shardline's engine
in-process (shard/bench_engine.py's LocalRouter: no gRPC, no router):

1. parity: greedy tokens against transformers' `generate` on the same GPU, exact for a small
   float32 model, and the agreement of greedy tokens for the big bf16 model;
2. batch-1 decode step time against the HBM floor (the bytes of the weights / the bandwidth of a
   device-to-device copy measured here);
3. throughput at --concurrency requests against transformers' static batched `generate`;
4. CUDA graphs on/off: reported as not available until the engine has them (issue 16, item 5).

`--tiny --device cpu` runs every step on a toy model on the CPU, so that the script is tested
where no GPU is. Results go to `--out` as results.json and results.md (the lines for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shardline.shard.bench_engine import LocalRouter, run_engine, warmed_engine
from shardline.common.bench_stats import Spec

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "8b": (4096, 32, 32, 8, 14336, 128256),
    "1b": (2048, 16, 32, 8, 8192, 128256),
    "small": (512, 4, 8, 4, 1536, 4096),
    "tiny": (64, 2, 4, 2, 128, 512),
}


def build(out: Path, shape: str, dtype: torch.dtype, device: str, std: float = 0.2) -> LlamaForCausalLM:
    """A seeded random Llama of `shape`, saved to `out` (safetensors), and kept as the reference."""
    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False, dtype=str(dtype).split(".")[1])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # wide logit gaps, so that greedy agreement means something
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, std / hidden ** 0.5 * 8)
    model.eval()
    model.save_pretrained(out)
    return model


def prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab, (count, length), generator=g).tolist()


def engine_greedy(engine, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
    router, out = LocalRouter(engine), {i: [] for i in range(len(batch))}
    gens = router.step(dict(enumerate(batch)))
    while True:
        for g in gens:
            out[g.request_id].append(g.token_id)
        for rid in [r for r in router.length if len(out[r]) >= new_tokens]:
            router.finish(rid)
        if not router.length:
            router.step()
            return [out[i] for i in range(len(batch))]
        gens = router.step()


def reference_greedy(model, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
    ids = torch.tensor(batch, device=model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions equal up to each sequence's first difference (then greedy diverges)."""
    same = 0
    for x, y in zip(a, b):
        same += next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x))
    return same / sum(len(x) for x in a)


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), the HBM ceiling in practice."""
    if not device.startswith("cuda"):
        return float("nan")
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_step_s(engine, vocab: int, steps: int, device: str) -> float:
    router = LocalRouter(engine)
    router.step({0: prompts(1, 16, vocab)[0]})
    for _ in range(5):
        router.step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        router.step()
    sync(device)
    return (time.perf_counter() - start) / steps


def static_generate_tps(model, batch: list[list[int]], new_tokens: int, device: str) -> float:
    reference_greedy(model, batch[:2], 2)  # warm
    sync(device)
    start = time.perf_counter()
    out = reference_greedy(model, batch, new_tokens)
    sync(device)
    return sum(len(o) for o in out) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--big", choices=("8b", "1b"), default="8b", help="shape of the bf16 model")
    p.add_argument("--tiny", action="store_true", help="toy shapes everywhere (a CPU test of the script)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"))
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args(argv)
    dev, results = args.device, {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                                 "torch": torch.__version__}
    small_shape, big_shape = ("tiny", "tiny") if args.tiny else ("small", args.big)
    big_dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    n, new = (2, 8) if args.tiny else (8, 64)

    small = build(args.work / "small", small_shape, torch.float32, dev)
    batch = prompts(n, 32, SHAPES[small_shape][5])
    engine = warmed_engine(args.work / "small", 32, 32 + new, n, dev, "float32")
    results["float32_small_exact"] = engine_greedy(engine, batch, new) == reference_greedy(small, batch, new)
    del engine, small

    t0 = time.perf_counter()
    big = build(args.work / "big", big_shape, big_dtype, dev)
    results["build_s"] = round(time.perf_counter() - t0, 1)
    vocab, c = SHAPES[big_shape][5], args.concurrency
    engine = warmed_engine(args.work / "big", args.input_len, args.input_len + args.output_len, c, dev,
                           str(big_dtype).split(".")[1])
    # Greedy tokens of the engine vs transformers, both in big_dtype: bfloat16 on a GPU (measured, it
    # may be below 1 at near-ties), float32 with --tiny on a CPU (parity: must be exactly 1).
    results["greedy_agreement_dtype"] = str(big_dtype).split(".")[1]
    results["greedy_agreement"] = round(agreement(engine_greedy(engine, batch, new),
                                                       reference_greedy(big, batch, new)), 4)
    results["weight_bytes"] = engine.parameter_bytes
    results["copy_bandwidth_GBps"] = round(copy_bandwidth(dev) / 1e9, 1)
    step = decode_step_s(engine, vocab, 8 if args.tiny else 64, dev)
    results["batch1_decode_ms"] = round(step * 1e3, 3)
    results["hbm_floor_ms"] = round(engine.parameter_bytes / (results["copy_bandwidth_GBps"] * 1e9) * 1e3, 3)
    del engine
    specs = [Spec(p, args.output_len) for p in prompts(c, args.input_len, vocab)]
    served = run_engine(args.work / "big", specs, c, dev, str(big_dtype).split(".")[1])
    results["engine_tokens_per_s"] = round(served["output_throughput"], 1)
    results["transformers_static_tokens_per_s"] = round(
        static_generate_tps(big, [list(s.prompt) for s in specs], args.output_len, dev), 1)
    results["cuda_graphs"] = "not available: the engine has no CUDA graphs yet (issue 16, item 5)"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / "results.md").write_text("\n".join(f"| {k} | {v} |" for k, v in results.items()) + "\n")
    print(json.dumps(results, indent=2, default=str))
    return 0 if results["float32_small_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
