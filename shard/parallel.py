"""ParallelState: this rank's place in the tensor/pipeline-parallel group, and its collectives.

One small frozen object, created once by `init_parallel` and passed as a handle to every layer;
no module-level globals. Ranks are laid out pipeline-major: rank = pp_rank * tp_size + tp_rank, so
each stage's TP ranks are contiguous. At size 1 every collective is a no-op and no process group
is created at all. With one pipeline stage the TP group is the world group itself (no second
communicator). Only the sampling rank receives full logits (a gather, not an all-gather), and
the sampled tokens are broadcast over the device group, so on CUDA they never leave the GPU
until the reply is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from shardline.shard.config import GroupConfig
from shardline.shard.devices import gpu_for
from shardline.shard.group_network import rendezvous_store


@dataclass(frozen=True)
class ParallelState:
    rank: int
    tp_size: int
    pp_size: int
    device: torch.device
    backend: str  # "none" at world size 1, else "gloo" or "nccl"
    tp_group: dist.ProcessGroup | None = None

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_rank(self) -> int:
        """Same TP rank on the previous pipeline stage."""
        return self.rank - self.tp_size

    @property
    def next_rank(self) -> int:
        """Same TP rank on the next pipeline stage."""
        return self.rank + self.tp_size

    @property
    def sampling_rank(self) -> int:
        """The rank that samples and broadcasts tokens: TP rank 0 of the last stage."""
        return (self.pp_size - 1) * self.tp_size

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.all_reduce(t, group=self.tp_group)
        return t

    def gather_last_dim_to_sampler(self, t: torch.Tensor) -> torch.Tensor | None:
        """The TP ranks' slices concatenated on the last dim, on the sampling rank only (None elsewhere)."""
        if self.tp_size == 1:
            return t
        dst = self.sampling_rank
        parts = [torch.empty_like(t) for _ in range(self.tp_size)] if self.rank == dst else None
        dist.gather(t.contiguous(), parts, dst=dst, group=self.tp_group)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def send_next(self, t: torch.Tensor) -> None:
        dist.send(t.contiguous(), dst=self.next_rank)

    def recv_prev(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(t, src=self.prev_rank)
        return t

    def broadcast_from_sampler(self, t: torch.Tensor) -> torch.Tensor:
        """Broadcasts a small tensor (on this rank's device) from the sampling rank to every rank."""
        if self.world_size > 1:
            dist.broadcast(t, src=self.sampling_rank)
        return t

    def destroy(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(device: str, local_rank: int) -> torch.device:
    """'cuda' means one GPU per rank of this node: local rank i takes the i-th GPU torch sees
    (CUDA_VISIBLE_DEVICES chooses them); 'cuda:N' and 'cpu' are taken as given."""
    count = torch.cuda.device_count() if device == "cuda" else 0
    return torch.device(gpu_for(device, local_rank, count))


def init_parallel(group: GroupConfig, device: str) -> ParallelState:
    """Joins the torch.distributed group (if any) and builds this rank's ParallelState."""
    group.validate()
    dev = resolve_device(device, group.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if group.world_size == 1:
        return ParallelState(group.rank, 1, 1, dev, "none")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    timeout = timedelta(seconds=group.collective_timeout_s)
    # The store listens only where --group-interface says (shard/group_network.py).
    dist.init_process_group(backend, store=rendezvous_store(group), rank=group.rank, world_size=group.world_size,
                            timeout=timeout)
    # Every rank must create every group, in the same order.
    tp_group = None  # the world group when there is one stage
    for stage in range(group.pp_size if group.pp_size > 1 else 0):
        ranks = list(range(stage * group.tp_size, (stage + 1) * group.tp_size))
        g = dist.new_group(ranks, timeout=timeout)
        if group.rank in ranks:
            tp_group = g
    return ParallelState(group.rank, group.tp_size, group.pp_size, dev, backend, tp_group)
