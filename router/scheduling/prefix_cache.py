"""The prefix cache: full KV blocks kept after their request, found again by their exact token ids.

A radix tree whose edges are whole blocks: a node is one full block of `block_size` token ids,
keyed by those ids themselves (a tuple, compared for equality: never trusted by hash alone) under
its parent, so a node stands for the whole prefix from the root to it. The cache holds one
reference to each cached block; a request that reuses a prefix adds its own. Unreferenced cached
blocks (held by the cache alone) are evicted least recently used, leaves first, only when the
allocator runs out of free blocks. After a group restart the shards' pools are empty: `clear`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from shardline.router.scheduling.blocks import BlockAllocator


@dataclass(eq=False)
class Node:
    block: int
    key: tuple[int, ...]
    parent: "Node | None"
    children: dict[tuple[int, ...], "Node"] = field(default_factory=dict)


class PrefixCache:
    def __init__(self, allocator: BlockAllocator):
        self.allocator = allocator
        self.root = Node(-1, (), None)
        self.lru: OrderedDict[Node, None] = OrderedDict()  # oldest first
        allocator.evict = self.evict

    @property
    def cached_blocks(self) -> int:
        return len(self.lru)

    def _keys(self, tokens: list[int], blocks: int) -> list[tuple[int, ...]]:
        bs = self.allocator.block_size
        return [tuple(tokens[i * bs:(i + 1) * bs]) for i in range(blocks)]

    def match(self, tokens: list[int]) -> list[int]:
        """Blocks of the longest cached prefix of `tokens`, leaving at least one token to compute
        (the last token's logits are needed); each returned block gets a reference for the caller."""
        node, found = self.root, []
        for key in self._keys(tokens, (len(tokens) - 1) // self.allocator.block_size):
            node = node.children.get(key)
            if node is None:
                break
            self.lru.move_to_end(node)
            found.append(node.block)
        self.allocator.ref(found)
        return found

    def insert(self, tokens: list[int], blocks: list[int]) -> None:
        """Caches the full blocks of a computed prefix (`blocks[i]` holds tokens[i*bs:(i+1)*bs]).
        A block whose prefix is already cached under another block is left to its owner."""
        node = self.root
        for key, block in zip(self._keys(tokens, len(tokens) // self.allocator.block_size), blocks):
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = Node(block, key, node)
                self.allocator.ref([block])
            self.lru[child] = None
            self.lru.move_to_end(child)
            node = child

    def evict(self, wanted: int) -> int:
        """Frees up to `wanted` blocks that only the cache holds, least recently used leaves first."""
        freed = 0
        for node in list(self.lru):
            if freed >= wanted:
                break
            if node.children or self.allocator.refs[node.block] != 1:
                continue
            self._drop(node)
            freed += 1
            parent = node.parent
            while freed < wanted and parent is not self.root and not parent.children \
                    and self.allocator.refs[parent.block] == 1:
                self._drop(parent)
                freed += 1
                parent = parent.parent
        return freed

    def _drop(self, node: Node) -> None:
        del node.parent.children[node.key]
        del self.lru[node]
        self.allocator.release([node.block])

    def drop_all(self) -> None:
        """Releases every cached block (blocks that requests still use stay theirs)."""
        for node in list(self.lru):
            self.allocator.release([node.block])
        self.clear()

    def clear(self) -> None:
        """Forgets everything (the shards' pools were recreated; the allocator is reset apart)."""
        self.root = Node(-1, (), None)
        self.lru.clear()
