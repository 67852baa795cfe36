"""Time per output token with and without n-gram speculation, on the bundled demo model.

    python benchmarks/speculative.py [--k 2 4 6] [--rounds 5] [--new-tokens 128] [--model DIR]

For each K, one server (`shardline launch --speculative ngram --num-speculative-tokens K`, shards
with OMP_NUM_THREADS=1) serves, in interleaved rounds, the same requests with speculation and opted
out (`speculative=False`: plain decodes on the same server, the baseline), at batch 1 and 4:

- copy-heavy: a documentation passage from the demo model's own corpus, then its opening again
  (the model continues by copying it, as code edits and RAG answers copy from their context);
- random: the same number of random words (text that never repeats itself).

Greedy, EOS ignored. Reports median milliseconds per output token (wall time of the batch divided
by the tokens of one stream), the speedup, the acceptance rate from the server's metrics, and
checks that both modes returned the same tokens. `--model` serves another checkpoint with the
demo tokenizer instead (`--model random` builds compare.py's seeded random 25M Llama, whose greedy
output falls into loops: what a model that copies gains, as an upper bound on this machine).
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import os
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openai_compare import server  # noqa: E402

GRPC_PORT, HTTP_PORT, METRICS_PORT = 8781, 8782, 8783


def prompts() -> dict[str, list[str]]:
    from shardline.demo.corpus import corpus_documents

    docs = [d for d in corpus_documents() if len(d) > 1500][:4]
    copy = [d[:900] + "\n\n" + d[:120] for d in docs]
    rng = random.Random(0)
    words = re.findall(r"[A-Za-z]+", " ".join(corpus_documents()))
    rand = [" ".join(rng.choice(words) for _ in range(len(c.split()))) for c in copy]
    return {"copy-heavy": copy, "random": rand}


def counter(name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def batch(client, texts: list[str], new: int, speculative: bool) -> tuple[float, list[list[int]]]:
    out: dict[int, list[int]] = {}

    def one(i: int) -> None:
        out[i] = client.generate(texts[i], max_new_tokens=new, temperature=0, ignore_eos=True,
                                 speculative=speculative).token_ids
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, [out[i] for i in range(len(texts))]


def measure_k(k: int, rounds: int, new: int, model: Path | None, extra: list[str]) -> list[dict]:
    from shardline.client import Client

    cmd = [sys.executable, "-m", "shardline.client.cli", "launch", *(["--model", str(model)] if model else []),
           "--host", "127.0.0.1", "--port", str(GRPC_PORT),
           "--http-port", str(HTTP_PORT), "--metrics-port", str(METRICS_PORT), "--log-level", "warning",
           "--speculative", "ngram", "--num-speculative-tokens", str(k), *extra]
    rows = []
    with server(cmd, HTTP_PORT, {**os.environ, "OMP_NUM_THREADS": "1"}), Client(f"127.0.0.1:{GRPC_PORT}") as client:
        batch(client, prompts()["random"][:1], 8, True)  # warm the paths
        for kind, texts in prompts().items():
            for size in (1, 4):
                chosen = (texts * 4)[:size] if size > 1 else texts[:1]
                times: dict[bool, list[float]] = {True: [], False: []}
                outputs: dict[bool, list] = {}
                proposed = accepted = 0.0
                for _ in range(rounds):
                    for spec in (True, False):
                        p0, a0 = counter("shardline_speculative_proposed_tokens_total"), \
                            counter("shardline_speculative_accepted_tokens_total")
                        elapsed, outputs[spec] = batch(client, chosen, new, spec)
                        times[spec].append(elapsed / new * 1e3)
                        if spec:
                            proposed += counter("shardline_speculative_proposed_tokens_total") - p0
                            accepted += counter("shardline_speculative_accepted_tokens_total") - a0
                on, off = statistics.median(times[True]), statistics.median(times[False])
                rows.append({"k": k, "prompt": kind, "batch": size, "ms_on": on, "ms_off": off,
                             "speedup": off / on, "acceptance": accepted / proposed if proposed else 0.0,
                             "identical": outputs[True] == outputs[False]})
                print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, nargs="+", default=[4])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--model", help="checkpoint directory, or 'random'; default: the demo model")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--server-args", default="", help="more `shardline launch` flags, e.g. '--ngram-min 2'")
    args = ap.parse_args()
    model = None
    if args.model == "random":
        from compare import build_checkpoint
        model = build_checkpoint(args.out / "llama-25m")
    elif args.model:
        model = Path(args.model)
    rows = [r for k in args.k for r in measure_k(k, args.rounds, args.new_tokens, model, args.server_args.split())]
    print("| K | prompt | batch | ms/token speculative | ms/token plain | speedup | acceptance | same tokens |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['k']} | {r['prompt']} | {r['batch']} | {r['ms_on']:.2f} | {r['ms_off']:.2f} | "
              f"{r['speedup']:.2f}x | {r['acceptance']:.0%} | {'yes' if r['identical'] else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
