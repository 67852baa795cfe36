"""Weights loader and model registry, in-process at world size 1 (no processes, no process group)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoints import random_prompts, reference_generate
from shardline.shard.config import GroupConfig, ShardConfig
from shardline.shard.engine import Engine
from shardline.shard.parallel import init_parallel
from shardline.shard.weights import checkpoint_files
from step_driver import Driver, run_sync

PROMPTS = random_prompts(3, 331, min_len=2, max_len=15, seed=3)
NEW_TOKENS = 24
KV_TOKENS = 1024


def engine(model_dir: Path, dtype: str = "float32") -> Engine:
    return Engine(ShardConfig(model_dir=model_dir, dtype=dtype, kv_cache_tokens=KV_TOKENS),
                  init_parallel(GroupConfig(), "cpu"))


def engine_greedy(e: Engine, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Warmup, then every prompt started in one step and decoded to the end (tests/step_driver.py)."""
    blocks = e.warmup(64, len(prompts), 0)
    driver = Driver(e.block_size, blocks)
    for i, p in enumerate(prompts):
        driver.add(i, p, max_new_tokens)
    run_sync(e.step, driver)
    return [driver.tokens(i) for i in range(len(prompts))]


def checkpoint_bytes(model_dir: Path) -> int:
    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            total += sum(f.get_tensor(n).numel() * 4 for n in f.keys())
    return total


def rewrite(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Copies a single-file checkpoint and edits its tensors."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_single_file_checkpoint_loads_and_matches_transformers(checkpoint_factory) -> None:
    path = checkpoint_factory(arch="qwen2", num_layers=2)
    e = engine(path)
    assert e.parameter_bytes == checkpoint_bytes(path)
    assert engine_greedy(e, PROMPTS, NEW_TOKENS) == reference_generate(path, PROMPTS, NEW_TOKENS)


def test_index_json_multi_file_checkpoint_loads(checkpoint_factory) -> None:
    path = checkpoint_factory(arch="llama", num_layers=2, max_shard_size="60KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and checkpoint_files(path) == [path / f for f in files]
    e = engine(path)
    assert e.parameter_bytes == checkpoint_bytes(path)
    assert engine_greedy(e, PROMPTS, NEW_TOKENS) == reference_generate(path, PROMPTS, NEW_TOKENS)


def test_tied_checkpoint_shares_the_embedding_at_one_stage(checkpoint_factory) -> None:
    path = checkpoint_factory(arch="qwen3", num_layers=2, head_dim=24, tie_word_embeddings=True)
    e = engine(path)
    assert e.model.lm_head.weight is e.model.model.embed_tokens.weight
    assert e.parameter_bytes == checkpoint_bytes(path)
    assert engine_greedy(e, PROMPTS, NEW_TOKENS) == reference_generate(path, PROMPTS, NEW_TOKENS)


def test_extra_tensor_is_reported_as_unexpected(checkpoint_factory, tmp_path: Path) -> None:
    src = checkpoint_factory(arch="llama", num_layers=2)
    path = rewrite(src, tmp_path / "ckpt", lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(4)}))
    with pytest.raises(ValueError, match=r"unexpected 1 \['model\.layers\.0\.mlp\.extra\.weight'\]") as info:
        engine(path)
    assert "missing 0" in str(info.value)


@pytest.mark.parametrize("rows", [192, 48])  # wider than the config (used to load silently, sliced), narrower
def test_a_tensor_whose_shape_disagrees_with_the_config_is_refused(checkpoint_factory, tmp_path: Path,
                                                                    rows: int) -> None:
    src = checkpoint_factory(arch="llama", num_layers=2)
    name = "model.layers.1.mlp.gate_proj.weight"
    path = rewrite(src, tmp_path / "ckpt", lambda t: t.update({name: torch.ones(rows, t[name].shape[1])}))
    with pytest.raises(ValueError, match=rf"{name} has shape \[{rows}, 64\], but config.json implies \[96, 64\]"):
        engine(path)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_checkpoint_shapes_are_the_ones_transformers_builds(checkpoint_factory, arch: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint_factory(arch=arch, num_layers=2))
    with torch.device("meta"):
        reference = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    from shardline.shard.models.registry import model_class
    from shardline.shard.parallel import ParallelState
    with torch.device("meta"):
        ours = model_class(config)(config, ParallelState(0, 1, 1, torch.device("cpu"), "none"),
                                   range(config.num_hidden_layers), torch.float32)
    assert ours.checkpoint_shapes() == reference


def test_tensor_of_a_layer_that_does_not_exist_is_unexpected(checkpoint_factory, tmp_path: Path) -> None:
    src = checkpoint_factory(arch="llama", num_layers=2)
    path = rewrite(src, tmp_path / "ckpt",
                   lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.ones(96, 64)}))
    with pytest.raises(ValueError, match="unexpected 1"):
        engine(path)


@pytest.mark.parametrize("name, reported", [
    ("model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.qkv_proj.weight [k]"),
    ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_up_proj.weight [1]"),
    ("model.norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
])
def test_missing_tensor_is_reported_as_missing(checkpoint_factory, tmp_path: Path, name: str,
                                               reported: str) -> None:
    src = checkpoint_factory(arch="llama", num_layers=2)
    path = rewrite(src, tmp_path / "ckpt", lambda t: t.pop(name))
    with pytest.raises(ValueError, match="missing 1") as info:
        engine(path)
    assert reported in str(info.value) and "unexpected 0" in str(info.value)


def test_index_naming_a_missing_file_fails(checkpoint_factory, tmp_path: Path) -> None:
    src = checkpoint_factory(arch="llama", num_layers=2, max_shard_size="60KB")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    victim = sorted(path.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        engine(path)


def test_directory_without_safetensors_fails(checkpoint_factory, tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    shutil.copytree(checkpoint_factory(arch="llama", num_layers=2), path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        engine(path)


def test_unsupported_model_type_names_the_supported_ones(checkpoint_factory, tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    shutil.copytree(checkpoint_factory(arch="llama", num_layers=2), path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'gpt2'.*supported: llama, mistral, qwen2, qwen3"):
        engine(path)


def test_bfloat16_runs(checkpoint_factory) -> None:
    path = checkpoint_factory(arch="qwen2", num_layers=2)
    e = engine(path, "bfloat16")
    assert {p.dtype for p in e.model.parameters()} == {torch.bfloat16}
    assert e.parameter_bytes * 2 == checkpoint_bytes(path)
    tokens = engine_greedy(e, PROMPTS, NEW_TOKENS)
    assert [len(t) for t in tokens] == [NEW_TOKENS] * len(PROMPTS)
    assert all(0 <= t < 331 for row in tokens for t in row)
    # Not token-exact against float32, but the same model: most first tokens agree.
    reference = reference_generate(path, PROMPTS, NEW_TOKENS)
    assert sum(a[0] == b[0] for a, b in zip(tokens, reference)) >= 2
