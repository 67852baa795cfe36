"""Fast checks of the test fixtures in checkpoints.py and conftest.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from checkpoints import (
    ARCHS,
    build_tokenizer,
    make_checkpoint,
    random_prompts,
    reference_generate,
    single_thread,
)

MULTIBYTE = "Hello café, naïve 日本語 🙂🚀 Ünïcödé zebra"

# Each arch once; together they cover tying, MQA (1 kv head), GQA, sharding and qwen3's head_dim.
CASES: list[dict[str, Any]] = [
    {"arch": "llama", "max_shard_size": "60KB"},
    {"arch": "mistral", "tie_word_embeddings": True},
    {"arch": "qwen2", "num_kv_heads": 1, "max_shard_size": "60KB"},
    {"arch": "qwen3", "head_dim": 24, "tie_word_embeddings": True, "max_shard_size": "60KB"},
]


def _saved_tensor_names(path: Path) -> set[str]:
    names: set[str] = set()
    for file in path.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            names.update(f.keys())
    return names


def test_tokenizer_round_trips_and_is_deterministic(tmp_path: Path) -> None:
    build_tokenizer(tmp_path / "a")
    build_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert len(tok) == 320
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == ("<s>", 0, "</s>", 1)
    ids = tok.encode(MULTIBYTE)
    assert tok.decode(ids) == MULTIBYTE
    assert len(ids) < len(MULTIBYTE.encode())  # merges were learned


@pytest.mark.parametrize("kwargs", CASES, ids=[c["arch"] for c in CASES])
def test_checkpoint_reloads_and_generates(checkpoint_factory: Callable[..., Path], kwargs: dict[str, Any]) -> None:
    path = checkpoint_factory(**kwargs)
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == kwargs["arch"]
    assert config.vocab_size == 331 and config.eos_token_id == 1 and config.bos_token_id == 0
    assert config.tie_word_embeddings == kwargs.get("tie_word_embeddings", False)
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert (path / "model.safetensors.index.json").exists() == ("max_shard_size" in kwargs)
    if "max_shard_size" in kwargs:
        assert len(list(path.glob("model-*-of-*.safetensors"))) > 2
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) <= config.vocab_size and tok.eos_token_id == config.eos_token_id

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    saved = _saved_tensor_names(path)
    params = dict(model.named_parameters())
    assert saved == set(params)  # tied checkpoints store no lm_head.weight
    assert ("lm_head.weight" in saved) != config.tie_word_embeddings
    norms = [p for n, p in params.items() if n.endswith("norm.weight")]
    assert all(not torch.allclose(p, torch.ones_like(p)) for p in norms)
    biases = [p for n, p in params.items() if n.endswith(".bias")]
    assert (len(biases) > 0) == (kwargs["arch"] == "qwen2")
    assert all(p.abs().min() > 0 for p in biases)
    if kwargs["arch"] == "qwen3":
        assert config.head_dim == 24 and params["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 24, 64)
        assert "model.layers.0.self_attn.q_norm.weight" in params

    prompts = random_prompts(3, config.vocab_size, seed=1)
    outputs = reference_generate(path, prompts, max_new_tokens=12)
    assert [len(o) for o in outputs] == [12, 12, 12]
    assert all(len(set(o)) > 4 for o in outputs)  # varied, not one repeated token
    assert reference_generate(path, prompts, max_new_tokens=12) == outputs


def test_reference_is_plain_argmax(checkpoint_factory: Callable[..., Path]) -> None:
    """No logit processing and no EOS stop: match a cache-free argmax loop over full forwards."""
    path = checkpoint_factory(arch="llama", max_shard_size="60KB")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    prompts = random_prompts(8, 331, seed=5)
    outputs = reference_generate(path, prompts, 8)
    for prompt, generated in zip(prompts, outputs):
        sequence = list(prompt)
        with single_thread(), torch.no_grad():
            for _ in range(8):
                sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
        assert sequence[len(prompt) :] == generated
    # With these seeds the model emits EOS (id 1) mid-way at least once, and decoding goes on.
    assert any(1 in generated[:-1] for generated in outputs)


def test_make_checkpoint_is_deterministic_and_seeded(tmp_path: Path) -> None:
    rng_state = torch.random.get_rng_state()
    a = make_checkpoint(tmp_path / "a", "qwen2", with_tokenizer=False)
    b = make_checkpoint(tmp_path / "b", "qwen2", with_tokenizer=False)
    c = make_checkpoint(tmp_path / "c", "qwen2", with_tokenizer=False, seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert not (a / "tokenizer.json").exists()
    assert json.loads((a / "generation_config.json").read_text())["eos_token_id"] == 1


def test_random_prompts() -> None:
    prompts = random_prompts(50, 331, min_len=2, max_len=9, seed=3)
    assert prompts == random_prompts(50, 331, min_len=2, max_len=9, seed=3)
    assert prompts != random_prompts(50, 331, min_len=2, max_len=9, seed=4)
    assert all(2 <= len(p) <= 9 and all(2 <= t < 331 for t in p) for p in prompts)
    assert len({len(p) for p in prompts}) > 3


def test_factory_caches_by_kwargs(checkpoint_factory: Callable[..., Path]) -> None:
    llama = checkpoint_factory(arch="llama", max_shard_size="60KB")
    assert checkpoint_factory(max_shard_size="60KB", arch="llama") == llama
    assert checkpoint_factory(arch="qwen2", num_kv_heads=1, max_shard_size="60KB") != llama
    assert set(ARCHS) == {c["arch"] for c in CASES}
