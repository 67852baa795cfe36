"""Speculative verification in the shard engine: a decode row that carries proposed tokens.

The engine runs the held token and the proposals in one row, samples after each exactly as plain
decodes would, and emits the samples up to the first that differs from its proposal. Whatever is
proposed (all right, all wrong, right then wrong, nothing), the tokens must be transformers' greedy
tokens, and a seeded sampled request must draw exactly what it draws without proposals: the K/V the
rejected proposals wrote is overwritten, never read as the sequence's own.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from checkpoints import random_prompts, reference_generate
from shardline.proto import shard_pb2
from shardline.shard.engine import Engine, StepRefused
from test_engine import make_engine

VOCAB = 331
PROMPTS = random_prompts(3, VOCAB, min_len=3, max_len=20, seed=5)
NEW = 24


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    return checkpoint_factory(arch="llama", num_layers=2)


@pytest.fixture(scope="module")
def reference(checkpoint) -> list[list[int]]:
    return reference_generate(checkpoint, PROMPTS, NEW)


class Row:
    """One request driven by hand: its blocks, its computed length and the tokens it got."""

    def __init__(self, rid: int, prompt: list[int], sampling: shard_pb2.SamplingParameters, free: list[int]):
        self.id, self.prompt, self.sampling, self.free = rid, prompt, sampling, free
        self.blocks: list[int] = []
        self.out: list[int] = []
        self.computed = 0

    def blocks_for(self, tokens: int, block_size: int) -> list[int]:
        need = -(-tokens // block_size) - len(self.blocks)
        got = [self.free.pop() for _ in range(max(0, need))]
        self.blocks += got
        return got

    def first(self, block_size: int) -> tuple[shard_pb2.NewSequence, shard_pb2.Work]:
        new = shard_pb2.NewSequence(id=self.id, prompt_len=len(self.prompt), sampling=self.sampling)
        work = shard_pb2.Work(id=self.id, token_ids=self.prompt, sample=True,
                              new_blocks=self.blocks_for(len(self.prompt), block_size))
        return new, work

    def decode(self, drafts: list[int], block_size: int) -> shard_pb2.Work:
        return shard_pb2.Work(id=self.id, sample=True, draft_token_ids=drafts,
                              new_blocks=self.blocks_for(self.computed + 1 + len(drafts), block_size))

    def took(self, gens: list[shard_pb2.Generation], ran: int) -> None:
        self.out += [g.token_id for g in gens]
        self.computed += ran


class SpecDriver:
    """Drives prompts to NEW tokens in shared steps, each decode carrying `propose(i, out)`'s
    proposals (at most k, within NEW); `next_step()` builds a step, `took(gens)` absorbs its reply."""

    def __init__(self, prompts: list[list[int]], propose: Callable[[int, list[int]], list[int]],
                 num_blocks: int, block_size: int, sampling: shard_pb2.SamplingParameters | None = None,
                 k: int = 4, first_id: int = 1):
        free = list(range(num_blocks - 1, -1, -1))
        self.rows = [Row(first_id + i, p, sampling or shard_pb2.SamplingParameters(), free)
                     for i, p in enumerate(prompts)]
        self.propose, self.block_size, self.k = propose, block_size, k
        self.sent: list[tuple[Row, shard_pb2.Work]] = []
        self.started = False

    @property
    def done(self) -> bool:
        return all(len(r.out) >= NEW for r in self.rows)

    def next_step(self) -> shard_pb2.StepRequest:
        if not self.started:
            self.started = True
            firsts = [r.first(self.block_size) for r in self.rows]
            self.sent = [(r, w) for r, (_, w) in zip(self.rows, firsts)]
            return shard_pb2.StepRequest(start=[n for n, _ in firsts], work=[w for _, w in firsts])
        self.sent = []
        for i, r in enumerate(self.rows):
            if len(r.out) < NEW:
                drafts = self.propose(i, r.out)[:min(self.k, NEW - len(r.out) - 1)]
                self.sent.append((r, r.decode(drafts, self.block_size)))
        return shard_pb2.StepRequest(work=[w for _, w in self.sent])

    def took(self, gens) -> None:
        by_id: dict[int, list[shard_pb2.Generation]] = {}
        for g in gens:
            by_id.setdefault(g.request_id, []).append(g)
        for r, w in self.sent:
            got = by_id[r.id]
            assert 1 <= len(got) <= 1 + len(w.draft_token_ids)
            r.took(got, len(w.token_ids) or len(got))

    @property
    def outputs(self) -> list[list[int]]:
        return [r.out[:NEW] for r in self.rows]


def generate(engine: Engine, prompts: list[list[int]], propose: Callable[[int, list[int]], list[int]],
             sampling: shard_pb2.SamplingParameters | None = None, k: int = 4) -> list[list[int]]:
    driver = SpecDriver(prompts, propose, engine.pool.num_blocks, engine.block_size, sampling, k)
    while not driver.done:
        driver.took(engine.step(driver.next_step()))
    return driver.outputs


@pytest.fixture(scope="module", params=["reference", "flex"])
def engine(checkpoint, request) -> Engine:
    """Each attention backend: flex (CUDA's default) must verify the same way as the oracle."""
    return make_engine(checkpoint, backend=request.param)


def proposer(truth: list[list[int]], wrong_after: int | None) -> Callable[[int, list[int]], list[int]]:
    """Proposes the true continuation, wrong from its `wrong_after`-th proposal on (None: never)."""
    def propose(i: int, out: list[int]) -> list[int]:
        nxt = truth[i][len(out):len(out) + 6]
        if wrong_after is None:
            return nxt
        return [t if j < wrong_after else (t + 1) % VOCAB for j, t in enumerate(nxt)]
    return propose


@pytest.mark.parametrize("wrong_after", [None, 0, 2], ids=["all-right", "all-wrong", "right-then-wrong"])
def test_greedy_tokens_equal_transformers_whatever_is_proposed(engine, reference, wrong_after):
    engine.reset()
    assert generate(engine, PROMPTS, proposer(reference, wrong_after)) == reference


def test_a_row_without_proposals_beside_speculative_rows(engine, reference):
    engine.reset()
    truth = proposer(reference, None)
    got = generate(engine, PROMPTS, lambda i, out: truth(i, out) if i != 1 else [])
    assert got == reference


def test_all_right_proposals_take_fewer_steps(engine, reference):
    """k + 1 tokens per step when every proposal is right: the point of speculating."""
    engine.reset()
    calls = 0
    step = engine.step

    def counting(request):
        nonlocal calls
        calls += 1
        return step(request)
    engine.step = counting
    try:
        generate(engine, PROMPTS[:1], proposer(reference, None), k=4)
    finally:
        del engine.step
    assert calls == 1 + -(-(NEW - 1) // 5)


def test_seeded_sampling_draws_the_same_tokens_with_and_without_proposals(engine):
    engine.reset()
    sampling = shard_pb2.SamplingParameters(temperature=1.3, top_p=0.95, seed=1234)
    plain = generate(engine, PROMPTS, lambda i, out: [], sampling)
    for wrong_after in (None, 1):
        engine.reset()
        assert generate(engine, PROMPTS, proposer(plain, wrong_after), sampling) == plain


def test_proposals_with_a_repetition_penalty_are_refused(engine):
    engine.reset()
    free = list(range(engine.pool.num_blocks))
    row = Row(1, PROMPTS[0], shard_pb2.SamplingParameters(repetition_penalty=1.2), free)
    new, work = row.first(engine.block_size)
    engine.step(shard_pb2.StepRequest(start=[new], work=[work]))
    row.computed = len(row.prompt)
    with pytest.raises(StepRefused, match="repetition penalty"):
        engine.step(shard_pb2.StepRequest(work=[row.decode([5, 6], engine.block_size)]))
    with pytest.raises(StepRefused, match="only come with a sampled decode"):
        engine.step(shard_pb2.StepRequest(work=[shard_pb2.Work(id=1, sample=False, draft_token_ids=[4])]))
