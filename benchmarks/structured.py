"""The cost of structured output: time per output token at batch 16 under a JSON schema vs none,
and the TTFT a cold and a cached schema add.

    python benchmarks/structured.py [--rounds 5] [--new-tokens 64] [--batch 16]

One server (`shardline launch` of the bundled demo model, shards with OMP_NUM_THREADS=1) serves,
in interleaved rounds, a batch of `--batch` concurrent requests that are all constrained to a
JSON schema (an array of at least 40 strings, so no output ends before --new-tokens) and the same
batch free (EOS ignored, the same token count). Time per output token = wall time of the batch /
tokens of one stream; medians over rounds. TTFT: one streamed request alone, free; under a schema
never seen before (a fresh property name each time: compile + first mask); under the same schema
again (a cache hit). Checks that every constrained output is a prefix of valid JSON of the schema.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openai_compare import server  # noqa: E402

GRPC_PORT, HTTP_PORT, METRICS_PORT = 8791, 8792, 8793
LONG = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 40}
PROMPTS = ["Write a list of words:", "Names of things in a house:", "A few colours and animals:",
           "Tokens for a parser test:"]


def batch(client, size: int, new: int, schema) -> tuple[float, list[str]]:
    out: dict[int, str] = {}

    def one(i: int) -> None:
        kwargs = {"json_schema": schema} if schema is not None else {"ignore_eos": True}
        got = client.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=new, seed=i, temperature=0.8, **kwargs)
        assert len(got.token_ids) == new, f"stopped after {len(got.token_ids)} tokens"
        out[i] = got.text
    threads = [threading.Thread(target=one, args=(i,)) for i in range(size)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, [out[i] for i in range(size)]


def ttft(client, schema) -> float:
    kwargs = {"json_schema": schema} if schema is not None else {}
    start = time.perf_counter()
    for _ in client.generate_stream(PROMPTS[0], max_new_tokens=1, **kwargs):
        return time.perf_counter() - start
    raise RuntimeError("no token")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    from shardline.client import Client

    cmd = [sys.executable, "-m", "shardline.client.cli", "launch", "--host", "127.0.0.1", "--port", str(GRPC_PORT),
           "--http-port", str(HTTP_PORT), "--metrics-port", str(METRICS_PORT), "--log-level", "warning"]
    with server(cmd, HTTP_PORT, {**os.environ, "OMP_NUM_THREADS": "1"}), Client(f"127.0.0.1:{GRPC_PORT}") as client:
        batch(client, 2, 8, LONG), batch(client, 2, 8, None)  # warm both paths
        per_token: dict[str, list[float]] = {"schema": [], "free": []}
        for _ in range(args.rounds):
            for kind, schema in (("schema", LONG), ("free", None)):
                elapsed, texts = batch(client, args.batch, args.new_tokens, schema)
                per_token[kind].append(elapsed / args.new_tokens * 1e3)
                if schema is not None:
                    assert all(t.startswith('["') for t in texts), texts[:2]
        first: dict[str, list[float]] = {"free": [], "cold schema": [], "cached schema": []}
        for r in range(args.rounds * 2):
            fresh = {"type": "object", "properties": {f"field_{r}_{time.time_ns()}": {"type": "integer"}}}
            first["free"].append(ttft(client, None))
            first["cold schema"].append(ttft(client, fresh))
            first["cached schema"].append(ttft(client, fresh))
    on, off = statistics.median(per_token["schema"]), statistics.median(per_token["free"])
    print(f"| batch | ms/token under a JSON schema | ms/token free | ratio |\n|---:|---:|---:|---:|\n"
          f"| {args.batch} | {on:.2f} | {off:.2f} | {on / off:.3f}x |")
    print("\n| first token | median ms |\n|---|---:|")
    for kind, values in first.items():
        print(f"| {kind} | {statistics.median(values) * 1e3:.1f} |")
    print(json.dumps({"per_token": per_token, "ttft": first}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
