"""Workloads and latency statistics shared by the served and in-process benchmarks.

Definitions follow the established serving benchmarks: TTFT = arrival to first token; TPOT =
(end-to-end - TTFT) / (output tokens - 1) per request; ITL = every gap between consecutive tokens;
throughput counts only the tokens each request asked for.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Spec:
    """One benchmark request: prompt token ids and how many tokens to generate."""

    prompt: list[int]
    max_new_tokens: int


def workload(n: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int,
             seed: int = 0, prefix_len: int = 0) -> list[Spec]:
    """Deterministic random prompts (ids in [2, vocab)) with lengths drawn uniformly from the ranges;
    with `prefix_len`, every prompt starts with the same `prefix_len` tokens (a shared system prompt
    or document, the standard prefix-caching workload) before its own part."""
    rng = random.Random(seed)
    prefix = [rng.randrange(2, vocab_size) for _ in range(prefix_len)]
    return [Spec(prefix + [rng.randrange(2, vocab_size) for _ in range(rng.randint(*input_len))],
                 rng.randint(*output_len)) for _ in range(n)]


@dataclass
class Result:
    """What one request measured: token arrival times relative to its own start."""

    prompt_tokens: int
    token_times: list[float] = field(default_factory=list)
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens the server served from its prefix cache

    @property
    def ttft(self) -> float:
        return self.token_times[0]

    @property
    def e2e(self) -> float:
        return self.token_times[-1]


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]
    return {"mean": statistics.fmean(values), "p50": pct(50), "p90": pct(90), "p99": pct(99)}


def summarize(results: list[Result], duration_s: float) -> dict[str, object]:
    """The benchmark report: throughput, latency distributions (seconds), failures."""
    ok = [r for r in results if r.error is None and r.token_times]
    output = sum(len(r.token_times) for r in ok)
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    tpot = [(r.e2e - r.ttft) / (len(r.token_times) - 1) for r in ok if len(r.token_times) > 1]
    return {
        "requests": len(results), "completed": len(ok), "failures": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration_s, "prompt_tokens": sum(r.prompt_tokens for r in ok), "output_tokens": output,
        "cached_prompt_tokens": sum(r.cached_tokens for r in ok),
        "request_throughput": len(ok) / duration_s if duration_s else 0.0,
        "output_throughput": output / duration_s if duration_s else 0.0,
        "ttft_s": _stats([r.ttft for r in ok]), "tpot_s": _stats(tpot), "itl_s": _stats(itl),
        "e2e_s": _stats([r.e2e for r in ok]),
    }


def table(report: dict[str, object]) -> str:
    """A plain-text table of a report."""
    lines = [f"{'requests (completed/failed)':<30}{report['completed']}/{report['failures']}",
             f"{'duration (s)':<30}{report['duration_s']:.2f}",
             f"{'request throughput (req/s)':<30}{report['request_throughput']:.2f}",
             f"{'output throughput (tok/s)':<30}{report['output_throughput']:.1f}",
             f"{'prefix cache hits (tokens)':<30}{report.get('cached_prompt_tokens', 0)}/{report['prompt_tokens']}",
             f"{'':<30}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
    for key, label in (("ttft_s", "TTFT (ms)"), ("tpot_s", "TPOT (ms)"), ("itl_s", "ITL (ms)"), ("e2e_s", "E2E (ms)")):
        s = report[key]
        lines.append(f"{label:<30}" + "".join(f"{s[k] * 1000:>10.2f}" for k in ("mean", "p50", "p90", "p99")))
    return "\n".join(lines)
