"""Builds one step's flat inputs and `StepContext` from the sequences' work, once per step.

Host-side lists are turned into a handful of tensors (ids, positions, slots, block tables) and the
masks are derived from them with tensor ops, so the per-layer work never loops over sequences.
Single-token rows come first in the flat order, then the multi-token rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardline.shard.attention import RowGroup, StepContext
from shardline.shard.kv_cache import KVPool
from shardline.shard.sequences import Sequence


@dataclass
class StepInputs:
    ids: torch.Tensor  # [tokens] long
    positions: torch.Tensor  # [tokens] long
    ctx: StepContext
    order: list[int]  # work index of each row, in flat order (singles first)


def _slot_table(blocks: list[list[int]], ends: torch.Tensor, length: int, pool: KVPool) -> torch.Tensor:
    """[rows, length] slots of each row's positions; at and beyond the row's `ends`: the null slot."""
    bs, width = pool.block_size, -(-length // pool.block_size)
    padded = [b[:width] + [0] * (width - len(b[:width])) for b in blocks]
    table = torch.tensor(padded, dtype=torch.long, device=ends.device)
    slots = (table.unsqueeze(-1) * bs + torch.arange(bs, device=ends.device)).view(len(blocks), -1)[:, :length]
    inside = torch.arange(length, device=ends.device).unsqueeze(0) < ends.unsqueeze(1)
    return torch.where(inside, slots, torch.full_like(slots, pool.null_slot))


def _masks(key_pos: torch.Tensor, query_pos: torch.Tensor, windows: set[int | None]) -> dict[int | None, torch.Tensor]:
    """Boolean masks [rows, 1, queries, keys]: a query sees keys up to its own position (and within
    each window); query_pos is [rows, queries]."""
    causal = key_pos.view(1, 1, -1) <= query_pos.unsqueeze(-1)
    out: dict[int | None, torch.Tensor] = {}
    for w in windows:
        mask = causal if w is None else causal & (key_pos.view(1, 1, -1) > query_pos.unsqueeze(-1) - w)
        out[w] = mask.unsqueeze(1)
    return out


def _single_group(rows: list[tuple[Sequence, list[int]]], pool: KVPool, windows: set[int | None],
                  device: torch.device) -> RowGroup:
    ends = torch.tensor([s.computed + 1 for s, _ in rows], device=device)
    length = int(ends.max())
    table = _slot_table([s.blocks for s, _ in rows], ends, length, pool)
    query_pos = ends.unsqueeze(1) - 1
    return RowGroup(table, _masks(torch.arange(length, device=device), query_pos, windows))


def _multi_group(rows: list[tuple[Sequence, list[int]]], pool: KVPool, windows: set[int | None],
                 device: torch.device) -> tuple[RowGroup, torch.Tensor, torch.Tensor]:
    starts = torch.tensor([s.computed for s, _ in rows], device=device)
    lens = torch.tensor([len(r) for _, r in rows], device=device)
    q_max = int(lens.max())
    length = int((starts + lens).max())
    table = _slot_table([s.blocks for s, _ in rows], starts + lens, length, pool)
    j = torch.arange(q_max, device=device).unsqueeze(0)
    query_pos = starts.unsqueeze(1) + torch.minimum(j, lens.unsqueeze(1) - 1)  # pad rows repeat the last
    first = torch.cumsum(lens, 0) - lens
    gather = (first.unsqueeze(1) + torch.minimum(j, lens.unsqueeze(1) - 1)).reshape(-1)
    real = (j < lens.unsqueeze(1)).reshape(-1)
    scatter = torch.arange(len(rows) * q_max, device=device)[real]
    group = RowGroup(table, _masks(torch.arange(length, device=device), query_pos, windows))
    return group, gather, scatter


def build(work: list[tuple[Sequence, list[int], bool]], pool: KVPool, rotary, dtype: torch.dtype,
          windows: set[int | None], device: torch.device) -> StepInputs:
    """The step's inputs; `work` is (sequence, tokens to run, sample) in the router's order."""
    bs = pool.block_size
    order = [i for i, (_, run, _) in enumerate(work) if len(run) == 1]
    order += [i for i, (_, run, _) in enumerate(work) if len(run) > 1]
    ids, positions, slots, last = [], [], [], {}
    for i in order:
        seq, run, _ = work[i]
        for offset, token in enumerate(run):
            pos = seq.computed + offset
            ids.append(token)
            positions.append(pos)
            slots.append(seq.blocks[pos // bs] * bs + pos % bs)
        last[i] = len(ids) - 1
    singles = [(work[i][0], work[i][1]) for i in order if len(work[i][1]) == 1]
    multis = [(work[i][0], work[i][1]) for i in order if len(work[i][1]) > 1]
    pos_t = torch.tensor(positions, dtype=torch.long, device=device)
    cos, sin = rotary.tables(pos_t, dtype)
    ctx = StepContext(pool, torch.tensor(slots, dtype=torch.long, device=device), cos, sin,
                      _single_group(singles, pool, windows, device) if singles else None, None)
    if multis:
        ctx.multi, ctx.multi_gather, ctx.multi_scatter = _multi_group(multis, pool, windows, device)
    ctx.sample_rows = torch.tensor([last[i] for i, (_, _, sample) in enumerate(work) if sample],
                                   dtype=torch.long, device=device)
    return StepInputs(torch.tensor(ids, dtype=torch.long, device=device), pos_t, ctx, order)
