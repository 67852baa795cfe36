"""Steps the shard must refuse (shard/sequences.py), in-process: each refusal names the problem and
changes nothing, so the same requests continue afterwards exactly as transformers generates them.

Each case spoils one valid step (the driver's next one: a decode of A, the next prompt chunk of B)
in one way; after every refusal the engine's sequences (tokens, block tables, KV written) are
compared with a snapshot taken before.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from checkpoints import random_prompts, reference_generate
from shardline.proto import shard_pb2
from shardline.shard.config import GroupConfig, ShardConfig
from shardline.shard.engine import Engine, StepRefused
from shardline.shard.parallel import init_parallel
from step_driver import Driver, run_sync

VOCAB = 331
A, B, NEW = 1, 2, 99  # A decodes, B is half-way through its prompt, NEW is not on the shard
PROMPT_A, PROMPT_B = random_prompts(2, VOCAB, min_len=3, max_len=3, seed=5)[0], \
    random_prompts(1, VOCAB, min_len=21, max_len=21, seed=6)[0]
BLOCKS = 32


def _work(step: shard_pb2.StepRequest, rid: int) -> shard_pb2.Work:
    return next(w for w in step.work if w.id == rid)


def _new(step: shard_pb2.StepRequest, tokens: list[int], blocks: list[int]) -> None:
    step.start.append(shard_pb2.NewSequence(id=NEW, prompt_len=len(tokens)))
    step.work.append(shard_pb2.Work(id=NEW, token_ids=tokens, new_blocks=blocks, sample=True))


def _cached(step: shard_pb2.StepRequest, cached: list[int], blocks: list[int]) -> None:
    step.start.append(shard_pb2.NewSequence(id=NEW, prompt_len=len(cached) + 1, cached_token_ids=cached,
                                            sampling=shard_pb2.SamplingParameters(repetition_penalty=1.3)))
    step.work.append(shard_pb2.Work(id=NEW, token_ids=[3], new_blocks=blocks, sample=True))


def _set_tokens(work: shard_pb2.Work, tokens: list[int]) -> None:
    del work.token_ids[:]
    work.token_ids.extend(tokens)


Spoiler = Callable[[shard_pb2.StepRequest], object]
CASES: dict[str, tuple[Spoiler, str]] = {
    "free unknown": (lambda s: s.free.append(12345), "frees sequences this shard does not hold"),
    "free twice": (lambda s: s.free.extend([B, B]), "or twice"),
    "start existing": (lambda s: s.start.append(shard_pb2.NewSequence(id=A)), "already exist"),
    "start twice": (lambda s: (_new(s, [3], [30]), s.start.append(shard_pb2.NewSequence(id=NEW))), "already exist"),
    "work twice": (lambda s: s.work.append(shard_pb2.Work(id=A, sample=True)), "lists one sequence twice"),
    "work unknown": (lambda s: s.work.append(shard_pb2.Work(id=12345, sample=True)), "which this shard does not hold"),
    "work on freed": (lambda s: s.free.append(A), f"works on sequence {A}, which this shard does not hold"),
    "new without tokens": (lambda s: _new(s, [], [30]), f"sequence {NEW}: decode without a sampled token to run"),
    "decode mid-prefill": (lambda s: _set_tokens(_work(s, B), []), "decode without a sampled token to run"),
    "tokens over sampled": (lambda s: _set_tokens(_work(s, A), [5]), "new tokens while its sampled token was not run"),
    "vocab": (lambda s: _set_tokens(_work(s, B), [4, VOCAB]),
              f"token id {VOCAB} is outside the vocabulary (size {VOCAB})"),
    "outside pool": (lambda s: _work(s, A).new_blocks.append(BLOCKS),
                     f"block {BLOCKS} is outside the pool ({BLOCKS} blocks)"),
    "positions": (lambda s: _new(s, [3] * 513, []), "513 tokens exceed max_position_embeddings = 512"),
    "blocks missing": (lambda s: _new(s, [3] * 20, [30]), "20 tokens need 2 KV blocks, it holds 1"),
    "cached vocab": (lambda s: _cached(s, [4] * 15 + [VOCAB + 7], [28, 29]),
                     f"sequence {NEW}: cached token id {VOCAB + 7} is outside the vocabulary (size {VOCAB})"),
    "cached beyond blocks": (lambda s: _cached(s, [4] * 32, [29]), "33 tokens need 3 KV blocks, it holds 1"),
    "start without work": (lambda s: s.start.append(shard_pb2.NewSequence(id=NEW)), "starts sequences without work"),
}


def _snapshot(e: Engine) -> dict[int, tuple]:
    return {i: (list(s.tokens), list(s.blocks), s.computed, s.params, s.prompt_len)
            for i, s in e.sequences.live.items()}


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory) -> Path:
    return checkpoint_factory(arch="llama", num_layers=2)


@pytest.fixture
def started(checkpoint: Path) -> tuple[Engine, Driver]:
    """An engine after one step: A has its first token to decode, B ran 8 of its 21 prompt tokens."""
    engine = Engine(ShardConfig(model_dir=checkpoint, kv_cache_tokens=BLOCKS * 16), init_parallel(GroupConfig(), "cpu"))
    assert engine.warmup(64, 8, 0) == BLOCKS
    driver = Driver(16, BLOCKS, chunk=8)
    driver.add(A, PROMPT_A, 10)
    driver.add(B, PROMPT_B, 10)
    driver.absorb(engine.step(driver.next_step()))
    return engine, driver


def test_every_case_is_refused_with_its_reason_and_changes_nothing(started, checkpoint: Path) -> None:
    engine, driver = started
    before = _snapshot(engine)
    assert before[A][2] == len(PROMPT_A) and before[B][2] == 8
    for name, (spoil, message) in CASES.items():
        step = driver.peek()
        spoil(step)
        with pytest.raises(StepRefused, match=re.escape(message)):
            engine.step(step)
        assert _snapshot(engine) == before, name
    run_sync(engine.step, driver)
    assert [driver.tokens(A), driver.tokens(B)] == reference_generate(checkpoint, [PROMPT_A, PROMPT_B], 10)


def test_free_and_restart_of_one_id_in_one_step_is_allowed(started) -> None:
    engine, driver = started
    driver.resume(A)
    step = driver.next_step()
    assert list(step.free) == [A] and [n.id for n in step.start] == [A]
    assert [g.request_id for g in engine.step(step)] == [A]
    assert engine.sequences.live[A].computed == len(PROMPT_A) + 1  # prompt + the replayed token


def test_empty_and_free_only_steps_return_nothing(started) -> None:
    engine, _ = started
    assert engine.step(shard_pb2.StepRequest()) == []
    assert engine.step(shard_pb2.StepRequest(free=[A, B])) == [] and engine.sequences.live == {}
