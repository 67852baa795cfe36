"""The attention backend interface: planned once per step, run once per layer over the paged pool.

A backend's `plan(step)` turns the step's plan (rows, their starts and lengths, the persistent
block tables) into whatever its kernels read (slot tables and masks, or block masks); `forward`
then writes the layer's new K/V at their slots and attends, with a fixed number of torch ops per
layer whatever the batch holds. Backends (`--attention-backend`):

- `reference` (`shard/attention_reference.py`): K/V gathered through slot tables + SDPA; the
  readable oracle every other backend is checked against;
- `flex` (`shard/attention_flex.py`): FlexAttention over the pool itself with a block mask built
  from the block tables, reading K/V in place (no [rows, context] copy); compiled on CPU and CUDA.

`auto` picks `reference` on CPU, where it measured faster at serving shapes (BENCHMARKS.md), and
`flex` on CUDA. `attend` is what the model calls; `StepContext` is what it passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from shardline.shard.batch_state import BatchState
from shardline.shard.kv_cache import KVPool
from shardline.shard.step import StepPlan

from shardline.shard.config import ATTENTION_BACKENDS as BACKENDS


class AttentionBackend(Protocol):
    name: str
    reads_whole_blocks: bool  # its kernels read unwritten slots of a block: the engine zeroes new blocks

    def table_width(self, blocks_per_sequence: int, pool_blocks: int) -> int:
        """Columns the persistent block tables need for this backend."""

    def plan(self, step: StepPlan, state: BatchState) -> None:
        """Prepares what every layer of this step reads; called once per step."""

    def forward(self, q: torch.Tensor, layer: int, window: int | None, scale: float) -> torch.Tensor:
        """q [tokens, heads, d] of the planned step (K/V already written) -> [tokens, heads, d]."""


@dataclass
class StepContext:
    """Layout of one forward step, shared by every layer."""

    pool: KVPool
    plan: StepPlan
    backend: AttentionBackend
    cos: torch.Tensor
    sin: torch.Tensor


@torch.compiler.disable  # where a compiled layer stack's graphs end: the kernels are the backend's
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, ctx: StepContext,
           scale: float, window: int | None = None) -> torch.Tensor:
    """q: [tokens, heads, d]; k, v: [tokens, kv_heads, d] (the step's new tokens, written to the pool
    first). Returns [tokens, heads, d]. `window`: this layer's sliding window (None: full)."""
    ctx.pool.write(layer, ctx.plan.slots, k, v)
    return ctx.backend.forward(q, layer, window, scale)


def resolve(name: str, device: torch.device) -> str:
    """The backend `auto` stands for on this device."""
    if name == "auto":
        return "flex" if device.type == "cuda" else "reference"
    if name not in BACKENDS:
        raise ValueError(f"--attention-backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def make_backend(name: str, pool: KVPool, windows: set[int | None]) -> AttentionBackend:
    if name == "flex":
        from shardline.shard.attention_flex import FlexBackend
        return FlexBackend(pool, windows)
    from shardline.shard.attention_reference import ReferenceBackend
    return ReferenceBackend(pool, windows)
