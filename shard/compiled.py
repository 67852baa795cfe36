"""The compiled layer stack (`--compile`): inductor over everything but attention, cached on disk.

`compiled_layers(model)` wraps the model's `run_layers` in `torch.compile` with dynamic shapes, so
one compilation serves every token count: norms, rotary, the projections, SiLU * up and the
residual adds are fused by inductor, while the attention call (`shard.attention.attend`: the pool
write and the backend's kernels) stays outside the graph, so each layer's graph ends at it and the
next one starts after it. Compilation happens at Warmup, whose steps give the shapes; the
generated code is cached on disk (`cache_dir`, default ~/.cache/shardline/inductor), so a
relaunch of the same model recompiles nothing. `auto` means on for CUDA and off on CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog
import torch

DEFAULT_CACHE = Path.home() / ".cache" / "shardline" / "inductor"


def enabled(mode: str, device: torch.device) -> bool:
    """Whether `--compile mode` compiles on this device."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def use_cache_dir(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Points inductor's on-disk caches at `cache_dir` (set before the first compile)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compiled_layers(model: torch.nn.Module, model_dir: Path):
    """`model.run_layers` compiled; attention runs eagerly between the compiled pieces."""
    where = use_cache_dir()  # already set by the engine; returns where it is
    structlog.get_logger("shardline.shard").info(
        f"compiling the layer stack of {model_dir.name} at Warmup (cached in {where}; a relaunch reuses it)")
    return torch.compile(model.run_layers, dynamic=True)
