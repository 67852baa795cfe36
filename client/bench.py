"""`shardline bench`: load against a running router over the public API, or the in-process ceiling.

Served mode sends a random workload at a fixed concurrency or a Poisson request rate, streams
every request and reports throughput and TTFT/TPOT/ITL/E2E. `--engine` runs the same workload
on the shard engine inside this process (world size 1, no gRPC, no router), the ceiling the
router can approach, so router overhead is a measured ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

from shardline.client import connection
from shardline.common.bench_stats import Result, Spec, summarize, table, workload
from shardline.common import flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark a running server (or the in-process engine)",
                       description=__doc__, formatter_class=flags.HelpFormatter)
    p.add_argument("--target", default="localhost:8500", help="router address (served mode)")
    connection.add_arguments(p)
    p.add_argument("--engine", action="store_true", help="time the shard engine in-process instead (needs --model)")
    p.add_argument("--model", type=Path, default=None, help="checkpoint for --engine; default: the bundled demo model")
    p.add_argument("--device", default="cpu", help="device for --engine")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype for --engine; auto = the checkpoint's own on CUDA, float32 on CPU")
    p.add_argument("--num-requests", type=int, default=32, help="requests to send")
    p.add_argument("--input-len", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"),
                   help="prompt length range in tokens (uniform; MIN=MAX for fixed)")
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"),
                   help="new tokens range (uniform; EOS is ignored so every request generates exactly this)")
    p.add_argument("--prefix-len", type=int, default=0,
                   help="tokens of a prefix shared by every prompt (before its own --input-len tokens), "
                        "to measure prefix caching")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at most")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrival rate in requests/s (inf: all at once, bounded by --concurrency)")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--json", type=Path, default=None, help="write the report here as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=run)


async def _one(client, spec: Spec, sem: asyncio.Semaphore, progress) -> Result:
    async with sem:
        result, start = Result(len(spec.prompt)), time.perf_counter()
        try:
            async for chunk in client.generate_stream(prompt_token_ids=spec.prompt, max_new_tokens=spec.max_new_tokens,
                                                  temperature=0, ignore_eos=True):
                result.token_times.append(time.perf_counter() - start)
                if chunk.usage is not None:
                    result.cached_tokens = chunk.usage.cached_prompt_tokens
        except Exception as exc:  # reported as a failure, the run goes on
            result.error = f"{type(exc).__name__}: {exc}"
        progress.update(1)
        return result


async def run_served(target: str, specs: list[Spec], concurrency: int, rate: float, seed: int = 0,
                     show_progress: bool = True, client_options: dict | None = None) -> dict[str, object]:
    from tqdm import tqdm

    from shardline.client import AsyncClient

    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    async with AsyncClient(target, retries=0, **(client_options or {})) as client:
        with tqdm(total=len(specs), disable=not show_progress, file=sys.stderr, desc="requests") as progress:
            start, tasks = time.perf_counter(), []
            for spec in specs:
                tasks.append(asyncio.create_task(_one(client, spec, sem, progress)))
                if rate != float("inf"):
                    await asyncio.sleep(rng.expovariate(rate))
            results = await asyncio.gather(*tasks)
    return summarize(list(results), time.perf_counter() - start)


def run(args: argparse.Namespace) -> int:
    if args.engine:
        from shardline.shard.bench_engine import run_engine, vocab_size
        from shardline.shard.devices import served_dtype
        from shardline.shard.preflight import read_checkpoint

        model = args.model or Path(__import__("shardline.demo", fromlist=["model_dir"]).model_dir())
        specs = workload(args.num_requests, tuple(args.input_len), tuple(args.output_len), vocab_size(model), args.seed,
                         args.prefix_len)
        dtype = served_dtype(args.dtype, args.device, read_checkpoint(model, tokenizer=False))
        report = run_engine(model, specs, args.concurrency, args.device, dtype)
    else:
        from shardline.client import Client, DeadlineExceededError, ShardlineError, UnavailableError

        try:
            with Client(args.target, retries=0, **connection.client_options(args)) as client:
                vocab = client.info(timeout=10).vocab_size
        except ShardlineError as exc:
            reason = " ".join(str(exc).split())
            where = ("no ready server at" if isinstance(exc, (UnavailableError, DeadlineExceededError))
                     else "the router refused the call at")
            print(f"shardline: error: {where} {args.target} (--target): {reason}", file=sys.stderr)
            return 1
        specs = workload(args.num_requests, tuple(args.input_len), tuple(args.output_len), vocab, args.seed,
                         args.prefix_len)
        report = asyncio.run(run_served(args.target, specs, args.concurrency, args.request_rate, args.seed,
                                        not args.no_progress, connection.client_options(args)))
    report["mode"] = "engine" if args.engine else "served"
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["failures"] == 0 else 1
