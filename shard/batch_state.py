"""The shard's persistent per-sequence state on the device, updated by each step's deltas.

Every live sequence owns one row of a few device tensors that outlive the step:

- `tables[row]`: its KV block table (block ids in logical order); a step appends only the blocks
  its `new_blocks` name, with one indexed write for the whole step;
- `computed[row]`: how many of its tokens have K/V in the pool, advanced after every forward;
- `last_token[row]`: the token it sampled last, which the next decode runs without the host
  touching it;
- `fresh_blocks`: the blocks the last step appended that hold no K/V yet (not a cached prefix);
- `block_logical[block]`: the logical index a physical block holds in the rows that read it (a
  shared prefix block sits at the same index in all of them), for backends that mask by position;
- `seen[row]` (only once a request asks for a repetition penalty): which token ids it has run or
  sampled, set incrementally as tokens are run.

Rows are recycled through a free list and the tensors grow by doubling when more sequences are live
than rows exist; nothing is rebuilt from Python lists per step.
"""

from __future__ import annotations

import torch

from shardline.proto import shard_pb2
from shardline.shard.sequences import Sequence


class BatchState:
    def __init__(self, width: int, num_blocks: int, vocab_size: int, device: torch.device, rows: int = 64,
                 block_size: int = 16):
        self.width, self.vocab_size, self.device, self.block_size = width, vocab_size, device, block_size
        self.fresh_blocks: list[int] = []  # blocks the last step appended that hold nothing yet
        self.block_logical = torch.zeros(max(1, num_blocks), dtype=torch.long, device=device)
        self.tables = torch.zeros(rows, width, dtype=torch.int32, device=device)
        self.computed = torch.zeros(rows, dtype=torch.long, device=device)
        self.last_token = torch.zeros(rows, dtype=torch.long, device=device)
        self.seen: torch.Tensor | None = None
        self.row_of: dict[int, int] = {}
        self._free = list(range(rows - 1, -1, -1))

    @property
    def capacity(self) -> int:
        return self.tables.shape[0]

    def clear(self) -> None:
        self.row_of.clear()
        self._free = list(range(self.capacity - 1, -1, -1))

    def apply(self, step: shard_pb2.StepRequest, work: list[tuple[Sequence, list[int], bool]]) -> None:
        """Applies a checked step's frees, starts and block deltas (after `Sequences.apply`)."""
        for seq_id in step.free:
            self._free.append(self.row_of.pop(seq_id))
        starts = list(step.start)
        if len(self._free) < len(starts):
            self._grow(len(self.row_of) + len(starts))
        new_rows = [self._take(s.id) for s in starts]
        if starts:
            rows = torch.tensor(new_rows, dtype=torch.long, device=self.device)
            self.computed.index_put_((rows,), torch.tensor([len(s.cached_token_ids) for s in starts],
                                                           dtype=torch.long, device=self.device))
            if self.seen is not None or any(s.sampling.repetition_penalty not in (0.0, 1.0) for s in starts):
                self._mark_cached(rows, starts)
        self._append_blocks(step.work, work)

    def _take(self, seq_id: int) -> int:
        row = self._free.pop()
        self.row_of[seq_id] = row
        return row

    def _grow(self, needed: int) -> None:
        old = self.capacity
        new = max(needed, 2 * old)
        self.tables = torch.cat([self.tables, self.tables.new_zeros(new - old, self.width)])
        self.computed = torch.cat([self.computed, self.computed.new_zeros(new - old)])
        self.last_token = torch.cat([self.last_token, self.last_token.new_zeros(new - old)])
        if self.seen is not None:
            self.seen = torch.cat([self.seen, self.seen.new_zeros(new - old, self.vocab_size)])
        self._free = list(range(new - 1, old - 1, -1)) + self._free

    def _append_blocks(self, deltas, work: list[tuple[Sequence, list[int], bool]]) -> None:
        """One indexed write of every block the step appends (per block, never per token)."""
        rows, cols, blocks, fresh = [], [], [], []
        for w, (seq, _, _) in zip(deltas, work):
            added = w.new_blocks
            if added:
                row = self.row_of[seq.id]
                first = len(seq.blocks) - len(added)
                rows += [row] * len(added)
                cols += range(first, first + len(added))
                blocks += added
                full = seq.computed // self.block_size  # blocks already written (a cached prefix)
                fresh += added[max(0, full - first):]
        self.fresh_blocks = fresh
        if blocks:
            index = (torch.tensor(rows, dtype=torch.long, device=self.device),
                     torch.tensor(cols, dtype=torch.long, device=self.device))
            ids = torch.tensor(blocks, dtype=torch.long, device=self.device)
            self.tables.index_put_(index, ids.int())
            self.block_logical.index_copy_(0, ids, index[1])

    def _mark_cached(self, rows: torch.Tensor, starts: list[shard_pb2.NewSequence]) -> None:
        if self.seen is None:
            self.seen = torch.zeros(self.capacity, self.vocab_size, dtype=torch.bool, device=self.device)
        self.seen.index_fill_(0, rows, False)
        cached = [list(s.cached_token_ids) for s in starts]
        lens = torch.tensor([len(c) for c in cached], device=self.device)
        ids = torch.tensor([t for c in cached for t in c], dtype=torch.long, device=self.device)
        self.seen[rows.repeat_interleave(lens), ids] = True

    def mark_run(self, token_rows: torch.Tensor, ids: torch.Tensor) -> None:
        """Records the step's run tokens in `seen` (a no-op until a penalty was asked for)."""
        if self.seen is not None:
            self.seen[token_rows, ids] = True

    def advance(self, rows: torch.Tensor, run_lens: torch.Tensor) -> None:
        self.computed.index_add_(0, rows, run_lens)

    def record_sampled(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        self.last_token.index_copy_(0, rows, tokens)
