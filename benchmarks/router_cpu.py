"""The router process's CPU per streamed token, over gRPC (the SDK) and over the OpenAI API.

    python benchmarks/router_cpu.py --out bench-results [--streams 64 256] [--rounds 3] \
        [--baseline-python /path/to/other-checkout/.venv/bin/python]

One server (`shardline launch`) serves the cheap model of benchmarks/engine_v3.py (hidden 128,
4 layers: its math is cheap, so the router's share of a step is what a GPU would see). Each round
runs, for every stream count and both APIs in turn, that many concurrent streams of 128 new
tokens each (16-token prompts, greedy, EOS ignored) and reads the router process's user+system
CPU time from /proc before and after; the shards are other processes and are not counted. The
client runs on the same machine, so wall-clock figures are not the point: CPU time is.
Reports the median over rounds of router CPU microseconds per streamed token, and writes
OUT/router_cpu.json. With --baseline-python, a second server is launched by that interpreter
(another checkout's venv: the previous landing) and the two take turns, one server at a time,
every round; the client side is this checkout's in both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import build_checkpoint  # noqa: E402
from engine_v3 import CHEAP  # noqa: E402
from openai_compare import server  # noqa: E402

NEW_TOKENS, PROMPT = 128, 16
GRPC_PORT, HTTP_PORT = 8771, 8772


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid` (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def prompts(streams: int) -> list[list[int]]:
    return [[2 + (i * 7 + j) % 500 for j in range(PROMPT)] for i in range(streams)]


async def over_grpc(streams: int) -> int:
    from shardline.client import AsyncClient

    async with AsyncClient(f"127.0.0.1:{GRPC_PORT}", retries=0) as client:
        async def one(prompt: list[int]) -> int:
            got = 0
            async for _ in client.generate_stream(prompt_token_ids=prompt, max_new_tokens=NEW_TOKENS,
                                                  temperature=0, ignore_eos=True):
                got += 1
            return got
        return sum(await asyncio.gather(*(one(p) for p in prompts(streams))))


async def over_http(streams: int, model_name: str) -> int:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{HTTP_PORT}/v1", api_key="none", timeout=600)

    async def one(prompt: list[int]) -> int:
        got = 0
        stream = await client.completions.create(model=model_name, prompt=prompt, max_tokens=NEW_TOKENS,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            got += sum(1 for c in chunk.choices if c.text is not None)
        return got
    try:
        return sum(await asyncio.gather(*(one(p) for p in prompts(streams))))
    finally:
        await client.close()


def measured(pid: int, run) -> float:
    """Router CPU microseconds per streamed token of one run."""
    before = cpu_seconds(pid)
    tokens = asyncio.run(run)
    return (cpu_seconds(pid) - before) / tokens * 1e6


def one_round(python: str, model: Path, streams_list: list[int], runs: dict[str, list[float]]) -> None:
    """Launches a server with `python`, warms both paths, measures every stream count on both."""
    cmd = [python, "-m", "shardline.client.cli", "launch", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(GRPC_PORT), "--http-port", str(HTTP_PORT), "--metrics-port", "0", "--log-level", "warning",
           "--max-concurrent-requests", str(2 * max(streams_list))]
    with server(cmd, HTTP_PORT, {**os.environ, "OMP_NUM_THREADS": "1"}) as proc:
        asyncio.run(over_grpc(4))
        asyncio.run(over_http(4, model.name))
        for streams in streams_list:
            runs.setdefault(f"grpc/{streams}", []).append(measured(proc.pid, over_grpc(streams)))
            runs.setdefault(f"http/{streams}", []).append(measured(proc.pid, over_http(streams, model.name)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--streams", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-python", help="interpreter of another checkout's venv, measured in turn")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_checkpoint(args.out / "llama-cheap", **CHEAP)
    servers = {"this checkout": sys.executable, **({"baseline": args.baseline_python} if args.baseline_python else {})}
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in servers}
    for _ in range(args.rounds):
        for name, python in servers.items():
            one_round(python, model, args.streams, runs[name])
    report = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in runs.items()}
    (args.out / "router_cpu.json").write_text(json.dumps({"median_us_per_token": report, "runs": runs}, indent=2))
    names = list(servers)
    print(f"| API | streams | {' | '.join(names)} |  (router CPU us per streamed token, median of {args.rounds})")
    print("|---|---:|" + "---:|" * len(names))
    for key in report[names[0]]:
        api, streams = key.split("/")
        cells = " | ".join(f"{report[n][key]:.0f}" for n in names)
        print(f"| {'gRPC (SDK)' if api == 'grpc' else 'OpenAI HTTP'} | {streams} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
