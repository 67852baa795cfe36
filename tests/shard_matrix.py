"""The TP/PP layouts that tests/test_shard_group.py serves, and what each rank of them must hold.

The checkpoints are chosen so that the matrix covers, per architecture, TP 1, 2 and 4, PP 2 and
TP 2 x PP 2, and among them: a vocabulary (331) not divisible by any TP size, one KV head under TP 2
and 4 (mistral), KV heads replicated under TP 4, uneven default PP splits (3 and 5 layers over 2
stages), explicit --pp-partition overrides (llama "1,2", qwen3 "4,1"), tied embeddings under PP
(qwen3, with head_dim 24 != hidden / heads), qkv biases (qwen2), a multi-file
`model.safetensors.index.json` checkpoint (llama), and KV block sizes 16 (default), 5 and 1.
`expected_parameter_bytes` recomputes a rank's share from the checkpoint's shapes and the sharding
rules, written out here independently of shard/layers.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

ARCH_CHECKPOINTS: dict[str, dict[str, Any]] = {
    "llama": {"arch": "llama", "num_layers": 3, "max_shard_size": "60KB"},
    "mistral": {"arch": "mistral", "num_layers": 2, "num_kv_heads": 1},
    "qwen2": {"arch": "qwen2", "num_layers": 4},
    "qwen3": {"arch": "qwen3", "num_layers": 5, "head_dim": 24, "tie_word_embeddings": True},
}
# Layouts that run with a KV block size other than the default 16.
BLOCK_SIZES = {"mistral-tp4": 5, "qwen3-pp2": 1}


@dataclass(frozen=True)
class Layout:
    arch: str
    tp: int
    pp: int
    # Global layer ranges per stage, written out by hand (not computed by shard/pipeline.py).
    stages: tuple[tuple[int, int], ...]
    partition: str = ""
    block_size: int = 16

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


def layouts() -> dict[str, Layout]:
    stages_pp2 = {"llama": ((0, 2), (2, 3)), "mistral": ((0, 1), (1, 2)),
                  "qwen2": ((0, 2), (2, 4)), "qwen3": ((0, 3), (3, 5))}
    overrides = {"llama": ("1,2", ((0, 1), (1, 3))), "qwen3": ("4,1", ((0, 4), (4, 5)))}
    out = {}
    for arch, kw in ARCH_CHECKPOINTS.items():
        whole = ((0, kw["num_layers"]),)
        for tp in (1, 2, 4):
            out[f"{arch}-tp{tp}"] = Layout(arch, tp, 1, whole)
        out[f"{arch}-pp2"] = Layout(arch, 1, 2, stages_pp2[arch])
        partition, stages = overrides.get(arch, ("", stages_pp2[arch]))
        out[f"{arch}-tp2pp2"] = Layout(arch, 2, 2, stages, partition)
    return {name: Layout(**{**lay.__dict__, "block_size": BLOCK_SIZES.get(name, 16)})
            for name, lay in out.items()}


def checkpoint_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _layer_tensor_numel(name: str, numel: int, tp: int, kv_heads: int) -> int:
    module = name.split(".")[-2]
    if module in ("q_proj", "gate_proj", "up_proj") or (
            module in ("o_proj", "down_proj") and name.endswith("weight")):
        return numel // tp
    if module in ("k_proj", "v_proj"):
        return numel // kv_heads * max(1, kv_heads // tp)
    return numel


def expected_parameter_bytes(checkpoint: Path, tp: int, layers: range, first: bool, last: bool,
                             kv_heads: int, tied: bool) -> int:
    """Float32 bytes one rank should hold, from the checkpoint's tensor shapes and the sharding rules:
    q/gate/up rows and o/down columns split by TP; k/v split by KV head, one head each when there are
    fewer KV heads than ranks; embedding and lm_head rows padded to ceil(vocab / tp); norms (and
    row-parallel biases) whole; embedding on the first stage, final norm and lm_head on the last;
    with tied embeddings the last stage holds its own copy unless it is also the first.
    """
    total = 0
    for name, shape in checkpoint_shapes(checkpoint).items():
        numel = math.prod(shape)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = -(-shape[0] // tp) * shape[1]
            if name == "model.embed_tokens.weight":
                total += rows * first + rows * (tied and last and not first)
            else:
                total += rows * last
        elif name == "model.norm.weight":
            total += numel * last
        elif int(name.split(".")[2]) in layers:
            total += _layer_tensor_numel(name, numel, tp, kv_heads)
    return total * 4
