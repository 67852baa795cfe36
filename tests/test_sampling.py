"""The batched sampler (shard/sampling.py) in-process: semantics against transformers' logits
processors, seeded draws independent of batch mates and batch position, and numerical safety.

The distribution a row samples from is read off exactly through the public `sample`: the row is
repeated N times with the uniform numbers set to a grid (j + 0.5) / N, so each token is picked for
a share of the grid within 1/N of its probability (inverse-CDF sampling).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from shardline.shard.sampling import SamplingBatch, SamplingParams, apply_repetition_penalty, sample, uniform

VOCAB = 331
CPU = torch.device("cpu")
GRID = 4096


def _logits(seed: int, n: int = 1, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


def _batch(params: list[SamplingParams], steps: list[int] | None = None,
           seen: torch.Tensor | None = None) -> SamplingBatch:
    return SamplingBatch.build(params, steps or [0] * len(params), seen, CPU)


def _grid_distribution(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """What `sample` draws from for this row, measured on a grid of uniforms (error <= 1/GRID)."""
    batch = dataclasses.replace(_batch([params] * GRID),
                                uniforms=(torch.arange(GRID, dtype=torch.float64) + 0.5) / GRID)
    tokens, _ = sample(row.expand(GRID, -1), batch)
    return torch.bincount(tokens, minlength=VOCAB).double() / GRID


def _transformers_distribution(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    scores = row.clone()[None]
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    for warper in warpers:
        scores = warper(None, scores)
    return torch.softmax(scores[0].double(), -1)


# -- semantics -----------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 20, 1.0), (2.0, 2, 1.0), (1.0, 0, 0.3), (1.0, 0, 0.9),
    (0.7, 20, 0.8), (1.0, VOCAB - 1, 0.999)])
def test_distribution_matches_transformers_warpers(temperature: float, top_k: int, top_p: float) -> None:
    for seed in range(3):
        row = _logits(seed, scale=1.5)[0]
        ours = _grid_distribution(row, SamplingParams(temperature, top_k, top_p, seed=1))
        theirs = _transformers_distribution(row, temperature, top_k, top_p)
        assert (ours - theirs).abs().max() <= 1.5 / GRID, (temperature, top_k, top_p, seed)
        assert ours[theirs == 0].sum() == 0  # nothing outside transformers' support


def test_greedy_rows_take_the_argmax_also_next_to_sampled_rows() -> None:
    logits = _logits(1, n=6)
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=4), SamplingParams(top_k=7),
              SamplingParams(temperature=0.9, top_k=1, seed=2), SamplingParams(temperature=2.0, top_p=0.5, seed=1),
              SamplingParams()]
    assert [p.greedy for p in params] == [True, False, True, True, False, True]
    tokens, logprobs = sample(logits, _batch(params))
    argmax = logits.argmax(-1)
    assert all(tokens[i] == argmax[i] for i in (0, 2, 3, 5))
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0])


def test_repetition_penalty_matches_transformers_per_row() -> None:
    logits, penalties = _logits(2, n=4), [1.3, 0.7, 2.0, 1.0]
    history = torch.randint(0, VOCAB, (4, 30), generator=torch.Generator().manual_seed(2))
    seen = torch.zeros(4, VOCAB, dtype=torch.bool).scatter_(1, history, True)
    ours = apply_repetition_penalty(logits.clone(), seen, torch.tensor(penalties))
    for i, penalty in enumerate(penalties):
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(history[i:i + 1], logits[i:i + 1].clone())[0]
        assert torch.allclose(ours[i], theirs), penalty
    assert torch.equal(ours[3], logits[3]) and not torch.equal(ours[0], logits[0])


def test_penalized_greedy_row_picks_the_penalized_argmax_and_logprobs_stay_raw() -> None:
    logits = _logits(3, n=2)
    seen = torch.zeros(2, VOCAB, dtype=torch.bool)
    seen[0, logits[0].argmax()] = True  # the favourite was seen: a penalty of 50 demotes it
    tokens, logprobs = sample(logits, _batch([SamplingParams(repetition_penalty=50.0), SamplingParams()], seen=seen))
    penalized = apply_repetition_penalty(logits, seen, torch.tensor([50.0, 1.0]))
    assert tokens.tolist() == penalized.argmax(-1).tolist() and tokens[0] != logits[0].argmax()
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0])


def test_top_k_one_is_greedy_whatever_the_temperature() -> None:
    logits = _logits(6, n=2)
    params = SamplingParams(temperature=0.8, top_k=1, seed=3)
    assert params.greedy
    tokens, _ = sample(logits, _batch([params, params], [0, 5]))
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_samples_stay_in_the_top_k_and_top_p_support() -> None:
    row = _logits(8, scale=1.0)[0]
    params = [SamplingParams(temperature=1.0, top_k=5, top_p=0.99, seed=s) for s in range(300)]
    tokens, _ = sample(row.expand(300, -1), _batch(params))
    assert set(tokens.tolist()) == set(torch.topk(row, 5).indices.tolist())


def test_empirical_frequencies_over_seeds_follow_the_probabilities() -> None:
    row, n = _logits(9, scale=1.0)[0], 20_000
    params = [SamplingParams(temperature=1.0, top_k=8, seed=s) for s in range(n)]
    tokens, _ = sample(row.expand(n, -1), _batch(params))
    frequencies = torch.bincount(tokens, minlength=VOCAB).double() / n
    expected = _transformers_distribution(row, 1.0, 8, 1.0)
    assert (frequencies - expected).abs().max() < 0.02  # about 6 standard deviations


# -- seeds -----------------------------------------------------------------------------------------

def test_uniform_is_deterministic_in_range_and_spread() -> None:
    assert uniform(42, 3) == uniform(42, 3)
    draws = [uniform(seed, step) for seed in (0, 1, 2**63, 2**64 - 1) for step in range(2500)]
    assert len(set(draws)) == len(draws) and all(0.0 <= u < 1.0 for u in draws)
    counts = torch.histc(torch.tensor(draws), bins=10, min=0, max=1)
    assert (counts - len(draws) / 10).abs().max() < 0.05 * len(draws) / 10
    assert abs(sum(draws) / len(draws) - 0.5) < 0.01
    assert len({uniform(0, 0), uniform(0, 1), uniform(1, 0)}) == 3


def test_same_seed_same_tokens_and_different_seeds_differ() -> None:
    row = _logits(4, scale=0.5)[0]  # a flat distribution: seeds must matter

    def draws(seed: int) -> list[int]:
        params = [SamplingParams(temperature=1.0, seed=seed)] * 30
        return sample(row.expand(30, -1), _batch(params, list(range(30))))[0].tolist()
    assert draws(123) == draws(123)
    assert draws(124) != draws(123) and len(set(draws(123))) > 5  # steps draw differently too
    assert draws(2**64 - 1) == draws(2**64 - 1)


@pytest.mark.parametrize("position, size", [(0, 3), (1, 3), (5, 8)])
def test_a_seeded_draw_does_not_depend_on_batch_mates_or_position(position: int, size: int) -> None:
    mine = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=99)
    mates = [SamplingParams(temperature=1.2, seed=1), SamplingParams(), SamplingParams(top_k=3, temperature=0.5),
             SamplingParams(repetition_penalty=1.5), SamplingParams(temperature=1.0, top_p=0.2, seed=99)]
    for step in range(20):
        logits = _logits(100 + step, n=size, scale=0.5)
        seen = torch.rand(size, VOCAB, generator=torch.Generator().manual_seed(step)) < 0.1
        alone, _ = sample(logits[position:position + 1], _batch([mine], [step], seen[position:position + 1]))
        params = [mates[i % len(mates)] for i in range(size)]
        params[position] = mine
        steps = [(i * 7) % 11 for i in range(size)]
        steps[position] = step
        batched, _ = sample(logits, _batch(params, steps, seen))
        assert batched[position] == alone[0], step


# -- numerical safety --------------------------------------------------------------------------------

def _safe(logits: torch.Tensor, params: list[SamplingParams], seen: torch.Tensor | None = None) -> torch.Tensor:
    tokens, logprobs = sample(logits, _batch(params, list(range(len(params))), seen))
    assert tokens.dtype == torch.long and bool(((tokens >= 0) & (tokens < logits.shape[1])).all())
    assert not torch.isnan(logprobs).any()
    return tokens


def test_tiny_temperature_and_tiny_top_p_are_greedy() -> None:
    logits = _logits(10, n=64)
    for params in (SamplingParams(temperature=1e-40, seed=1), SamplingParams(temperature=1e-30, top_k=5, seed=2),
                   SamplingParams(temperature=1.0, top_p=1e-9, seed=3)):
        assert _safe(logits, [dataclasses.replace(params, seed=s) for s in range(64)]).tolist() == \
            logits.argmax(-1).tolist(), params


def test_huge_temperature_samples_the_whole_vocabulary_evenly() -> None:
    row, n = _logits(11, scale=5.0)[0], 4000
    tokens = _safe(row.expand(n, -1), [SamplingParams(temperature=1e30, seed=s) for s in range(n)])
    assert len(set(tokens.tolist())) > 300  # flat: about 330 of 331 expected in 4000 draws
    assert torch.bincount(tokens, minlength=VOCAB).max() < 40  # no token near the ~12 expected x3


def test_extreme_repetition_penalties() -> None:
    logits = _logits(12, n=16)
    seen = torch.rand(16, VOCAB, generator=torch.Generator().manual_seed(12)) < 0.3
    for penalty in (1e-30, 1e30):
        for temperature in (0.0, 1.0):
            params = [SamplingParams(temperature=temperature, repetition_penalty=penalty, seed=s) for s in range(16)]
            tokens = _safe(logits, params, seen)
            picked_seen = seen.gather(1, tokens[:, None])[:, 0]
            if penalty > 1:  # seen logits pushed to ~0 or -1e30: an unseen positive logit wins
                assert not picked_seen.any()
            else:  # seen positive logits pushed to +1e30
                assert picked_seen.all()


def test_top_k_beyond_the_vocabulary_is_no_top_k() -> None:
    row = _logits(13, scale=1.5)[0]
    assert torch.equal(_grid_distribution(row, SamplingParams(temperature=1.0, top_k=10**6)),
                       _grid_distribution(row, SamplingParams(temperature=1.0)))


@pytest.mark.parametrize("temperature", [0.0, 1e-40, 0.7, 1e30])
def test_logits_with_inf_and_nan_never_give_nan_or_raise(temperature: float) -> None:
    inf, nan = math.inf, math.nan
    logits = _logits(14, n=5)
    logits[0] = nan  # all NaN
    logits[1, 17] = inf  # one +inf: it must win
    logits[2] = -inf
    logits[2, 40] = 0.5  # everything else impossible
    logits[3, ::3] = nan
    logits[3, 100] = inf
    logits[4, 200], logits[4, 201] = inf, -inf
    rows = [(0, 1.0, 1e-30), (50, 0.9, 1.3), (0, 0.5, 1e30), (3, 1.0, 1.0), (0, 1.0, 1.0)]  # top-k, top-p, penalty
    params = [SamplingParams(temperature=temperature, top_k=k, top_p=p, repetition_penalty=r, seed=s)
              for s, (k, p, r) in enumerate(rows)]
    seen = torch.zeros(5, VOCAB, dtype=torch.bool)
    seen[:, :10] = True
    tokens = _safe(logits, params, seen)
    if temperature < 1:  # (a temperature of 1e30 flattens even an infinite logit gap)
        assert tokens[1:5].tolist() == [17, 40, 100, 200]
    assert tokens[2] == 40, "an impossible (-inf) token stays impossible at any temperature"
    assert tokens[4] != 201 and tokens[3] % 3 != 0 or tokens[3] == 100, "-inf and NaN logits are never drawn"
