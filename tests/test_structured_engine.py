"""Structured output in the shard engine: a sequence started with a grammar samples only tokens the
grammar allows, and ends (end of sequence) only where the grammar accepts.

Random weights never produce JSON or a pattern by chance, so a valid output proves the mask. The
masks are computed on the sampling rank from the sequence's own tokens, so a sequence resumed with
its generated tokens fed again continues exactly where it was.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from shardline.proto import shard_pb2
from shardline.router.api.constraints import grammar_of
from shardline.shard.engine import Engine, StepRefused
from test_engine import make_engine

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"}},
          "required": ["name", "n", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    return checkpoint_factory(arch="llama", num_layers=2, vocab_size=331)


@pytest.fixture(scope="module")
def engine(checkpoint) -> Engine:
    return make_engine(checkpoint, kv_cache_tokens=4096)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(checkpoint))


def run(engine: Engine, prompt: list[int], grammar: str, new: int, sampling: shard_pb2.SamplingParameters,
        sid: int = 1, resume_after: int = 0, cached_blocks: int = 0) -> tuple[list[int], bool]:
    """Generates up to `new` tokens (or to EOS); `resume_after` > 0 restarts the sequence after that
    many tokens, feeding prompt + generated tokens again as the router does after a preemption,
    the first `cached_blocks` whole blocks of them as a prefix-cache hit (K/V kept, not run).
    Returns (tokens, ended with EOS)."""
    blocks = list(range(engine.pool.num_blocks))
    out: list[int] = []
    engine.reset()
    start = shard_pb2.NewSequence(id=sid, prompt_len=len(prompt), sampling=sampling, grammar=grammar)
    need = -(-(len(prompt) + new) // engine.block_size)
    req = shard_pb2.StepRequest(start=[start], work=[shard_pb2.Work(id=sid, token_ids=prompt, sample=True,
                                                                    new_blocks=blocks[:need])])
    while True:
        gens = engine.step(req)
        out += [g.token_id for g in gens]
        if out[-1] in engine.eos_ids:
            return out, True
        if len(out) >= new:
            return out, False
        if resume_after and len(out) == resume_after:
            engine.sequences.clear()  # the K/V stays in the pool, as the prefix cache keeps it
            engine.state.clear()
            fed, cut = prompt + out, cached_blocks * engine.block_size
            again = shard_pb2.NewSequence(id=sid, prompt_len=len(prompt), sampling=sampling, grammar=grammar,
                                          cached_token_ids=fed[:cut])
            req = shard_pb2.StepRequest(start=[again], work=[shard_pb2.Work(
                id=sid, token_ids=fed[cut:], sample=True, new_blocks=blocks[:need])])
        else:
            req = shard_pb2.StepRequest(work=[shard_pb2.Work(id=sid, sample=True)])


def text(tokenizer, tokens: list[int], eos: bool) -> str:
    return tokenizer.decode(tokens[:-1] if eos else tokens)


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_output_validates(engine, tokenizer, seed):
    grammar = grammar_of("json_schema", json.dumps(SCHEMA))
    sampling = shard_pb2.SamplingParameters(temperature=1.0, seed=seed)
    tokens, eos = run(engine, [5, 6, 7 + seed], grammar, 120, sampling)
    assert eos, f"did not finish within 120 tokens: {text(tokenizer, tokens, False)!r}"
    jsonschema.validate(json.loads(text(tokenizer, tokens, eos)), SCHEMA)


@pytest.mark.parametrize("pattern", [r"[a-z]{3,6}-\d{2}", r"(yes|no|maybe)!"])
def test_regex_output_matches(engine, tokenizer, pattern):
    grammar = grammar_of("regex", pattern)
    for seed in range(4):
        tokens, eos = run(engine, [9, 10, seed + 1], grammar, 40,
                          shard_pb2.SamplingParameters(temperature=1.0, seed=seed))
        assert eos and re.fullmatch(pattern, text(tokenizer, tokens, eos)), text(tokenizer, tokens, eos)


def test_greedy_unconstrained_row_is_untouched(engine):
    """A grammar-less sequence in the same engine is exactly the plain greedy output."""
    plain, _ = run(engine, [3, 4, 5], "", 12, shard_pb2.SamplingParameters())
    again, _ = run(engine, [3, 4, 5], "", 12, shard_pb2.SamplingParameters())
    constrained, _ = run(engine, [3, 4, 5], grammar_of("regex", r"[0-9]+"), 12,
                         shard_pb2.SamplingParameters())
    assert plain == again and constrained != plain


@pytest.mark.parametrize("cached_blocks", [0, 1])
def test_resumed_sequence_continues_its_grammar(engine, tokenizer, cached_blocks):
    """Preempted after 20 tokens and resumed with them fed again (or partly found in the prefix
    cache, generated tokens included): the same tokens, the same valid JSON."""
    grammar = grammar_of("json_schema", json.dumps(SCHEMA))
    sampling = shard_pb2.SamplingParameters(temperature=0.8, seed=11)
    whole, eos = run(engine, [5, 6, 8], grammar, 120, sampling)
    resumed, eos2 = run(engine, [5, 6, 8], grammar, 120, sampling, resume_after=20, cached_blocks=cached_blocks)
    assert len(whole) > 20 and resumed == whole and eos and eos2
    jsonschema.validate(json.loads(text(tokenizer, whole, eos)), SCHEMA)


def test_proposals_with_a_grammar_are_refused(engine):
    grammar = grammar_of("regex", r"[0-9]+")
    run(engine, [3, 4], grammar, 1, shard_pb2.SamplingParameters())
    with pytest.raises(StepRefused, match="grammar"):
        engine.step(shard_pb2.StepRequest(work=[shard_pb2.Work(id=1, sample=True, draft_token_ids=[5])]))
