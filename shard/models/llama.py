"""The Llama family (Llama, Mistral, Qwen2 with qkv bias, Qwen3 with q/k norm), sharded by TP and PP.

Module names follow the checkpoint (`model.layers.17.self_attn.qkv_proj` packs q/k/v_proj) so the
loader maps names with a small table. Layers outside this rank's pipeline stage are placeholders
that keep their global index; the embedding exists only on the first stage, the final norm and
lm_head only on the last. Pre-norm residuals are summed inside each layer, so a single tensor,
the hidden states, crosses a stage boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from shardline.shard.attention import StepContext, attend
from shardline.shard.layers import (ColumnParallelLinear, ParallelLMHead, RMSNorm,
                                    RowParallelLinear, VocabParallelEmbedding, even_part,
                                    local_kv_heads, qkv_parts)
from shardline.shard.parallel import ParallelState
from shardline.shard.rotary import RotaryEmbedding, apply_rotary

# checkpoint module name -> (our fused module, part)
PACKED = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


@dataclass(frozen=True)
class LlamaSpec:
    """The architecture facts the implementation needs, read from a transformers config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    # Attention window of each layer (None: full attention), from config.layer_types when present.
    layer_windows: tuple[int | None, ...]

    @classmethod
    def from_config(cls, c: PretrainedConfig) -> "LlamaSpec":
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        attention_bias = bool(getattr(c, "attention_bias", False))
        window = getattr(c, "sliding_window", None)
        layer_types = getattr(c, "layer_types", None) or ["sliding_attention"] * c.num_hidden_layers
        windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types)
        return cls(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers, num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads, head_dim=head_dim,
            rms_norm_eps=c.rms_norm_eps, hidden_act=c.hidden_act,
            qkv_bias=attention_bias or c.model_type == "qwen2", o_bias=attention_bias,
            mlp_bias=bool(getattr(c, "mlp_bias", False)), qk_norm=c.model_type == "qwen3",
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)), layer_windows=windows)


class Attention(nn.Module):
    def __init__(self, spec: LlamaSpec, ps: ParallelState, layer: int, local_layer: int, dtype: torch.dtype):
        super().__init__()
        self.local_layer, self.head_dim = local_layer, spec.head_dim
        self.window = spec.layer_windows[layer]
        self.heads = spec.num_heads // ps.tp_size
        self.kv_heads = local_kv_heads(spec.num_kv_heads, ps.tp_size)
        parts = qkv_parts(spec.num_heads, spec.num_kv_heads, spec.head_dim, ps)
        self.qkv_proj = ColumnParallelLinear(spec.hidden_size, parts, spec.qkv_bias, dtype)
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size,
                                        spec.o_bias, ps, dtype)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype)
        self.qk_norm = spec.qk_norm

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        n, d = x.shape[0], self.head_dim
        q, k, v = self.qkv_proj(x).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], -1)
        q, k, v = q.view(n, self.heads, d), k.view(n, self.kv_heads, d), v.view(n, self.kv_heads, d)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        out = attend(q, k, v, self.local_layer, ctx, scale=d ** -0.5, window=self.window)
        return self.o_proj(out.reshape(n, self.heads * d))


class MLP(nn.Module):
    def __init__(self, spec: LlamaSpec, ps: ParallelState, dtype: torch.dtype):
        super().__init__()
        inter = spec.intermediate_size
        parts = [even_part(i, inter, ps, "intermediate_size") for i in (0, 1)]
        self.gate_up_proj = ColumnParallelLinear(spec.hidden_size, parts, spec.mlp_bias, dtype)
        self.down_proj = RowParallelLinear(inter, spec.hidden_size, spec.mlp_bias, ps, dtype)
        self.act = ACT2FN[spec.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec: LlamaSpec, ps: ParallelState, layer: int, local_layer: int, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.self_attn = Attention(spec, ps, layer, local_layer, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.mlp = MLP(spec, ps, dtype)

    def forward(self, h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


class PlaceholderLayer(nn.Module):
    """A layer held by another pipeline stage: no parameters, keeps the global index in names."""


class LlamaModel(nn.Module):
    def __init__(self, spec: LlamaSpec, ps: ParallelState, layers: range, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = (VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, ps, dtype)
                             if ps.is_first_stage else None)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, ps, i, i - layers.start, dtype) if i in layers else PlaceholderLayer()
            for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype) if ps.is_last_stage else None


class LlamaForCausalLM(nn.Module):
    """This rank's slice of the model. `layers` is the global range of this pipeline stage."""

    def __init__(self, config: PretrainedConfig, ps: ParallelState, layers: range, dtype: torch.dtype):
        super().__init__()
        self.config, self.spec, self.ps, self.layer_range = config, LlamaSpec.from_config(config), ps, layers
        self.model = LlamaModel(self.spec, ps, layers, dtype)
        self.lm_head = (ParallelLMHead(self.spec.vocab_size, self.spec.hidden_size, ps, dtype)
                        if ps.is_last_stage else None)
        self.rotary: RotaryEmbedding | None = None

    # -- loading ---------------------------------------------------------------------------------
    def skipped_prefixes(self) -> tuple[str, ...]:
        """Checkpoint name prefixes that belong to other pipeline stages."""
        skipped = [f"model.layers.{i}." for i in range(self.spec.num_layers) if i not in self.layer_range]
        if self.model.embed_tokens is None:
            skipped.append("model.embed_tokens.")
        if self.lm_head is None:
            skipped += ["model.norm.", "lm_head."]
        return tuple(skipped)

    def checkpoint_targets(self, name: str) -> list[tuple[str, object]]:
        """(parameter name, part) pairs a checkpoint tensor loads into; [] when another stage owns it."""
        targets: list[tuple[str, object]] = []
        if self.spec.tie_word_embeddings and name == "model.embed_tokens.weight" and self.lm_head is not None:
            targets.append(("lm_head.weight", None))
        if name.endswith("rotary_emb.inv_freq") or name.startswith(self.skipped_prefixes()):
            return targets
        module, _, leaf = name.rpartition(".")
        parent, _, child = module.rpartition(".")
        if child in PACKED:
            fused, part = PACKED[child]
            return targets + [(f"{parent}.{fused}.{leaf}", part)]
        return targets + [(name, None)]

    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Full (unsharded) shape of every tensor a checkpoint of this config holds."""
        s = self.spec
        h, i, d = s.hidden_size, s.intermediate_size, s.head_dim
        q, kv = s.num_heads * d, s.num_kv_heads * d
        layer = {"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                 "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                 "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
                 "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
        if s.qkv_bias:
            layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
        if s.o_bias:
            layer["self_attn.o_proj.bias"] = (h,)
        if s.mlp_bias:
            layer.update({"mlp.gate_proj.bias": (i,), "mlp.up_proj.bias": (i,), "mlp.down_proj.bias": (h,)})
        if s.qk_norm:
            layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
        shapes = {f"model.layers.{n}.{k}": v for n in range(s.num_layers) for k, v in layer.items()}
        shapes.update({"model.embed_tokens.weight": (s.vocab_size, h), "model.norm.weight": (h,),
                       "lm_head.weight": (s.vocab_size, h)})
        return shapes

    def tie_weights(self) -> None:
        """With tied embeddings on a rank holding both ends, lm_head shares the embedding matrix."""
        if self.spec.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def materialize(self, device: torch.device) -> None:
        """Called after loading: builds the buffers that are computed, not loaded."""
        self.rotary = RotaryEmbedding(self.config, self.spec.head_dim, device)

    # -- forward ---------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def run_layers(self, h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        for i in self.layer_range:
            h = self.model.layers[i](h, ctx)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor | None:
        """Full-vocabulary float32 logits of the given hidden states on the sampling rank (last stage
        only; None on its other TP ranks)."""
        logits = self.lm_head(self.model.norm(h))
        return logits.float() if logits is not None else None
