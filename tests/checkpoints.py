"""Tiny random transformers checkpoints and a transformers greedy reference, for tests.

Nothing here touches a model hub: `make_checkpoint` builds a seeded random model of one of
`ARCHS` with transformers itself, saves it with `save_pretrained` (optionally sharded behind a
`model.safetensors.index.json`) next to a byte-level BPE tokenizer trained on the spot by
`build_tokenizer` (plain, or Llama-style: BOS added on encode and a chat template).
`reference_generate` is the ground truth that shardline's output is compared
against: greedy decoding with transformers' `AutoModelForCausalLM`, float32, CPU, one prompt at a
time, EOS ignored.

Facts about transformers 5.x these fixtures rely on:
- RoPE settings live in `config.rope_parameters` ({"rope_type", "rope_theta"}), not `rope_theta`.
- `Qwen3Config.head_dim` defaults to 128, so it is always passed explicitly for qwen3; Qwen2 has
  q/k/v biases unconditionally (no config flag) and no `head_dim` field.
- With `tie_word_embeddings=True` the saved checkpoint has no `lm_head.weight` at all.
- Mistral keeps its default `sliding_window` 4096 (> max_position_embeddings, so inert) and has the
  same parameter names as llama: with the same seed the two get identical weights.
- Weights are normal(0, init_std) rather than transformers' 0.02 init, so that logit gaps are large
  enough for stable greedy comparisons; norm weights are 1 + 0.1 * randn so that ignoring one is
  caught; biases are random and nonzero.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

ARCHS = ("llama", "mistral", "qwen2", "qwen3")

BOS_TOKEN, EOS_TOKEN = "<s>", "</s>"
BOS_ID, EOS_ID = 0, 1
# The chat markers of a Llama-3-style template; a llama-style tokenizer adds them after the trained
# vocabulary, as special tokens.
CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Llama 3's chat template, with this tokenizer's BOS: BOS once, a header per message, the content
# trimmed and ended by <|eot_id|>, then the assistant's header when a reply is wanted.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}

# Fixed training text for the tokenizer: English plus multi-byte UTF-8 (2, 3 and 4 byte sequences).
TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. A tiny model serves tokens to many clients.",
    "Shardline splits the layers of a language model over several processes and batches requests.",
    "She ordered a café au lait and a crème brûlée; the naïve waiter smiled at the façade.",
    "日本語のテキストも少し含めます。東京は大きい都市です。",
    "Emoji too: 🙂 🚀 🎉 👍🏽 and Ünïcödé, Ελληνικά, русский, 中文, 한국어.",
    "Numbers 0123456789, punctuation !?;:()[]{}<>-_=+*/\\|@#$%^&~` and \"quotes\" 'too'.",
)


def build_tokenizer(out_dir: Path, vocab_size: int = 320, llama_style: bool = False) -> None:
    """Train a deterministic byte-level BPE tokenizer on TOKENIZER_TEXT and save it to out_dir.

    Ids 0 and 1 are `<s>` (bos) and `</s>` (eos); by default encoding adds no special tokens. Any
    text round-trips through decode(encode(text)), since every byte is in the alphabet.
    `llama_style` makes it behave like a real Llama tokenizer: a post-processor puts BOS before
    every encoded text, and it has a Llama-3-style `chat_template` whose markers (CHAT_TOKENS) are
    special tokens with the ids vocab_size, vocab_size + 1, ...
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TOKENIZER_TEXT * 4, trainer)
    if llama_style:
        _make_llama_style(tokenizer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)
    fast.save_pretrained(out_dir)
    # transformers 5 writes tokenizer_class "TokenizersBackend", which 4.x cannot load; the old name
    # is an alias in 5.x, so use it.
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if llama_style:  # where Llama 3 checkpoints keep it (transformers 5 would write chat_template.jinja)
        config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _make_llama_style(tokenizer: Tokenizer) -> None:
    """BOS before every text (TemplateProcessing, as Llama's tokenizer.json has it) and the chat markers."""
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0", pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, BOS_ID)])
    tokenizer.add_special_tokens(list(CHAT_TOKENS))


def _randomize(model: PreTrainedModel, init_std: float) -> None:
    """Overwrite every parameter: norms 1 + 0.1 * randn, everything else normal(0, init_std)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, init_std)


def make_checkpoint(
    out_dir: Path,
    arch: str = "llama",
    *,
    vocab_size: int = 331,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 96,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    max_shard_size: str | None = None,
    with_tokenizer: bool = True,
    llama_tokenizer: bool = False,
    seed: int = 0,
    init_std: float = 0.2,
    max_position_embeddings: int = 512,
) -> Path:
    """Save a seeded random float32 `arch` model (config, generation config, safetensors) to out_dir.

    `max_shard_size` (e.g. "60KB") makes save_pretrained write several shards plus
    `model.safetensors.index.json`; otherwise a single `model.safetensors` is written.
    `llama_tokenizer` saves the Llama-style tokenizer of `build_tokenizer` (BOS on encode, chat template).
    The global torch RNG is left untouched.
    """
    if arch not in _CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if with_tokenizer and vocab_size < 258:
        raise ValueError("vocab_size must be >= 258 (256 bytes + 2 special tokens) with a tokenizer")
    if llama_tokenizer and vocab_size < 320 + len(CHAT_TOKENS):
        raise ValueError(f"vocab_size must be >= {320 + len(CHAT_TOKENS)} with llama_tokenizer (the chat markers)")
    out_dir = Path(out_dir)
    extra: dict[str, int] = {}
    if head_dim is not None or arch == "qwen3":
        extra["head_dim"] = head_dim or hidden_size // num_heads
    config = _CONFIGS[arch](
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        **extra,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _randomize(model, init_std)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **save_kwargs)
    if with_tokenizer:
        build_tokenizer(out_dir, vocab_size=min(320, vocab_size), llama_style=llama_tokenizer)
    return out_dir


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread, then restore the previous count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _reference_model(model_dir: str) -> PreTrainedModel:
    """Load once per directory and process (a directory rewritten later is not reloaded)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def reference_generate(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (new ids only, exactly max_new_tokens each) by transformers, EOS ignored.

    eos_token_id=None turns off stopping without touching the logits (unlike min_new_tokens,
    which would mask EOS), so a generated EOS is kept and decoding continues past it.
    Runs single-threaded (see `single_thread`): for tiny models that is fastest, and far faster
    than the default on a busy small machine, where OpenMP threads contend.
    """
    model = _reference_model(str(Path(model_dir).resolve()))
    outputs = []
    with single_thread(), torch.no_grad():
        for prompt in prompts:
            input_ids = torch.tensor([prompt], dtype=torch.long)
            sequence = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
            )
            new_tokens = sequence[0, len(prompt) :].tolist()
            if len(new_tokens) != max_new_tokens:
                raise AssertionError(f"reference produced {len(new_tokens)} tokens, wanted {max_new_tokens}")
            outputs.append(new_tokens)
    return outputs


def random_prompts(
    n: int, vocab_size: int, *, min_len: int = 3, max_len: int = 20, seed: int = 0
) -> list[list[int]]:
    """n deterministic prompts with lengths in [min_len, max_len] and ids in [2, vocab_size)."""
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab_size) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]
