"""Planning a step costs the same Python work however many tokens it holds.

`shard.step.plan` is profiled with `sys.setprofile`, which sees every Python call and every call
into C (a `list.append` per token would show as one event per token). A step of 4 prompt chunks
of 8 tokens and one of 4 chunks of 200 tokens must make the same number of calls, and so must
decode steps of 2 and 40 sequences apart from the per-row bookkeeping (reading each row's
state), which is bounded by a few calls per row, never per token. The plan's tensors are checked
too, so the test cannot pass on a plan that skipped work.
"""

from __future__ import annotations

import sys

import torch

from shardline.proto import shard_pb2
from shardline.shard.batch_state import BatchState
from shardline.shard.sequences import Limits, Sequences
from shardline.shard.step import plan

BLOCK = 16
LIMITS = Limits(vocab_size=1000, max_positions=4096, num_blocks=4096, block_size=BLOCK)


def _state_with(chunks: list[int]) -> tuple[Sequences, BatchState, shard_pb2.StepRequest, list]:
    seqs, state = Sequences(), BatchState(256, LIMITS.num_blocks, LIMITS.vocab_size, torch.device("cpu"))
    step, next_block = shard_pb2.StepRequest(), 0
    for i, n in enumerate(chunks):
        blocks = list(range(next_block, next_block + -(-n // BLOCK)))
        next_block += len(blocks)
        step.start.append(shard_pb2.NewSequence(id=i, prompt_len=n))
        step.work.append(shard_pb2.Work(id=i, token_ids=[(i + j) % 997 + 1 for j in range(n)], new_blocks=blocks,
                                        sample=True))
    work = seqs.apply(step, LIMITS)
    state.apply(step, work)
    return seqs, state, step, work


def _calls(fn) -> int:
    events = 0

    def count(frame, event, arg):
        nonlocal events
        if event in ("call", "c_call"):
            events += 1

    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return events


def test_planning_a_prefill_costs_the_same_calls_for_8_or_200_tokens_per_row() -> None:
    counts = {}
    for n in (8, 200):
        _, state, step, work = _state_with([n] * 4)
        decode = [not w.token_ids for w in step.work]
        counts[n] = _calls(lambda: plan(work, decode, state, BLOCK))
        p = plan(work, decode, state, BLOCK)
        assert p.tokens == 4 * n and p.positions[-1] == n - 1 and p.sample_index.tolist() == [n - 1 + k * n
                                                                                             for k in range(4)]
        assert torch.equal(p.slots[:n], torch.arange(n))  # the first row's blocks are 0, 1, ...
    assert counts[8] == counts[200], counts


def test_planning_decodes_has_no_per_token_work() -> None:
    counts = {}
    for rows in (2, 40):
        seqs, state, step, work = _state_with([5] * rows)
        state.record_sampled(torch.arange(rows), torch.arange(rows) + 7)
        for seq, run, _ in work:
            seq.computed += len(run)
            seq.tokens.append(0)
        state.advance(torch.arange(rows), torch.full((rows,), 5))
        decode_step = shard_pb2.StepRequest(work=[shard_pb2.Work(id=i, sample=True) for i in range(rows)])
        decode_work = seqs.apply(decode_step, LIMITS)
        counts[rows] = _calls(lambda: plan(decode_work, [True] * rows, state, BLOCK))
        p = plan(decode_work, [True] * rows, state, BLOCK)
        assert p.ids.tolist() == [7 + i for i in range(rows)]  # each row runs its own sampled token
        assert p.positions.tolist() == [5] * rows
    per_row = (counts[40] - counts[2]) / 38
    assert per_row <= 12, counts  # a few calls per row (reading its state), nothing per token
