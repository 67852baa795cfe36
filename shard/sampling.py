"""Token selection for a whole step in one pass: greedy, temperature, top-k, top-p, repetition penalty.

Per-request parameters are tensors over the step's rows, so the op count does not depend on the
batch. Every row draws one uniform number from a counter-based generator keyed by (seed, step
index), computed on the host from the request's own state, and picks its token by inverse CDF over
its filtered distribution: the same seed gives the same tokens whatever else is in the batch, and
a request resumed after a preemption or restart draws exactly what it would have drawn.

Numerically safe for every accepted value: NaN logits count as impossible (-inf), +inf is clamped,
and logits are shifted by their finite maximum before the temperature divides them, so a tiny
temperature gives a one-hot distribution (never inf - inf), a huge one a flat one over the possible
tokens (an impossible one stays impossible), and the most likely token always survives top-k/top-p.
Logprobs are those of the unprocessed model distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MIX = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
_LIMIT = 1e30  # logits are clamped to +-_LIMIT before any arithmetic on them


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def uniform(seed: int, step: int) -> float:
    """A uniform number in [0, 1) for one request's step (splitmix64 of seed and step)."""
    x = (seed * _MIX + (step + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return (x >> 11) * 2.0**-53


@dataclass
class SamplingBatch:
    """The step's sampling parameters as tensors, one row per sampled request."""

    temperature: torch.Tensor  # [rows] float32, 0 = greedy
    top_k: torch.Tensor  # [rows] long, 0 = off
    top_p: torch.Tensor  # [rows] float32, 1 = off
    penalty: torch.Tensor  # [rows] float32, 1 = off
    uniforms: torch.Tensor  # [rows] float64 in [0, 1)
    seen: torch.Tensor | None  # [rows, vocab] bool: tokens in prompt or output (only with a penalty)
    all_greedy: bool

    @classmethod
    def build(cls, params: list[SamplingParams], steps: list[int], seen: torch.Tensor | None,
              device: torch.device) -> "SamplingBatch":
        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)
        return cls(col([0.0 if p.greedy else p.temperature for p in params], torch.float32),
                   col([p.top_k for p in params], torch.long), col([p.top_p for p in params], torch.float32),
                   col([p.repetition_penalty for p in params], torch.float32),
                   col([uniform(p.seed, s) for p, s in zip(params, steps)], torch.float64),
                   seen, all(p.greedy for p in params))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style: seen tokens' logits divided by the row's penalty when positive, multiplied when negative."""
    p = penalty.unsqueeze(1)
    penalized = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalized, logits).clamp(max=_LIMIT)


def _filtered_probs(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities in descending order after temperature, top-k and top-p; the vocabulary order)."""
    temperature = torch.where(batch.temperature > 0, batch.temperature, torch.ones_like(batch.temperature))
    ordered, order = logits.sort(dim=-1, descending=True)
    shifted = (ordered - ordered[:, :1]).double() / temperature.double().unsqueeze(1)
    ranks = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    outside_k = (batch.top_k.unsqueeze(1) > 0) & (ranks >= batch.top_k.unsqueeze(1))
    probs = shifted.masked_fill(outside_k, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
    outside_p = (batch.top_p.unsqueeze(1) < 1) & (before >= batch.top_p.double().unsqueeze(1))
    outside_p[:, 0] = False  # the most likely token always stays
    return probs.masked_fill(outside_p, 0.0), order


def sample(logits: torch.Tensor, batch: SamplingBatch, top_n: int = 0,
           allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Tokens [rows] (long) and their logprobs [rows] (float32) for logits [rows, vocab] float32;
    with `top_n`, also the `top_n` most likely tokens of each row and their logprobs ([rows, top_n]).
    `allowed` ([rows, vocab] bool, structured output) makes every other token impossible; each row
    allows at least one token."""
    logits = torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=_LIMIT)
    dead = torch.isneginf(logits.max(dim=-1, keepdim=True).values)  # a row with no possible token at all
    logits = torch.where(dead, torch.zeros_like(logits), logits)
    logprobs = torch.log_softmax(logits, dim=-1)
    scores = logits if batch.seen is None else apply_repetition_penalty(logits, batch.seen, batch.penalty)
    if allowed is not None:
        scores = torch.where(allowed, scores.clamp(min=-_LIMIT), float("-inf"))
    tokens = scores.argmax(dim=-1)
    if not batch.all_greedy:
        probs, order = _filtered_probs(scores, batch)
        cdf = probs.cumsum(dim=-1)
        target = (batch.uniforms * cdf[:, -1]).unsqueeze(1)
        pick = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[1] - 1)
        drawn = order.gather(1, pick).squeeze(1)
        tokens = torch.where(batch.temperature > 0, drawn, tokens)
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    if not top_n:
        return tokens, chosen
    best = logprobs.topk(min(top_n, logprobs.shape[1]), dim=-1)
    return tokens, chosen, best.indices, best.values
