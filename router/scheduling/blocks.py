"""The KV block allocator: the single source of truth for which blocks of the shards' pools are used.

Blocks are numbered 0..num_blocks-1, the same on every rank (the router uses the smallest pool any
rank reported). A block is free or referenced by one or more requests (reference counts let the
prefix cache share full blocks); it returns to the free list when its last reference goes. After a
group restart the shards' pools are empty, and `reset` says so here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs blocks, got {num_blocks} blocks of {block_size} tokens")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        # Frees up to n blocks held only by the prefix cache; returns how many it freed.
        self.evict: Callable[[int], int] | None = None

    @property
    def free(self) -> int:
        return len(self.free_ids)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free_ids)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens."""
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (each with one reference), or None (and nothing taken) if fewer are free
        even after evicting unreferenced cached blocks."""
        if n > len(self.free_ids) and self.evict is not None:
            self.evict(n - len(self.free_ids))
        if n > len(self.free_ids):
            return None
        out = [self.free_ids.popleft() for _ in range(n)]
        for b in out:
            self.refs[b] = 1
        return out

    def ref(self, blocks: list[int]) -> None:
        """One more reference to each (already used) block."""
        for b in blocks:
            if self.refs[b] < 1:
                raise ValueError(f"block {b} is free: it cannot be shared")
            self.refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        """Drops one reference to each block; blocks left unreferenced are free again."""
        for b in blocks:
            if self.refs[b] < 1:
                raise ValueError(f"block {b} released more often than allocated")
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free_ids.append(b)

    def reset(self) -> None:
        """Every block free (the shards' pools were recreated)."""
        self.refs = [0] * self.num_blocks
        self.free_ids = deque(range(self.num_blocks))
