"""Train the tiny Llama demo model that ships with shardline.

Retrain (from the repository root; about 10 minutes on 2 CPU cores)::

    python demo/train.py --out demo/model

Steps, all deterministic (fixed seeds, fixed step count, sorted corpus):

1. train a byte-level BPE tokenizer (``tokenizers``) on the pydoc topics that
   ship with CPython (see ``demo/corpus.py``), with ``<s>``/``</s>`` specials;
2. train a small ``transformers.LlamaForCausalLM`` on random windows of the
   token stream ``<s> doc </s> <s> doc </s> ...`` with AdamW and a cosine
   learning-rate schedule;
3. save ``config.json``, ``generation_config.json``, ``model.safetensors``
   (float32) and ``tokenizer.json``/``tokenizer_config.json`` into ``--out``.

Only the standard library (``pydoc_data``), torch, transformers and tokenizers
are needed; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

if __package__:
    from .corpus import corpus_documents, real_word_fraction
else:  # run as a script: python demo/train.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from corpus import corpus_documents, real_word_fraction

BOS, EOS = "<s>", "</s>"
PROMPTS = ("The function", "A class is", "When an exception")
# A small chat template, so that `shardline generate --chat` and /v1/chat/completions work with the
# demo model: BOS once (the template writes it), then "Question: ..." / "Answer: ..." turns. The
# model was never trained on chat; it answers in the style of the Python documentation.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] | trim }}\n\n"
    "{% elif message['role'] == 'user' %}Question: {{ message['content'] | trim }}\n"
    "{% else %}Answer: {{ message['content'] | trim }}\n\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}"
)


def train_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer whose encodings start with ``<s>``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
        model_max_length=1024, clean_up_tokenization_spaces=False,
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> torch.Tensor:
    """Concatenate ``<s> doc </s>`` for every document into one id tensor."""
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(docs):
        ids.extend(enc.ids)  # the post-processor puts <s> first
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def build_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.eos_token_id)
    gc.do_sample = False
    return model


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def greedy_samples(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, n: int = 40) -> None:
    model.eval()
    for prompt in PROMPTS:
        enc = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
        text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"{prompt!r} -> {text!r}  real-word fraction {real_word_fraction(text):.2f}", flush=True)
    model.train()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Train the shardline demo model. Usage: python demo/train.py --out demo/model")
    p.add_argument("--out", type=Path, required=True, help="output directory, e.g. demo/model")
    p.add_argument("--vocab", type=int, default=3072)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()

    docs = corpus_documents()
    tokenizer = train_tokenizer(docs, args.vocab)
    data = token_stream(tokenizer, docs)
    print(f"corpus: {len(docs)} documents, {len(data)} tokens, vocab {len(tokenizer)}", flush=True)

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    smooth = None
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[s:s + args.seq_len] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  (smoothed {smooth:.4f})  "
                  f"lr {lr_at(step, args):.2e}  {time.perf_counter() - t0:6.1f}s", flush=True)

    greedy_samples(model, tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    # Name the class every transformers version knows (v5 alone knows "TokenizersBackend").
    tok_cfg_path = args.out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg["chat_template"] = CHAT_TEMPLATE
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    size = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    print(f"saved to {args.out}: safetensors {size / 1e6:.2f} MB, "
          f"final smoothed loss {smooth:.4f}, total {time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
