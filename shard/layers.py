"""Tensor-parallel layers. Each layer's `load_param` narrows a checkpoint tensor to this rank's
slice, so a rank reads only the bytes it holds.

`load_param(leaf, param, tensor_slice, shard_id)` receives the parameter's name within the layer
("weight", "bias"), a safetensors slice (indexable like a tensor, read lazily) and the part of a
fused parameter being loaded (None when not fused). Loaders live on the modules, not on the
parameters, because materializing a meta-device model replaces the parameter objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardline.shard.parallel import ParallelState


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor's rows inside a fused column-parallel weight, for this rank."""

    shard_id: Any  # "q"/"k"/"v", 0/1, or None for an unfused layer
    start: int  # first row of the checkpoint tensor this rank holds
    size: int  # rows this rank holds


def even_part(shard_id: Any, full: int, ps: ParallelState, what: str) -> Part:
    if full % ps.tp_size:
        raise ValueError(f"{what} = {full} is not divisible by the tensor-parallel size {ps.tp_size}")
    size = full // ps.tp_size
    return Part(shard_id, ps.tp_rank * size, size)


def load_full(param: nn.Parameter, tensor_slice) -> None:
    """A parameter every rank holds whole (norms, biases added after the all-reduce)."""
    param.data.copy_(tensor_slice[:])


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows; the output stays split across TP ranks."""

    def __init__(self, in_features: int, parts: list[Part], bias: bool, dtype: torch.dtype):
        super().__init__()
        self.parts = {p.shard_id: p for p in parts}
        self.offsets, offset = {}, 0
        for p in parts:
            self.offsets[p.shard_id] = offset
            offset += p.size
        self.weight = _param(offset, in_features, dtype=dtype)
        self.bias = _param(offset, dtype=dtype) if bias else None

    def expected_parts(self, leaf: str) -> tuple[Any, ...]:
        return tuple(self.parts)

    def load_param(self, leaf: str, param: nn.Parameter, tensor_slice, shard_id: Any) -> None:
        part, offset = self.parts[shard_id], self.offsets[shard_id]
        param.data[offset:offset + part.size].copy_(tensor_slice[part.start:part.start + part.size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def qkv_parts(num_heads: int, num_kv_heads: int, head_dim: int, ps: ParallelState) -> list[Part]:
    """Q split by heads; K/V split by KV heads, or replicated when there are fewer KV heads than ranks."""
    tp, rank = ps.tp_size, ps.tp_rank
    if num_heads % tp:
        raise ValueError(f"num_attention_heads = {num_heads} is not divisible by the tensor-parallel size {tp}")
    q = Part("q", rank * num_heads // tp * head_dim, num_heads // tp * head_dim)
    if num_kv_heads >= tp:
        if num_kv_heads % tp:
            raise ValueError(
                f"num_key_value_heads = {num_kv_heads} is not divisible by the tensor-parallel size {tp}")
        per = num_kv_heads // tp
        first = rank * per
    else:
        if tp % num_kv_heads:
            raise ValueError(
                f"tensor-parallel size {tp} is not a multiple of num_key_value_heads = {num_kv_heads}")
        per, first = 1, rank * num_kv_heads // tp
    kv = (first * head_dim, per * head_dim)
    return [q, Part("k", *kv), Part("v", *kv)]


def local_kv_heads(num_kv_heads: int, tp_size: int) -> int:
    return max(1, num_kv_heads // tp_size)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local W_local^T) + b with W split by input columns."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ps: ParallelState,
                 dtype: torch.dtype):
        super().__init__()
        self.ps = ps
        self.part = even_part(None, in_features, ps, "row-parallel input size")
        self.weight = _param(out_features, self.part.size, dtype=dtype)
        self.bias = _param(out_features, dtype=dtype) if bias else None

    def load_param(self, leaf: str, param: nn.Parameter, tensor_slice, shard_id: Any) -> None:
        if leaf == "bias":
            load_full(param, tensor_slice)
        else:
            param.data.copy_(tensor_slice[:, self.part.start:self.part.start + self.part.size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ps.all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split across TP ranks; the vocabulary is padded to a multiple of the TP size."""

    def __init__(self, vocab_size: int, hidden_size: int, ps: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.ps, self.vocab_size = ps, vocab_size
        self.per_rank = -(-vocab_size // ps.tp_size)
        self.start = ps.tp_rank * self.per_rank
        self.end = min(self.start + self.per_rank, vocab_size)
        self.weight = _param(self.per_rank, hidden_size, dtype=dtype)

    def load_param(self, leaf: str, param: nn.Parameter, tensor_slice, shard_id: Any) -> None:
        rows = max(0, self.end - self.start)
        param.data.zero_()
        if rows:
            param.data[:rows].copy_(tensor_slice[self.start:self.end])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ps.tp_size == 1:
            return F.embedding(ids, self.weight)
        inside = (ids >= self.start) & (ids < self.end)
        out = F.embedding(torch.where(inside, ids - self.start, 0), self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return self.ps.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Vocab-split output projection; full logits (padding dropped) only on the sampling rank, None
    on the other TP ranks."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.ps.gather_last_dim_to_sampler(F.linear(hidden, self.weight))
        return logits[..., :self.vocab_size] if logits is not None else None


def column_major_weights(model: nn.Module) -> None:
    """Stores every linear weight column-major (same logical [out, in] tensor, transposed storage).

    On CPU, x @ W^T then streams the weight contiguously: measured 1.4x faster at batch 1 (25 vs
    15 GB/s from memory) and no slower at larger batches. The embedding keeps its row-major rows,
    so an lm_head tied to it is left alone.
    """
    embeddings = {id(m.weight) for m in model.modules() if type(m) is VocabParallelEmbedding}
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)) and id(m.weight) not in embeddings:
            m.weight.data = m.weight.data.t().contiguous().t()


class RMSNorm(nn.Module):
    """Replicated on every rank; computed in float32 like the reference."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = _param(size, dtype=dtype)

    def load_param(self, leaf: str, param: nn.Parameter, tensor_slice, shard_id: Any) -> None:
        load_full(param, tensor_slice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
