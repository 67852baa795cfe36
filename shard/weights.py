"""Loads this rank's slice of a safetensors checkpoint into a model built on the meta device.

Every `*.safetensors` file (one file, or the shards listed in `model.safetensors.index.json`) is
streamed tensor by tensor with `get_slice`, and each layer's `load_param` reads only the
rows or columns this rank holds. Every checkpoint tensor's full shape is checked first against the
shape its config implies (a tensor wider than the config would otherwise load silently, sliced);
loading ends with a check: every parameter (every part of a fused one) loaded, and every
checkpoint tensor either loaded or owned by another pipeline stage.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

INDEX = "model.safetensors.index.json"


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in a stable order."""
    index = model_dir / INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{INDEX} lists files that do not exist: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    return files


def iter_slices(model_dir: Path) -> Iterator[tuple[str, object]]:
    """(name, lazy slice) for every tensor of the checkpoint; data is read only when indexed."""
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


def expected_parts(model: nn.Module) -> set[tuple[str, object]]:
    """(parameter name, part) pairs that must be loaded for the model to be complete."""
    expected = set()
    for module_name, module in model.named_modules():
        for leaf, _ in module.named_parameters(recurse=False):
            parts = module.expected_parts(leaf) if hasattr(module, "expected_parts") else (None,)
            prefix = f"{module_name}." if module_name else ""
            expected.update((f"{prefix}{leaf}", part) for part in parts)
    return expected


def check_shape(name: str, tensor_slice, shapes: dict[str, tuple[int, ...]]) -> None:
    expected = shapes.get(name)
    found = tuple(tensor_slice.get_shape())
    if expected is not None and found != expected:
        raise ValueError(f"checkpoint tensor {name} has shape {list(found)}, but config.json implies "
                         f"{list(expected)}: the weights do not belong to this config")


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Streams the checkpoint into `model` (already materialized on its device); strict."""
    params = dict(model.named_parameters(remove_duplicate=False))
    shapes = model.checkpoint_shapes()
    loaded: set[tuple[str, object]] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for name, tensor_slice in iter_slices(model_dir):
            check_shape(name, tensor_slice, shapes)
            targets = model.checkpoint_targets(name)
            for param_name, part in targets:
                param = params.get(param_name)
                if param is None:
                    unexpected.append(name)
                    continue
                module_name, _, leaf = param_name.rpartition(".")
                model.get_submodule(module_name).load_param(leaf, param, tensor_slice, part)
                loaded.add((param_name, part))
    missing = sorted(f"{n}" + (f" [{p}]" if p is not None else "") for n, p in expected_parts(model) - loaded)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {model_dir} does not match the model: "
            f"missing {len(missing)} {missing[:8]}, unexpected {len(unexpected)} {sorted(unexpected)[:8]}")


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
