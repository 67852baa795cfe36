"""The same workload streamed through the OpenAI API of shardline and of another server (vLLM's CPU
backend), side by side in one run, runs interleaved, medians reported.

    python benchmarks/openai_compare.py --out bench-results \
        --peer "/path/to/vllm-venv/bin/vllm serve {model} --dtype float32 --port {port}"

The peer command is a template ({model}, {port}); it must serve /v1/completions. The workload is
benchmarks/compare.py's: 32 requests, prompts of 16-64 token ids, 16-128 new tokens, greedy, EOS
ignored, all in flight at once; throughput counts each request's own new tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import build_checkpoint  # noqa: E402

from shardline.common.bench_stats import workload  # noqa: E402


def wait_http(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)  # 200 once ready
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"/health not ready on port {port} after {timeout:.0f}s")


async def run_workload(port: int, model_name: str, specs) -> float:
    """Useful tokens per second, all requests streamed at once."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600)

    async def one(spec) -> int:
        got = 0
        stream = await client.completions.create(model=model_name, prompt=spec.prompt, max_tokens=spec.max_new_tokens,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            got += sum(1 for c in chunk.choices if c.text is not None)
        return got
    start = time.perf_counter()
    await asyncio.gather(*(one(s) for s in specs))
    elapsed = time.perf_counter() - start
    await client.close()
    return sum(s.max_new_tokens for s in specs) / elapsed


@contextlib.contextmanager
def server(cmd: list[str], port: int, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """Runs a server command (its own process group) until the block ends; yields once its HTTP
    port answers."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env if env is not None else os.environ, start_new_session=True)
    try:
        wait_http(port, proc)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)


def served(cmd: list[str], port: int, model_name: str, specs, rounds: int, env: dict) -> list[float]:
    with server(cmd, port, env):
        asyncio.run(run_workload(port, model_name, specs[:2]))  # warm
        return [asyncio.run(run_workload(port, model_name, specs)) for _ in range(rounds)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--peer", required=True, help="command template of the other server ({model}, {port})")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each starts both servers)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_checkpoint(args.out / "llama-25m")
    specs = workload(32, (16, 64), (16, 128), 3072, seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    ours = [sys.executable, "-m", "shardline.client.cli", "launch", "--model", str(model), "--host", "127.0.0.1",
            "--port", "0", "--metrics-port", "0", "--http-port", "8761", "--dtype", args.dtype, "--log-level", "warning"]
    peer = shlex.split(args.peer.format(model=model, port=8762))
    rates: dict[str, list[float]] = {"shardline": [], "peer": []}
    for _ in range(args.rounds):
        rates["shardline"] += served(ours, 8761, model.name, specs, 1, env)
        rates["peer"] += served(peer, 8762, str(model), specs, 1, env)
    report = {name: statistics.median(v) for name, v in rates.items()}
    report["runs"] = rates
    report["peer_command"] = args.peer
    (args.out / "openai_compare.json").write_text(json.dumps(report, indent=2))
    print(f"| server | useful tokens/s (median of {args.rounds}) |\n|---|---|")
    print(f"| shardline, OpenAI API | {report['shardline']:.1f} |\n| peer ({args.peer.split()[0]}) | {report['peer']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
