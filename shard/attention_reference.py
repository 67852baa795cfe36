"""`reference` attention: each row's context gathered through a slot table, then SDPA.

The oracle the other backends are checked against. Planned once per step from the persistent block
tables: single-token rows read a [rows, longest context] slot table (slots past a row's length
read the always-zero null slot and are masked), and the query heads that share a KV head form the
query axis of one SDPA call (no repeated keys for GQA); multi-token rows are padded to the longest
chunk, with a causal mask that starts at each row's cached length (chunked prefill and prefix
reuse are the same case). Sliding-window layers use masks cut to their window. The gather copies
O(rows x longest context) per layer: `flex` reads the pool in place instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shardline.shard.batch_state import BatchState
from shardline.shard.kv_cache import KVPool
from shardline.shard.step import Rows, StepPlan


@dataclass
class _Group:
    table: torch.Tensor  # [rows, length] slots
    masks: dict[int | None, torch.Tensor]  # [rows, 1, queries, length] per window


def slot_table(state: BatchState, rows: Rows, ends: torch.Tensor, length: int, pool: KVPool) -> torch.Tensor:
    """[rows, length] slots of each row's positions; at and beyond the row's `ends`: the null slot."""
    bs = pool.block_size
    width = -(-length // bs)
    blocks = state.tables.index_select(0, rows.rows)[:, :width].long()
    slots = (blocks.unsqueeze(-1) * bs + torch.arange(bs, device=blocks.device)).view(rows.count, -1)[:, :length]
    inside = torch.arange(length, device=blocks.device).unsqueeze(0) < ends.unsqueeze(1)
    return torch.where(inside, slots, torch.full_like(slots, pool.null_slot))


def _masks(length: int, query_pos: torch.Tensor, windows: set[int | None]) -> dict[int | None, torch.Tensor]:
    key_pos = torch.arange(length, device=query_pos.device).view(1, 1, -1)
    causal = key_pos <= query_pos.unsqueeze(-1)
    return {w: (causal if w is None else causal & (key_pos > query_pos.unsqueeze(-1) - w)).unsqueeze(1)
            for w in windows}


class ReferenceBackend:
    name = "reference"
    reads_whole_blocks = False  # gathers written slots and the zero null slot only

    def __init__(self, pool: KVPool, windows: set[int | None]):
        self.pool, self.windows = pool, windows
        self.single: _Group | None = None
        self.multi: _Group | None = None
        self.n_single = 0

    def table_width(self, blocks_per_sequence: int, pool_blocks: int) -> int:
        return blocks_per_sequence

    def plan(self, step: StepPlan, state: BatchState) -> None:
        self.single = self.multi = None
        self.n_single = step.single.count if step.single is not None else 0
        if step.single is not None:
            s = step.single
            ends = s.starts + 1
            self.single = _Group(slot_table(state, s, ends, s.longest_end, self.pool),
                                 _masks(s.longest_end, s.starts.unsqueeze(1), self.windows))
        if step.multi is not None:
            self._plan_multi(step.multi, state)

    def _plan_multi(self, m: Rows, state: BatchState) -> None:
        device = m.rows.device
        j = torch.arange(m.longest_run, device=device).unsqueeze(0)
        within = torch.minimum(j, m.lens.unsqueeze(1) - 1)  # pad queries repeat the row's last
        first = torch.cumsum(m.lens, 0) - m.lens
        self.gather = (first.unsqueeze(1) + within).reshape(-1)
        real = (j < m.lens.unsqueeze(1)).reshape(-1)
        self.scatter = torch.arange(m.count * m.longest_run, device=device)[real]
        self.multi = _Group(slot_table(state, m, m.starts + m.lens, m.longest_end, self.pool),
                            _masks(m.longest_end, m.starts.unsqueeze(1) + within, self.windows))

    def forward(self, q: torch.Tensor, layer: int, window: int | None, scale: float) -> torch.Tensor:
        parts = []
        if self.single is not None:
            parts.append(self._single_rows(q[:self.n_single], layer, window, scale))
        if self.multi is not None:
            parts.append(self._multi_rows(q[self.n_single:], layer, window, scale))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _single_rows(self, q: torch.Tensor, layer: int, window: int | None, scale: float) -> torch.Tensor:
        rows, heads, d = q.shape
        keys, values = self.pool.gather(layer, self.single.table)  # [rows, kv_heads, length, d]
        grouped = q.reshape(rows, keys.shape[1], heads // keys.shape[1], d)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=self.single.masks[window], scale=scale)
        return out.reshape(rows, heads, d)

    def _multi_rows(self, q: torch.Tensor, layer: int, window: int | None, scale: float) -> torch.Tensor:
        group = self.multi
        heads, d = q.shape[1:]
        rows = group.table.shape[0]
        padded = q.index_select(0, self.gather).view(rows, -1, heads, d).transpose(1, 2)
        keys, values = self.pool.gather(layer, group.table)
        out = F.scaled_dot_product_attention(padded, keys, values, attn_mask=group.masks[window], scale=scale,
                                             enable_gqa=keys.shape[1] != heads)
        return out.transpose(1, 2).reshape(-1, heads, d).index_select(0, self.scatter)
