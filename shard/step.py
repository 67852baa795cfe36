"""Plans one step from the sequences' work: flat inputs computed on the device, once per step.

The step's tokens are flat, single-token rows (decodes) first, then multi-token rows (prompt
chunks). The host handles per-row facts only (which state row, how many tokens, the explicit
tokens of prompt chunks); positions, write slots, sample rows and decode inputs are derived with
a fixed number of tensor ops from the persistent `BatchState` (block tables, computed lengths,
last sampled tokens), so the cost of building a step does not grow with its tokens in Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch

from shardline.shard.batch_state import BatchState
from shardline.shard.sequences import Sequence


@dataclass
class Rows:
    """One kind of rows (single- or multi-token) of a step, in flat order."""

    rows: torch.Tensor  # [R] BatchState rows
    starts: torch.Tensor  # [R] tokens with K/V before this step
    lens: torch.Tensor  # [R] tokens run this step
    longest_run: int  # host ints, known without a device sync
    longest_end: int

    @property
    def count(self) -> int:
        return self.rows.shape[0]


@dataclass
class StepPlan:
    """What every layer of one step shares."""

    ids: torch.Tensor  # [T] tokens to run
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] where each token's K/V is written
    token_rows: torch.Tensor  # [T] BatchState row of each token
    single: Rows | None  # the first `single.count` tokens, one per row
    multi: Rows | None  # the remaining tokens, row after row
    sample_index: torch.Tensor  # [N] flat index of each token sampled from (1 + drafts per sampled work)
    sample_rows: torch.Tensor  # [N] their BatchState rows
    block_size: int
    order: list[int]  # work indices in flat row order

    @property
    def tokens(self) -> int:
        return self.ids.shape[0]


def _rows(state: BatchState, seqs: list[Sequence], lens: list[int]) -> Rows | None:
    if not seqs:
        return None
    device = state.device
    rows = torch.tensor([state.row_of[s.id] for s in seqs], dtype=torch.long, device=device)
    ends = [s.computed + n for s, n in zip(seqs, lens)]
    return Rows(rows, state.computed.index_select(0, rows), torch.tensor(lens, dtype=torch.long, device=device),
                max(lens), max(ends))


def plan(work: list[tuple[Sequence, list[int], bool]], decode: list[bool], state: BatchState,
         block_size: int, drafts: list[int] | None = None) -> StepPlan:
    """The step's plan; `work` is (sequence, tokens to run, sample) in the router's order,
    `decode[i]` says work i runs the token its sequence sampled last (held on the device) and
    `drafts[i]` how many proposed tokens end its run (each sampled after, as well as the last)."""
    device = state.device
    order = [i for i, (_, run, _) in enumerate(work) if len(run) == 1]
    n_single = len(order)
    order += [i for i, (_, run, _) in enumerate(work) if len(run) > 1]
    singles = [work[i][0] for i in order[:n_single]]
    multis = [work[i] for i in order[n_single:]]
    single = _rows(state, singles, [1] * n_single)
    multi = _rows(state, [s for s, _, _ in multis], [len(r) for _, r, _ in multis])
    parts = [p for p in (single, multi) if p is not None]
    rows, starts, lens = (torch.cat([getattr(p, f) for p in parts]) for f in ("rows", "starts", "lens"))
    total = n_single + sum(len(r) for _, r, _ in multis)
    ends = torch.cumsum(lens, 0)
    first = ends - lens
    flat = torch.arange(total, device=device)
    row_index = torch.searchsorted(ends, flat, right=True)  # the row each flat token belongs to
    positions = starts[row_index] + flat - first[row_index]
    token_rows = rows[row_index]
    blocks = state.tables[token_rows, torch.div(positions, block_size, rounding_mode="floor")].long()
    slots = blocks * block_size + positions % block_size
    explicit = [0 if decode[i] else work[i][1][0] for i in order[:n_single]]
    explicit += chain.from_iterable(r for _, r, _ in multis)
    ids = torch.tensor(explicit, dtype=torch.long, device=device)
    if single is not None:
        held = torch.tensor([decode[i] for i in order[:n_single]], device=device)
        ids[:n_single] = torch.where(held, state.last_token.index_select(0, single.rows), ids[:n_single])
    where = {i: k for k, i in enumerate(order)}
    pick = torch.tensor([where[i] for i, (_, _, sample) in enumerate(work) if sample], dtype=torch.long,
                        device=device)
    sample_index, sample_rows = (first + lens - 1).index_select(0, pick), rows.index_select(0, pick)
    if drafts and any(drafts):
        sample_index, sample_rows = _verify_positions(sample_index, sample_rows,
                                                      [1 + drafts[i] for i, w in enumerate(work) if w[2]])
    return StepPlan(ids, positions, slots, token_rows, single, multi, sample_index, sample_rows, block_size, order)


def _verify_positions(last: torch.Tensor, rows: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sampled work's last `counts[k]` flat positions (its held token and its proposals) and
    their rows, in order: a speculative row is sampled after every token it runs."""
    c = torch.tensor(counts, dtype=torch.long, device=last.device)
    starts = torch.repeat_interleave(last - c + 1, c)
    within = torch.arange(int(sum(counts)), device=last.device) - torch.repeat_interleave(torch.cumsum(c, 0) - c, c)
    return starts + within, torch.repeat_interleave(rows, c)
