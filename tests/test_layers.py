"""Tensor-parallel layers (shard/layers.py) without processes.

Each TP rank runs in a thread of this process with its own `ParallelState` whose all-reduce and
all-gather exchange tensors through a barrier (`ThreadGroup`), so every rank's slice is loaded by
the real `load_param` and the collectives compose the ranks' outputs exactly as on a real group.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import torch
import torch.nn.functional as F

from shardline.shard.layers import (ColumnParallelLinear, ParallelLMHead, Part, RowParallelLinear,
                                    VocabParallelEmbedding, even_part, local_kv_heads, qkv_parts)
from shardline.shard.models.llama import MLP, LlamaSpec
from shardline.shard.parallel import ParallelState

T = TypeVar("T")
CPU = torch.device("cpu")


class ThreadGroup:
    """Collectives between threads: every rank posts its tensor, then all read all of them."""

    def __init__(self, size: int):
        self.slots: list[Any] = [None] * size
        self.barrier = threading.Barrier(size, timeout=10)

    def exchange(self, rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = t.clone()
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


@dataclass(frozen=True)
class ThreadState(ParallelState):
    group: Any = None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t.copy_(torch.stack(self.group.exchange(self.tp_rank, t)).sum(0))
        return t

    def gather_last_dim_to_sampler(self, t: torch.Tensor) -> torch.Tensor | None:
        parts = self.group.exchange(self.tp_rank, t)
        return torch.cat(parts, dim=-1) if self.rank == self.sampling_rank else None


def state(rank: int, tp: int, group: ThreadGroup | None = None) -> ParallelState:
    return ThreadState(rank, tp, 1, CPU, "gloo", group=group)


def on_ranks(tp: int, fn: Callable[[ParallelState], T]) -> list[T]:
    """Runs fn(ps) for every TP rank at once, one thread each; results in rank order."""
    group = ThreadGroup(tp)
    with ThreadPoolExecutor(tp) as pool, torch.no_grad():
        return list(pool.map(lambda r: fn(state(r, tp, group)), range(tp)))


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- slicing rules ---------------------------------------------------------------------------------

def _kv_starts(num_heads: int, num_kv_heads: int, head_dim: int, tp: int) -> list[tuple[Part, Part, Part]]:
    return [tuple(qkv_parts(num_heads, num_kv_heads, head_dim, state(r, tp))) for r in range(tp)]


def test_qkv_parts_split_q_and_kv_heads() -> None:
    parts = _kv_starts(8, 4, 16, 2)
    assert [(q.start, q.size) for q, _, _ in parts] == [(0, 64), (64, 64)]
    assert [(k.start, k.size) for _, k, _ in parts] == [(0, 32), (32, 32)]
    assert [(v.start, v.size) for _, _, v in parts] == [(0, 32), (32, 32)]
    assert [p.shard_id for p in parts[0]] == ["q", "k", "v"]


@pytest.mark.parametrize("num_kv_heads, tp, kv_head_of_rank", [
    (1, 2, [0, 0]),
    (1, 4, [0, 0, 0, 0]),
    (2, 4, [0, 0, 1, 1]),
    (2, 8, [0, 0, 0, 0, 1, 1, 1, 1]),
])
def test_kv_heads_are_replicated_when_fewer_than_ranks(num_kv_heads: int, tp: int,
                                                       kv_head_of_rank: list[int]) -> None:
    head_dim = 16
    parts = _kv_starts(8, num_kv_heads, head_dim, tp)
    assert [(k.start // head_dim, k.size) for _, k, _ in parts] == [(h, head_dim) for h in kv_head_of_rank]
    assert [v.start for _, _, v in parts] == [k.start for _, k, _ in parts]
    assert local_kv_heads(num_kv_heads, tp) == 1
    # Each rank's query heads must use the KV head they belong to in the unsharded model (GQA groups).
    q_heads_per_kv = 8 // num_kv_heads
    for q, k, _ in parts:
        assert q.start // head_dim // q_heads_per_kv == k.start // head_dim


@pytest.mark.parametrize("heads, kv_heads, tp, message", [
    (4, 2, 3, "num_attention_heads = 4 is not divisible by the tensor-parallel size 3"),
    (6, 3, 2, "num_key_value_heads = 3 is not divisible by the tensor-parallel size 2"),
    (6, 2, 3, "tensor-parallel size 3 is not a multiple of num_key_value_heads = 2"),
])
def test_qkv_parts_refuse_uneven_heads(heads: int, kv_heads: int, tp: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        qkv_parts(heads, kv_heads, 8, state(0, tp))


def test_even_part_names_the_size() -> None:
    assert even_part(None, 96, state(1, 4), "intermediate_size") == Part(None, 24, 24)
    with pytest.raises(ValueError, match="intermediate_size = 96 is not divisible by the tensor-parallel size 5"):
        even_part(None, 96, state(0, 5), "intermediate_size")


# -- layers composed over ranks ---------------------------------------------------------------------

@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_embedding_with_padded_vocab(tp: int) -> None:
    vocab, hidden = 331, 8
    weight = randn(vocab, hidden)
    ids = torch.tensor([0, 1, 82, 83, 165, 166, 247, 248, 329, 330])

    def rank(ps: ParallelState) -> tuple[torch.Tensor, torch.Tensor]:
        layer = VocabParallelEmbedding(vocab, hidden, ps, torch.float32)
        layer.load_param("weight", layer.weight, weight, None)
        return layer(ids), layer.weight.detach().clone()

    results = on_ranks(tp, rank)
    for out, _ in results:
        assert torch.equal(out, F.embedding(ids, weight))
    held = torch.cat([w for _, w in results])
    assert held.shape[0] == -(-vocab // tp) * tp
    assert torch.equal(held[:vocab], weight) and not held[vocab:].any()  # padding rows are zero


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_parallel_lm_head_drops_the_padding(tp: int) -> None:
    vocab, hidden = 331, 8
    weight, h = randn(vocab, hidden), randn(5, hidden, seed=1)

    def rank(ps: ParallelState) -> torch.Tensor:
        layer = ParallelLMHead(vocab, hidden, ps, torch.float32)
        layer.load_param("weight", layer.weight, weight, None)
        return layer(h)

    sampler, *others = on_ranks(tp, rank)
    assert sampler.shape == (5, vocab)
    assert torch.allclose(sampler, F.linear(h, weight), atol=1e-5)
    assert others == [None] * (tp - 1)  # only the sampling rank receives full logits


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_row_parallel_linear_sums_ranks_and_adds_the_bias_once(tp: int) -> None:
    weight, bias, x = randn(6, 16), randn(6, seed=1), randn(3, 16, seed=2)

    def rank(ps: ParallelState) -> torch.Tensor:
        layer = RowParallelLinear(16, 6, True, ps, torch.float32)
        layer.load_param("weight", layer.weight, weight, None)
        layer.load_param("bias", layer.bias, bias, None)
        assert layer.weight.shape == (6, 16 // tp)
        return layer(x[:, ps.tp_rank * 16 // tp:(ps.tp_rank + 1) * 16 // tp])

    for out in on_ranks(tp, rank):
        assert torch.allclose(out, F.linear(x, weight, bias), atol=1e-5)


@pytest.mark.parametrize("num_kv_heads, tp", [(2, 1), (2, 2), (1, 2), (2, 4)])
def test_fused_qkv_rank_outputs_are_the_right_heads(num_kv_heads: int, tp: int) -> None:
    heads, head_dim, hidden = 4, 8, 16
    wq, bq = randn(heads * head_dim, hidden), randn(heads * head_dim, seed=1)
    wk, bk = randn(num_kv_heads * head_dim, hidden, seed=2), randn(num_kv_heads * head_dim, seed=3)
    wv, bv = randn(num_kv_heads * head_dim, hidden, seed=4), randn(num_kv_heads * head_dim, seed=5)
    x = randn(3, hidden, seed=6)
    q_full, k_full, v_full = F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)

    def rank(ps: ParallelState) -> None:
        layer = ColumnParallelLinear(hidden, qkv_parts(heads, num_kv_heads, head_dim, ps), True, torch.float32)
        assert set(layer.expected_parts("weight")) == {"q", "k", "v"}
        for part, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
            layer.load_param("weight", layer.weight, w, part)
            layer.load_param("bias", layer.bias, b, part)
        q_heads, kv = heads // tp, local_kv_heads(num_kv_heads, tp)
        q, k, v = layer(x).split([q_heads * head_dim, kv * head_dim, kv * head_dim], -1)
        first_q = ps.tp_rank * q_heads
        assert torch.allclose(q, q_full[:, first_q * head_dim:(first_q + q_heads) * head_dim], atol=1e-5)
        kv_head = first_q // (heads // num_kv_heads)  # the KV head of this rank's first query head
        cols = slice(kv_head * head_dim, (kv_head + kv) * head_dim)
        assert torch.allclose(k, k_full[:, cols], atol=1e-5) and torch.allclose(v, v_full[:, cols], atol=1e-5)

    on_ranks(tp, rank)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_mlp_fused_gate_up_matches_the_unsharded_mlp(tp: int) -> None:
    hidden, inter = 16, 24
    spec = LlamaSpec(vocab_size=10, hidden_size=hidden, intermediate_size=inter, num_layers=1, num_heads=4,
                     num_kv_heads=2, head_dim=4, rms_norm_eps=1e-6, hidden_act="silu", qkv_bias=False,
                     o_bias=False, mlp_bias=False, qk_norm=False, tie_word_embeddings=False,
                     layer_windows=(None,))
    gate, up, down = randn(inter, hidden), randn(inter, hidden, seed=1), randn(hidden, inter, seed=2)
    x = randn(5, hidden, seed=3)
    expected = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)

    def rank(ps: ParallelState) -> torch.Tensor:
        mlp = MLP(spec, ps, torch.float32)
        mlp.gate_up_proj.load_param("weight", mlp.gate_up_proj.weight, gate, 0)
        mlp.gate_up_proj.load_param("weight", mlp.gate_up_proj.weight, up, 1)
        mlp.down_proj.load_param("weight", mlp.down_proj.weight, down, None)
        return mlp(x)

    for out in on_ranks(tp, rank):
        assert torch.allclose(out, expected, atol=1e-5)
