"""The prefix cache: full KV blocks kept after their request, found again by their exact token ids.

A radix tree whose edges are whole blocks: a node is one full block of `block_size` token ids,
keyed by those ids themselves (a tuple, compared for equality: never trusted by hash alone) under
its parent, so a node stands for the whole prefix from the root to it. The cache holds one
reference to each cached block; a request that reuses a prefix adds its own.

Every request holding a cached block also holds all its ancestors (a request's blocks enter the
tree only below blocks it holds itself; where another request already cached the same prefix under
other blocks, the request stops caching there). So the blocks only the cache holds are exactly the
ones eviction can free, leaves first, and their count (`evictable`) is kept as reference counts
change (the allocator tells `idle` / `busy`). Evictable leaves sit in an LRU (an OrderedDict,
oldest first): eviction pops the oldest, O(1) per block; a parent left childless joins at the old
end, as it was used no later than its child. Eviction happens only when the allocator runs dry
and free + evictable blocks cover what it was asked for. After a group restart: `clear`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from shardline.router.scheduling.blocks import BlockAllocator


@dataclass(eq=False)
class Node:
    block: int
    key: tuple[int, ...]
    parent: "Node | None"
    children: dict[tuple[int, ...], "Node"] = field(default_factory=dict)
    alive: bool = True  # False once dropped from the tree (a request's cursor may still name it)


class PrefixCache:
    def __init__(self, allocator: BlockAllocator):
        self.allocator = allocator
        allocator.watcher = self
        self.clear()

    # -- what the allocator asks -----------------------------------------------------------------
    @property
    def evictable(self) -> int:
        """Cached blocks no request holds (every one of them can be evicted, leaves first)."""
        return self._idle

    def idle(self, block: int) -> None:
        node = self.nodes[block]
        self._idle += 1
        if not node.children:
            self.leaves[node] = None

    def busy(self, block: int) -> None:
        self._idle -= 1
        self.leaves.pop(self.nodes[block], None)

    def evict(self, wanted: int) -> int:
        """Frees up to `wanted` blocks only the cache holds, least recently used leaves first."""
        freed = 0
        while freed < wanted and self.leaves:
            node, _ = self.leaves.popitem(last=False)
            parent = node.parent
            self._drop(node)
            freed += 1
            if parent is not self.root and not parent.children and self.allocator.refs[parent.block] == 1:
                self.leaves[parent] = None
                self.leaves.move_to_end(parent, last=False)
        return freed

    # -- what the scheduler asks -----------------------------------------------------------------
    @property
    def cached_blocks(self) -> int:
        return len(self.nodes)

    def _keys(self, tokens: list[int], blocks: int) -> list[tuple[int, ...]]:
        bs = self.allocator.block_size
        return [tuple(tokens[i * bs:(i + 1) * bs]) for i in range(blocks)]

    def match(self, tokens: list[int]) -> tuple[list[int], Node]:
        """Blocks of the longest cached prefix of `tokens`, leaving at least one token to compute
        (the last token's logits are needed), each with a reference for the caller, and the node
        of the last one (where the caller's own blocks continue: `extend`)."""
        node, found = self.root, []
        for key in self._keys(tokens, (len(tokens) - 1) // self.allocator.block_size):
            child = node.children.get(key)
            if child is None:
                break
            node = child
            found.append(node.block)
        self.allocator.ref(found)
        return found, node

    def extend(self, at: Node, keys: Iterable[tuple[int, ...]], blocks: Iterable[int]) -> Node | None:
        """Caches the caller's next full blocks below `at` (a node whose prefix the caller holds).
        Returns the node to continue from, or None where the caller's blocks stop being cacheable
        (the prefix is cached under other blocks, or `at` was dropped)."""
        if not at.alive:
            return None
        node = at
        for key, block in zip(keys, blocks):
            child = node.children.get(key)
            if child is not None and child.block != block:
                return None
            if child is None:
                child = self._add(node, key, block)
            node = child
        return node

    def insert(self, tokens: list[int], blocks: list[int]) -> Node | None:
        """Caches the full blocks of a computed prefix (`blocks[i]` holds tokens[i*bs:(i+1)*bs])."""
        return self.extend(self.root, self._keys(tokens, len(tokens) // self.allocator.block_size), blocks)

    def _add(self, parent: Node, key: tuple[int, ...], block: int) -> Node:
        self.allocator.ref([block])
        child = parent.children[key] = Node(block, key, parent)
        self.nodes[block] = child
        self.allocator.watched[block] = 1
        self.leaves.pop(parent, None)  # no longer a leaf
        if self.allocator.refs[block] == 1:  # the caller did not hold it
            self.idle(block)
        return child

    def _drop(self, node: Node) -> None:
        del node.parent.children[node.key]
        del self.nodes[node.block]
        node.alive = False
        self.allocator.watched[node.block] = 0
        self._idle -= 1
        self.allocator.release([node.block])

    def drop_all(self) -> None:
        """Releases every cached block (blocks that requests still use stay theirs)."""
        nodes = list(self.nodes.values())
        for node in nodes:
            node.alive = False
            self.allocator.watched[node.block] = 0
        self.allocator.release([n.block for n in nodes])
        self.clear()

    def clear(self) -> None:
        """Forgets everything (the shards' pools were recreated; the allocator is reset apart)."""
        for node in getattr(self, "nodes", {}).values():
            node.alive = False
        self.root = Node(-1, (), None)
        self.nodes: dict[int, Node] = {}
        self.leaves: OrderedDict[Node, None] = OrderedDict()  # evictable leaves, oldest first
        self._idle = 0
