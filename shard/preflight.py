"""Checks of a group's settings before any shard starts: the checkpoint folder, tp/pp against its
config.json, and --device against what torch sees.

Each check raises `SettingsError` with one line that names the flag, the value and the limit.
The model checks read config.json as JSON (no model is built, torch is not imported); the device
check asks torch only for `cuda.device_count()` and imports it only when a CUDA device is asked for.
The divisibility rules are the ones the shard's layers enforce (`shard/layers.py`): query heads and
intermediate_size split evenly over TP ranks; KV heads too, or are replicated when there are fewer
of them than ranks, which needs tp to be a multiple of num_key_value_heads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from shardline.shard.models.families import ARCHITECTURES, MODEL_TYPES

WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
DEVICE_RE = re.compile(r"cuda(?::(\d+))?")


class SettingsError(ValueError):
    """A setting that can never work; the message is the one line to show the user."""


def missing_parts(model: Path, weights: bool, tokenizer: bool) -> list[str]:
    """What a checkpoint folder lacks, each named as the user would look for it."""
    missing = [] if (model / "config.json").is_file() else ["config.json"]
    if weights:
        index = model / WEIGHTS_INDEX
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise SettingsError(f"--model {model}: {WEIGHTS_INDEX} is not a weight index: {exc}") from None
            missing += [f"weights file {n} (listed in {WEIGHTS_INDEX})" for n in names if not (model / n).is_file()]
        elif not any(model.glob("*.safetensors")):
            bins = " (it has *.bin files; shardline reads safetensors)" if any(model.glob("*.bin")) else ""
            missing.append(f"weights (*.safetensors){bins}")
    if tokenizer and not any((model / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"tokenizer ({' or '.join(TOKENIZER_FILES[:2])})")
    return missing


def read_checkpoint(model: Path, weights: bool = True, tokenizer: bool = True) -> dict:
    """config.json of a checkpoint folder, after checking that the folder has what serving needs."""
    if not model.exists():
        raise SettingsError(f"--model {model} does not exist (give a checkpoint folder: config.json, "
                            f"*.safetensors, tokenizer)")
    if not model.is_dir():
        raise SettingsError(f"--model {model} is not a folder (give a checkpoint folder: config.json, "
                            f"*.safetensors, tokenizer)")
    missing = missing_parts(model, weights, tokenizer)
    if missing:
        raise SettingsError(f"--model {model} is not a complete checkpoint folder: it has no {', no '.join(missing)}")
    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SettingsError(f"--model {model}: config.json cannot be read as JSON: {exc}") from None
    if not isinstance(config, dict):
        raise SettingsError(f"--model {model}: config.json is not a JSON object")
    return config


def model_sizes(config: dict, model: Path) -> dict[str, int]:
    """The sizes TP and PP split, from config.json (KV heads default to the attention heads)."""
    try:
        sizes = {k: int(config[k]) for k in ("num_attention_heads", "num_hidden_layers", "intermediate_size")}
    except KeyError as exc:
        raise SettingsError(f"--model {model}: config.json has no {exc.args[0]}") from None
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"--model {model}: config.json has a size that is not a number: {exc}") from None
    sizes["num_key_value_heads"] = int(config.get("num_key_value_heads") or sizes["num_attention_heads"])
    return sizes


def tp_problem(sizes: dict[str, int], tp: int) -> str | None:
    """Why a tensor-parallel size cannot split this model, or None when it can."""
    heads, kv, inter = sizes["num_attention_heads"], sizes["num_key_value_heads"], sizes["intermediate_size"]
    if heads % tp:
        return f"num_attention_heads = {heads} is not divisible by {tp}"
    if kv >= tp and kv % tp:
        return f"num_key_value_heads = {kv} is not divisible by {tp}"
    if kv < tp and tp % kv:
        return (f"num_key_value_heads = {kv} is fewer than {tp} ranks and {tp} is not a multiple of it "
                f"(KV heads are replicated only then)")
    if inter % tp:
        return f"intermediate_size = {inter} is not divisible by {tp}"
    return None


def check_parallel(config: dict, model: Path, tp: int, pp: int, partition: Sequence[int] = ()) -> None:
    """Refuses a --tp, --pp or --pp-partition that cannot split this model."""
    sizes = model_sizes(config, model)
    problem = tp_problem(sizes, tp)
    if problem:
        fits = [n for n in range(1, sizes["num_attention_heads"] + 1) if tp_problem(sizes, n) is None]
        raise SettingsError(f"--tp {tp} cannot split the model: {problem}; --tp can be "
                            f"{', '.join(map(str, fits))}")
    layers = sizes["num_hidden_layers"]
    if partition:
        text = ",".join(map(str, partition))
        if len(partition) != pp:
            raise SettingsError(f"--pp-partition {text} has {len(partition)} stages but --pp is {pp}")
        if sum(partition) != layers:
            raise SettingsError(f"--pp-partition {text} adds up to {sum(partition)} layers but the model has "
                                f"num_hidden_layers = {layers}")
    elif pp > layers:
        raise SettingsError(f"--pp {pp} is more than the model's num_hidden_layers = {layers}; "
                            f"--pp can be 1 to {layers}")


def parse_device(device: str) -> int | None:
    """The N of cuda:N (None for cpu and cuda); a SettingsError for anything else."""
    if device == "cpu":
        return None
    match = DEVICE_RE.fullmatch(device)
    if match is None:
        raise SettingsError(f"--device {device!r} is not one of cpu, cuda (one GPU per rank) or cuda:N")
    return int(match.group(1)) if match.group(1) is not None else None


def check_device(device: str, ranks_here: int) -> None:
    """Refuses a --device torch cannot give `ranks_here` ranks on this host (one GPU per rank)."""
    index = parse_device(device)
    if device == "cpu":
        return
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
        raise SettingsError(f"--device {device}: torch sees no CUDA device (torch {torch.__version__}{hint}); "
                            f"use --device cpu")
    if index is not None and index >= count:
        raise SettingsError(f"--device {device}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if index is not None and ranks_here > 1:
        raise SettingsError(f"--device {device} puts all {ranks_here} ranks on one GPU, which NCCL refuses; "
                            f"use --device cuda (one GPU per rank)")
    if ranks_here > count:
        raise SettingsError(f"--device {device} needs one GPU per rank: --tp x --pp = {ranks_here} ranks, "
                            f"torch sees {count} CUDA device(s)")


def check_model_type(config: dict, model: Path) -> None:
    """Refuses a checkpoint whose model_type / architectures no implementation serves."""
    architectures = config.get("architectures") or []
    if config.get("model_type") in MODEL_TYPES or any(a in ARCHITECTURES for a in architectures):
        return
    raise SettingsError(f"--model {model}: model_type {config.get('model_type')!r} (architectures {architectures}) "
                        f"is not supported; supported: {', '.join(sorted(MODEL_TYPES))}")


def check_group(model: Path, tp: int, pp: int, partition: Sequence[int], device: str, ranks_here: int,
                tokenizer: bool = False) -> dict:
    """Every check a shard group's settings get before it starts; returns config.json."""
    config = read_checkpoint(model, weights=True, tokenizer=tokenizer)
    check_parallel(config, model, tp, pp, partition)
    check_device(device, ranks_here)
    check_model_type(config, model)
    return config
