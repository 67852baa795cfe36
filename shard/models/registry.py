"""Chooses the implementation for a checkpoint from config.json's model_type / architectures."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from shardline.shard.models.families import ARCHITECTURES, MODEL_TYPES
from shardline.shard.models.llama import LlamaForCausalLM

MODELS: dict[str, type] = {model_type: LlamaForCausalLM for model_type in MODEL_TYPES}


def load_config(model_dir: Path) -> PretrainedConfig:
    """The transformers config of a local checkpoint (never the hub)."""
    return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)


def model_class(config: PretrainedConfig) -> type:
    """The implementation class for a config, or a ValueError listing what is supported."""
    if config.model_type in MODELS:
        return MODELS[config.model_type]
    for arch in getattr(config, "architectures", None) or ():
        if arch in ARCHITECTURES:
            return MODELS[ARCHITECTURES[arch]]
    raise ValueError(
        f"model_type {config.model_type!r} (architectures {config.architectures}) is not supported; "
        f"supported: {', '.join(sorted(MODELS))}")
