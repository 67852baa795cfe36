"""Attention over a flat batch of sequences of different lengths, each with its own KV slab.

Tokens of every sequence in a step are concatenated ([tokens, heads, head_dim], no padding); the
projections run once over all of them, and attention runs per sequence against that sequence's
KV prefix. `StepContext` describes the step's layout and is built once per step by the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shardline.shard.kv_cache import SequenceKV


@dataclass
class StepContext:
    """Layout of one forward step: which sequences, how many new tokens each, their positions."""

    kvs: list[SequenceKV]
    q_lens: list[int]
    cos: torch.Tensor
    sin: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return sum(self.q_lens)

    def last_token_indices(self) -> list[int]:
        """Index in the flat token axis of each sequence's last token (the one to sample from)."""
        out, end = [], 0
        for n in self.q_lens:
            end += n
            out.append(end - 1)
        return out


def _mask(start: int, n: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [n, start + n] mask: query i (absolute start + i) sees keys j <= start + i within the window."""
    q = torch.arange(start, start + n, device=device).unsqueeze(1)
    k = torch.arange(start + n, device=device).unsqueeze(0)
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed


def _decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token: the query heads sharing a KV head form one row block of a bmm, so GQA needs
    no repeated copy of the keys and values (which SDPA's CPU path makes for every call)."""
    kv_heads, d = keys.shape[0], keys.shape[-1]
    grouped = query.reshape(kv_heads, -1, d)  # [kv_heads, heads per kv head, d]
    probs = torch.softmax(torch.bmm(grouped, keys.transpose(1, 2)) * scale, dim=-1, dtype=torch.float32)
    return torch.bmm(probs.to(values.dtype), values).reshape(query.shape)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, ctx: StepContext,
           scale: float, window: int | None = None) -> torch.Tensor:
    """q: [tokens, heads, d]; k, v: [tokens, kv_heads, d] (new tokens). Returns [tokens, heads, d].
    `window`: this layer's sliding attention window (None: full attention)."""
    out = torch.empty_like(q)
    offset = 0
    for kv, n in zip(ctx.kvs, ctx.q_lens):
        start = kv.length
        keys, values = kv.write(layer, k[offset:offset + n], v[offset:offset + n])
        query = q[offset:offset + n].transpose(0, 1)  # [heads, n, d]
        needs_window = window is not None and start + n > window
        if n == 1:
            if needs_window:
                keys, values = keys[:, -window:], values[:, -window:]
            o = _decode_attention(query, keys, values, scale)
        elif start == 0 and not needs_window:
            o = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale,
                                               enable_gqa=True)
        else:
            mask = _mask(start, n, window, q.device)
            o = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale,
                                               enable_gqa=True)
        out[offset:offset + n] = o.transpose(0, 1)
        offset += n
    return out
