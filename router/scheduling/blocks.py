"""The KV block allocator: the single source of truth for which blocks of the shards' pools are used.

Blocks are numbered 0..num_blocks-1, the same on every rank (the router uses the smallest pool any
rank reported). A block is free or referenced by one or more requests (reference counts let the
prefix cache share full blocks); it returns to the free list when its last reference goes. After a
group restart the shards' pools are empty, and `reset` says so here.

Blocks the prefix cache holds are `watched`: when such a block's count falls to 1 (only the cache
holds it) or rises from 1, the `watcher` hears of it, so the cache knows in O(1) how many blocks it
could give back. `allocate` asks for eviction only when free + evictable blocks cover the request:
a failed allocation never destroys cached blocks for nothing.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol


class Watcher(Protocol):
    """What the prefix cache offers the allocator."""

    @property
    def evictable(self) -> int: ...
    def evict(self, wanted: int) -> int: ...
    def idle(self, block: int) -> None: ...  # only the cache holds it now
    def busy(self, block: int) -> None: ...  # a request took it from the cache


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs blocks, got {num_blocks} blocks of {block_size} tokens")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.watched = bytearray(num_blocks)  # 1 where the prefix cache holds a reference
        self.watcher: Watcher | None = None

    @property
    def free(self) -> int:
        return len(self.free_ids)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free_ids)

    @property
    def available(self) -> int:
        """Blocks an allocation may get: free ones plus those only the prefix cache holds."""
        return len(self.free_ids) + (self.watcher.evictable if self.watcher is not None else 0)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens."""
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (each with one reference), or None with nothing taken and nothing
        evicted when fewer than n are free even counting the cache's unreferenced blocks."""
        if n > len(self.free_ids):
            if n > self.available:
                return None
            self.watcher.evict(n - len(self.free_ids))
            if n > len(self.free_ids):
                raise RuntimeError(f"the prefix cache counted {self.watcher.evictable} evictable blocks "
                                   f"but freed too few for {n}")
        out = [self.free_ids.popleft() for _ in range(n)]
        for b in out:
            self.refs[b] = 1
        return out

    def ref(self, blocks: list[int]) -> None:
        """One more reference to each (already used) block."""
        refs, watched = self.refs, self.watched
        for b in blocks:
            if refs[b] < 1:
                raise ValueError(f"block {b} is free: it cannot be shared")
            refs[b] += 1
            if refs[b] == 2 and watched[b]:
                self.watcher.busy(b)

    def release(self, blocks: list[int]) -> None:
        """Drops one reference to each block; blocks left unreferenced are free again."""
        refs, watched = self.refs, self.watched
        for b in blocks:
            if refs[b] < 1:
                raise ValueError(f"block {b} released more often than allocated")
            refs[b] -= 1
            if refs[b] == 0:
                self.free_ids.append(b)
            elif refs[b] == 1 and watched[b]:
                self.watcher.idle(b)

    def reset(self) -> None:
        """Every block free (the shards' pools were recreated)."""
        self.refs = [0] * self.num_blocks
        self.free_ids = deque(range(self.num_blocks))
        self.watched = bytearray(self.num_blocks)
