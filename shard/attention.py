"""Attention for a whole step in one call per layer, reading K/V from the block pool.

The step's tokens are flat ([tokens, heads, head_dim], no padding) with the single-token rows
(decodes) first and the multi-token rows (prefill chunks) after them. `StepContext` is built once
per step (by `shard.step`): slots to write, slot tables to gather each row's context through, and
the boolean masks, so a layer runs a fixed number of torch ops whatever the batch holds:

- single-token rows: the query heads sharing a KV head form the query axis of one SDPA call over
  [rows, kv_heads, context, head_dim] (no repeated keys for GQA), masked to each row's length;
- multi-token rows: queries padded to the longest chunk, one SDPA call with a causal mask that
  starts at each row's cached length (chunked prefill and prefix reuse are the same case).

SDPA's fused CPU/CUDA kernels take the boolean mask directly, so no [n, n] score matrix is
materialised per head. Sliding-window layers use masks cut to their window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from shardline.shard.kv_cache import KVPool


@dataclass
class RowGroup:
    """Rows of one kind: slot tables to gather [rows, length] and masks per attention window."""

    table: torch.Tensor
    masks: dict[int | None, torch.Tensor]

    @property
    def rows(self) -> int:
        return self.table.shape[0]


@dataclass
class StepContext:
    """Layout of one forward step, shared by every layer."""

    pool: KVPool
    slots: torch.Tensor  # [tokens] where each new token's K/V goes
    cos: torch.Tensor
    sin: torch.Tensor
    single: RowGroup | None  # the first `single.rows` tokens, one per row
    multi: RowGroup | None  # the remaining tokens, in padded [rows, q_max] layout
    multi_gather: torch.Tensor | None = None  # [rows * q_max] index into the multi tokens (pad: any)
    multi_scatter: torch.Tensor | None = None  # [multi tokens] index into the padded layout
    sample_rows: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


def _single_rows(q: torch.Tensor, pool: KVPool, layer: int, group: RowGroup, window: int | None,
                 scale: float) -> torch.Tensor:
    rows, heads, d = q.shape
    keys, values = pool.gather(layer, group.table)  # [rows, kv_heads, length, d]
    grouped = q.reshape(rows, keys.shape[1], heads // keys.shape[1], d)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=group.masks[window], scale=scale)
    return out.reshape(rows, heads, d)


def _multi_rows(q: torch.Tensor, pool: KVPool, layer: int, ctx: StepContext, window: int | None,
                scale: float) -> torch.Tensor:
    group = ctx.multi
    heads, d = q.shape[1:]
    padded = q.index_select(0, ctx.multi_gather).view(group.rows, -1, heads, d).transpose(1, 2)
    keys, values = pool.gather(layer, group.table)
    out = F.scaled_dot_product_attention(padded, keys, values, attn_mask=group.masks[window], scale=scale,
                                         enable_gqa=keys.shape[1] != heads)
    return out.transpose(1, 2).reshape(-1, heads, d).index_select(0, ctx.multi_scatter)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, ctx: StepContext,
           scale: float, window: int | None = None) -> torch.Tensor:
    """q: [tokens, heads, d]; k, v: [tokens, kv_heads, d] (the step's new tokens, written to the pool
    first). Returns [tokens, heads, d]. `window`: this layer's sliding window (None: full)."""
    ctx.pool.write(layer, ctx.slots, k, v)
    n_single = ctx.single.rows if ctx.single is not None else 0
    parts = []
    if ctx.single is not None:
        parts.append(_single_rows(q[:n_single], ctx.pool, layer, ctx.single, window, scale))
    if ctx.multi is not None:
        parts.append(_multi_rows(q[n_single:], ctx.pool, layer, ctx, window, scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
