"""KV cache: one preallocated slab per sequence, sized prompt + max_new_tokens at prefill.

A sequence's slab never moves: joining batches, filtering them and decoding only pass references,
so no step copies any sequence's KV. Dropping the last reference frees it at once. The capacity
the router may fill (in tokens) comes from free memory and the bytes one token costs here.
"""

from __future__ import annotations

from pathlib import Path

import torch


class SequenceKV:
    """Keys and values of one sequence for this rank's layers: [layers, kv_heads, capacity, head_dim]."""

    def __init__(self, layers: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (layers, kv_heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0  # tokens already written for every layer

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends k/v ([n, kv_heads, head_dim]) at `length` for one layer; returns the whole prefix."""
        end = self.length + k.shape[0]
        if end > self.capacity:
            raise RuntimeError(f"sequence KV overflow: {end} tokens > capacity {self.capacity}")
        self.k[layer, :, self.length:end] = k.transpose(0, 1)
        self.v[layer, :, self.length:end] = v.transpose(0, 1)
        return self.k[layer, :, :end], self.v[layer, :, :end]


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


def capacity_tokens(per_token: int, device: torch.device, fraction: float) -> int:
    """Tokens of KV that fit in `fraction` of the free memory."""
    if per_token == 0:  # a rank with no layers holds no KV
        return 2**62
    return int(free_memory_bytes(device) * fraction) // per_token
