"""KV cache: a preallocated pool of fixed-size blocks per layer, written and read through slots.

The pool of this rank's layers is one tensor per K and V, [layers, blocks * block_size + 1, kv_heads,
head_dim]: a token's slot is `block * block_size + offset`; the one slot after the blocks is the
null slot, always zero, that padded gathers read. The pool is allocated uninitialised (zeroing
gigabytes would stall startup), so only written slots and the null slot may ever be gathered. The router decides which blocks each
sequence owns; the engine only writes the slots of the step's new tokens and gathers the slots of
each sequence's context. The pool is sized once, at Warmup, from free memory (or a fixed token
count), and never grows or moves.
"""

from __future__ import annotations

from pathlib import Path

import torch


class KVPool:
    """Keys and values of `num_blocks` blocks of `block_size` tokens for this rank's layers."""

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (layers, num_blocks * block_size + 1, kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.null_slot = num_blocks * block_size
        self.k[:, self.null_slot] = 0
        self.v[:, self.null_slot] = 0
        self.num_blocks, self.block_size = num_blocks, block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores the step's new keys/values ([tokens, kv_heads, head_dim]) at their slots."""
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def zero_blocks(self, blocks: list[int]) -> None:
        """Zeroes whole blocks of every layer (for kernels that read a block's unwritten slots)."""
        if blocks:
            ids = torch.tensor(blocks, dtype=torch.long, device=self.k.device)
            slots = (ids.unsqueeze(1) * self.block_size + torch.arange(self.block_size, device=ids.device)).view(-1)
            self.k.index_fill_(1, slots, 0)
            self.v.index_fill_(1, slots, 0)

    def gather(self, layer: int, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at a [rows, length] slot table, as [rows, kv_heads, length, head_dim]."""
        rows, length = table.shape
        flat = table.reshape(-1)
        k = self.k[layer].index_select(0, flat).view(rows, length, *self.k.shape[2:])
        v = self.v[layer].index_select(0, flat).view(rows, length, *self.v.shape[2:])
        return k.transpose(1, 2), v.transpose(1, 2)


def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """KV bytes one token costs on this rank (keys and values of every local layer)."""
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def free_memory_bytes(device: torch.device, meminfo: Path = Path("/proc/meminfo")) -> int:
    """Memory the KV cache could take: free GPU memory, or MemAvailable of the host on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no MemAvailable in {meminfo}")


def pool_blocks(per_token: int, block_size: int, free_bytes: int, fraction: float,
                max_tokens: int = 0) -> int:
    """Blocks that fit in `fraction` of `free_bytes`, capped at `max_tokens` (0: no cap)."""
    if per_token == 0:  # a rank with no layers holds no KV: it never limits the pool
        blocks = 2**31
    else:
        blocks = int(free_bytes * fraction) // (per_token * block_size)
    if max_tokens:
        blocks = min(blocks, max_tokens // block_size)
    return blocks
