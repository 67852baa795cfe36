"""Chooses the implementation for a checkpoint from config.json's model_type / architectures.

Importing this module is cheap (no torch, no transformers); the family names themselves live in
`families.py`, which the preflight checks read; the implementation is imported when `model_class`
is asked.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig

from shardline.shard.models.families import ARCHITECTURES, MODEL_TYPES

_LLAMA = "shardline.shard.models.llama:LlamaForCausalLM"
# model_type -> "module:class" of its implementation (imported when `model_class` is asked).
MODELS: dict[str, str] = {model_type: _LLAMA for model_type in MODEL_TYPES}


def load_config(model_dir: Path) -> PretrainedConfig:
    """The transformers config of a local checkpoint (never the hub)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)


def model_class(config: PretrainedConfig) -> type:
    """The implementation class for a config, or a ValueError listing what is supported."""
    if config.model_type in MODELS:
        return _load(MODELS[config.model_type])
    for arch in getattr(config, "architectures", None) or ():
        if arch in ARCHITECTURES:
            return _load(MODELS[ARCHITECTURES[arch]])
    raise ValueError(
        f"model_type {config.model_type!r} (architectures {config.architectures}) is not supported; "
        f"supported: {', '.join(sorted(MODELS))}")


def _load(where: str) -> type:
    module, _, name = where.partition(":")
    return getattr(importlib.import_module(module), name)
