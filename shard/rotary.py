"""Rotary position embedding, with every rope_type transformers knows (default, llama3, yarn, ...)."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig


class RotaryEmbedding:
    """cos/sin tables computed per step from positions; inv_freq built once on the device."""

    def __init__(self, config: PretrainedConfig, head_dim: int, device: torch.device):
        params = getattr(config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
            inv_freq, self.scaling = 1.0 / (theta ** exponent), 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
            inv_freq, self.scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        self.inv_freq = inv_freq.float().to(device)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, [tokens, head_dim], for the given absolute positions."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.unsqueeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x ([tokens, heads, head_dim]) by the per-token tables."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)
