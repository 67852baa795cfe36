"""Token selection: greedy, temperature, top-k, top-p, repetition penalty, per-request seeds.

Each request draws from its own generator, reseeded at every step from (seed, step index), so the
same seed gives the same tokens whatever else is in the batch, and a request re-prefilled after a
restart draws exactly what it would have drawn. Logprobs are those of the unprocessed model
distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def plain_greedy(self) -> bool:
        return self.greedy and self.repetition_penalty == 1.0


def step_seed(seed: int, step: int) -> int:
    """A well-mixed 63-bit seed for one request's step."""
    x = (seed * _MIX + (step + 1) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 31
    return x & _MASK


def apply_repetition_penalty(row: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: seen tokens' logits divided by the penalty when positive, multiplied when negative."""
    scores = row[seen]
    row[seen] = torch.where(scores < 0, scores * penalty, scores / penalty)
    return row


def filter_top_k_top_p(row: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Masks (to -inf) the tokens outside top-k and outside the top-p nucleus."""
    if 0 < top_k < row.shape[-1]:
        kth = torch.topk(row, top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - top_p
        remove[-1] = False  # always keep the most likely token
        row = row.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return row


def sample_row(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor, step: int) -> int:
    """Picks one token from one request's logits ([vocab], float32)."""
    row = logits.clone()
    if params.repetition_penalty != 1.0 and seen.numel():
        row = apply_repetition_penalty(row, seen, params.repetition_penalty)
    if params.greedy:
        return int(row.argmax())
    row = filter_top_k_top_p(row / params.temperature, params.top_k, params.top_p)
    gen = torch.Generator(device=row.device).manual_seed(step_seed(params.seed, step))
    return int(torch.multinomial(row.softmax(-1), 1, generator=gen))


def sample(logits: torch.Tensor, params: list[SamplingParams], seen: list[torch.Tensor],
           steps: list[int]) -> tuple[list[int], list[float]]:
    """Tokens and their logprobs for a batch: logits [n, vocab] float32, one row per request."""
    logprobs = torch.log_softmax(logits, dim=-1)
    if all(p.plain_greedy for p in params):
        tokens = logits.argmax(dim=-1).tolist()
    else:
        tokens = [int(logits[i].argmax()) if p.plain_greedy else sample_row(logits[i], p, seen[i], steps[i])
                  for i, p in enumerate(params)]
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device).unsqueeze(1))
    return tokens, chosen.squeeze(1).tolist()
