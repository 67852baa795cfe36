"""Unit tests of shard/sampling.py against transformers' logits processors (in-process, no shards)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from shardline.shard.sampling import (SamplingParams, apply_repetition_penalty, filter_top_k_top_p,
                                      sample, sample_row, step_seed)

VOCAB = 331


def _logits(seed: int, n: int = 1, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


def _masked(row: torch.Tensor) -> torch.Tensor:
    return torch.isinf(row) & (row < 0)


@pytest.mark.parametrize("top_k", [1, 2, 17, VOCAB - 1])
def test_top_k_mask_matches_transformers(top_k: int) -> None:
    for seed in range(5):
        row = _logits(seed)[0]
        ours = filter_top_k_top_p(row.clone(), top_k, 1.0)
        theirs = TopKLogitsWarper(top_k)(None, row.clone()[None])[0]
        assert int((~_masked(ours)).sum()) == top_k
        assert torch.equal(_masked(ours), _masked(theirs))
        assert torch.equal(ours[~_masked(ours)], row[~_masked(ours)])  # kept logits untouched


def test_top_k_zero_or_vocab_keeps_everything() -> None:
    row = _logits(0)[0]
    assert torch.equal(filter_top_k_top_p(row.clone(), 0, 1.0), row)
    assert torch.equal(filter_top_k_top_p(row.clone(), VOCAB, 1.0), row)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_mask_matches_transformers(top_p: float) -> None:
    for seed in range(5):
        row = _logits(seed)[0]
        ours = filter_top_k_top_p(row.clone(), 0, top_p)
        theirs = TopPLogitsWarper(top_p)(None, row.clone()[None])[0]
        assert torch.equal(_masked(ours), _masked(theirs)), (top_p, seed)
        assert 1 <= int((~_masked(ours)).sum()) < VOCAB
        assert not _masked(ours)[row.argmax()]  # the most likely token always survives


def test_top_k_then_top_p_with_temperature_matches_transformers_chain() -> None:
    for seed in range(5):
        row = _logits(seed)[0]
        ours = filter_top_k_top_p(row.clone() / 0.7, 20, 0.8)
        scores = row.clone()[None]
        for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
            scores = warper(None, scores)
        assert torch.equal(_masked(ours), _masked(scores[0]))
        assert torch.allclose(ours[~_masked(ours)], scores[0][~_masked(ours)])


def test_repetition_penalty_matches_transformers() -> None:
    for seed, penalty in ((0, 1.3), (1, 0.7), (2, 2.0)):
        row = _logits(seed)[0]
        history = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(seed))
        seen = torch.tensor(sorted(set(history.tolist())))
        ours = apply_repetition_penalty(row.clone(), seen, penalty)
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(history[None], row.clone()[None])[0]
        assert torch.allclose(ours, theirs)
        assert not torch.equal(ours, row)


def test_logprobs_are_log_softmax_of_the_raw_logits() -> None:
    logits = _logits(3, n=4)
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=1),
              SamplingParams(temperature=0.5, repetition_penalty=1.5, seed=2),
              SamplingParams(repetition_penalty=1.2)]
    seen = [torch.tensor([0, 5]), torch.empty(0, dtype=torch.long), torch.tensor([logits[2].argmax()]),
            torch.tensor([int(logits[3].argmax())])]
    tokens, logprobs = sample(logits, params, seen, [0, 1, 2, 3])
    expected = torch.log_softmax(logits, -1)[torch.arange(4), torch.tensor(tokens)]
    assert torch.allclose(torch.tensor(logprobs), expected)
    assert tokens[0] == int(logits[0].argmax())
    # The penalized greedy request must not pick its (penalized, positive) argmax when the runner-up wins.
    penalized = apply_repetition_penalty(logits[3].clone(), seen[3], 1.2)
    assert tokens[3] == int(penalized.argmax())


def test_step_seed_is_deterministic_and_spreads() -> None:
    assert step_seed(42, 3) == step_seed(42, 3)
    seeds = {step_seed(seed, step) for seed in range(20) for step in range(50)}
    assert len(seeds) == 1000
    assert all(0 <= s < 2**63 for s in seeds)
    assert step_seed(0, 0) != step_seed(0, 1) != step_seed(1, 0)


def test_seeded_sample_row_is_reproducible_and_seed_dependent() -> None:
    row = _logits(4, scale=0.5)[0]  # a flat distribution: seeds must matter
    params = SamplingParams(temperature=1.0, seed=123)
    draws = [sample_row(row, params, torch.empty(0), step) for step in range(30)]
    assert draws == [sample_row(row, params, torch.empty(0), step) for step in range(30)]
    assert len(set(draws)) > 5  # different steps draw differently
    other = [sample_row(row, SamplingParams(temperature=1.0, seed=124), torch.empty(0), s) for s in range(30)]
    assert other != draws


def test_batch_mates_do_not_change_a_seeded_draw() -> None:
    logits = _logits(5, n=3, scale=0.5)
    mine = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=99)
    alone, _ = sample(logits[1:2], [mine], [torch.empty(0)], [7])
    mates = [SamplingParams(temperature=1.2, seed=1), mine, SamplingParams()]
    batched, _ = sample(logits, mates, [torch.empty(0)] * 3, [0, 7, 4])
    assert batched[1] == alone[0]


def test_top_k_one_is_greedy_whatever_the_temperature() -> None:
    logits = _logits(6, n=2)
    params = SamplingParams(temperature=0.8, top_k=1, seed=3)
    assert params.greedy
    tokens, _ = sample(logits, [params, params], [torch.empty(0)] * 2, [0, 5])
    assert tokens == logits.argmax(-1).tolist()


def test_samples_respect_the_top_k_top_p_support() -> None:
    row = _logits(8, scale=1.0)[0]
    params = SamplingParams(temperature=1.0, top_k=5, top_p=0.99, seed=0)
    allowed = set(torch.topk(row, 5).indices.tolist())
    draws = {sample_row(row, SamplingParams(**{**params.__dict__, "seed": s}), torch.empty(0), 0)
             for s in range(200)}
    assert draws <= allowed and len(draws) > 1
