"""`flex` attention: FlexAttention over the paged pool itself, with a block mask from the block tables.

K/V are read in place: a layer's pool [slots, kv_heads, d] is viewed as [1, kv_heads, slots, d]
and broadcast over the rows, and each row's `BlockMask` lists its own blocks (`kv_indices` is the
row of the persistent block table, `kv_num_blocks` its length in blocks), so no [rows, context]
copy is made. The mask works in logical positions: `BatchState.block_logical` gives the logical
index of each physical block (a shared prefix block sits at the same index in every row that
reads it), so a key's position is `block_logical[slot // bs] * bs + slot % bs`, compared with the
query's position (and its window). The kernel reads a row's last block whole, masked past
its length, so the engine zeroes each block when a step appends it (the pool is uninitialised). Without a window every block of a decode row but its last is
a full block, which the kernel reads with no mask at all.

Flex runs compiled (on CPU it has no eager kernel); the compiled call is cached per shape by
torch.compile. The CPU kernel needs `kv_indices` as wide as the pool in blocks, which is why this
backend asks the block tables for that width.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from shardline.shard.batch_state import BatchState
from shardline.shard.kv_cache import KVPool
from shardline.shard.step import Rows, StepPlan

NO_WINDOW = 1 << 30


def _kernel(window: int, block: int, scale: float):
    """The compiled flex call for one (window, block size, scale); shapes stay dynamic."""
    def attend(q, k, v, kv_num, kv_idx, full_num, full_idx, logical, starts, lens):
        # q [rows, heads, queries, d]; k, v [rows (broadcast), kv_heads, slots, d]
        def mask_mod(b, h, q_idx, kv_idx):
            key_pos = logical[kv_idx // block] * block + kv_idx % block
            query_pos = starts[b] + torch.minimum(q_idx, lens[b] - 1)
            return (key_pos <= query_pos) & (key_pos > query_pos - window)

        q_len, kv_len = q.shape[2], k.shape[2]
        mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(q_len, block),
                                        mask_mod=mask_mod, seq_lengths=(q_len, kv_len))
        return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])

    return torch.compile(attend, dynamic=True)


_KERNELS: dict[tuple[int, int, float], object] = {}


def kernel(window: int, block: int, scale: float):
    key = (window, block, scale)
    if key not in _KERNELS:
        _KERNELS[key] = _kernel(*key)
    return _KERNELS[key]


class _RowMask:
    """The block-mask tensors of one kind of rows, for windowed and unwindowed layers."""

    def __init__(self, state: BatchState, rows: Rows, block: int, split_full: bool):
        ends = rows.starts + rows.lens
        blocks = torch.div(ends + block - 1, block, rounding_mode="floor").int()
        table = state.tables.index_select(0, rows.rows).view(rows.count, 1, 1, -1)
        self.starts, self.lens = rows.starts, rows.lens
        self.all = (blocks.view(-1, 1, 1), table, None, None)
        if split_full:  # decode rows: every block but the last needs no mask when there is no window
            last = (blocks - 1).long().view(-1, 1)
            tail = table.view(rows.count, -1).gather(1, last).view(-1, 1, 1, 1).expand_as(table).contiguous()
            self.split = (torch.ones_like(blocks).view(-1, 1, 1), tail, (blocks - 1).view(-1, 1, 1), table)
        else:
            self.split = self.all


class FlexBackend:
    name = "flex"
    # The kernel reads a row's last block whole (masked past the row's length), and the pool is
    # uninitialised memory: 0 * NaN would poison the output, so fresh blocks are zeroed first.
    reads_whole_blocks = True

    def __init__(self, pool: KVPool, windows: set[int | None]):
        # Every pool size and row count is a shape the kernel may see; hitting dynamo's limit would
        # silently fall back to eager flex (which materialises the scores): raise it, and fail loudly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        self.pool, self.windows = pool, windows
        self.kv_len = pool.num_blocks * pool.block_size
        self.single: _RowMask | None = None
        self.multi: _RowMask | None = None

    def table_width(self, blocks_per_sequence: int, pool_blocks: int) -> int:
        return max(blocks_per_sequence, pool_blocks)

    def plan(self, step: StepPlan, state: BatchState) -> None:
        bs = self.pool.block_size
        self.logical = state.block_logical
        self.n_single = step.single.count if step.single is not None else 0
        self.single = _RowMask(state, step.single, bs, True) if step.single is not None else None
        self.multi = _RowMask(state, step.multi, bs, False) if step.multi is not None else None
        if step.multi is not None:
            m = step.multi
            j = torch.arange(m.longest_run, device=m.rows.device).unsqueeze(0)
            first = torch.cumsum(m.lens, 0) - m.lens
            self.gather = (first.unsqueeze(1) + torch.minimum(j, m.lens.unsqueeze(1) - 1)).reshape(-1)
            real = (j < m.lens.unsqueeze(1)).reshape(-1)
            self.scatter = torch.arange(m.count * m.longest_run, device=m.rows.device)[real]

    def _kv(self, layer: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.pool.k[layer, :self.kv_len].permute(1, 0, 2).unsqueeze(0).expand(rows, -1, -1, -1)
        v = self.pool.v[layer, :self.kv_len].permute(1, 0, 2).unsqueeze(0).expand(rows, -1, -1, -1)
        return k, v

    def _run(self, q: torch.Tensor, layer: int, rm: _RowMask, window: int | None, scale: float) -> torch.Tensor:
        k, v = self._kv(layer, q.shape[0])
        masks = rm.split if window is None else rm.all
        attend = kernel(window or NO_WINDOW, self.pool.block_size, scale)
        return attend(q, k, v, *masks, self.logical, rm.starts, rm.lens)

    def forward(self, q: torch.Tensor, layer: int, window: int | None, scale: float) -> torch.Tensor:
        heads, d = q.shape[1:]
        parts = []
        if self.single is not None:
            single = q[:self.n_single].unsqueeze(2)  # [rows, heads, 1, d]
            parts.append(self._run(single, layer, self.single, window, scale).squeeze(2))
        if self.multi is not None:
            rows = self.multi.lens.shape[0]
            padded = q[self.n_single:].index_select(0, self.gather).view(rows, -1, heads, d).transpose(1, 2)
            out = self._run(padded.contiguous(), layer, self.multi, window, scale)
            parts.append(out.transpose(1, 2).reshape(-1, heads, d).index_select(0, self.scatter))
        return parts[0] if len(parts) == 1 else torch.cat(parts)
