"""The number of torch ops of a step does not depend on the batch size (no Python loop over sequences),
with either attention backend.

A `TorchDispatchMode` counts every aten op that one `Engine.step` dispatches. Decode steps at batch
1 and batch 32 (built by the Driver from prompts of one length) must count the same, greedy or
sampled with every sampling option on (top logprobs included); so must a step mixing a prefill chunk with 1 or 32 decodes.
"""

from __future__ import annotations

from collections import Counter

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from checkpoints import random_prompts
from shardline.shard import attention_flex
from shardline.shard.config import GroupConfig, ShardConfig
from shardline.shard.engine import Engine
from shardline.shard.parallel import init_parallel
from step_driver import Driver

VOCAB = 331
PROMPT_LEN = 11
SAMPLED = dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, top_logprobs=5)


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module", params=["reference", "flex"])
def engine(checkpoint_factory, request) -> Engine:
    cfg = ShardConfig(model_dir=checkpoint_factory(arch="llama", num_layers=2), kv_cache_tokens=4096,
                      attention_backend=request.param, compile="off")
    e = Engine(cfg, init_parallel(GroupConfig(), "cpu"))
    e.warmup(64, 32, 0)
    return e


def _running(engine: Engine, batch: int, steps: int, **sampling) -> Driver:
    """`batch` requests of PROMPT_LEN tokens, prefilled and decoded `steps` times."""
    engine.reset()
    driver = Driver(engine.block_size, engine.pool.num_blocks)
    for i, prompt in enumerate(random_prompts(batch, VOCAB, min_len=PROMPT_LEN, max_len=PROMPT_LEN, seed=batch)):
        driver.add(i, prompt, 100, seed=i, **sampling)
    for _ in range(steps):
        driver.absorb(engine.step(driver.next_step()))
    return driver


def _count(engine: Engine, driver: Driver) -> Counter[str]:
    """The step's aten ops. Compiled code cannot run under a dispatch mode, so flex's compiled
    kernel is swapped for a stand-in that counts its calls and returns an output of its shape: the
    ops around it are counted, and the kernel calls themselves (one per layer and kind of rows)."""
    step = driver.next_step()
    calls = Counter()

    def stand_in(window, block, scale):
        def attend(q, k, v, *masks):
            calls["flex kernel"] += 1
            return q.new_zeros(*q.shape[:3], v.shape[-1])
        return attend

    with pytest.MonkeyPatch.context() as patch, OpCounter() as counter:
        patch.setattr(attention_flex, "kernel", stand_in)
        driver.absorb(engine.step(step))
    return counter.ops + calls


@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_a_decode_step_runs_the_same_ops_at_batch_1_and_32(engine: Engine, sampling: dict) -> None:
    counts = {}
    for batch in (1, 32):
        driver = _running(engine, batch, steps=3, **sampling)
        step = driver.peek()
        assert len(step.work) == batch and not any(w.token_ids for w in step.work)  # decodes only
        counts[batch] = _count(engine, driver)
    assert sum(counts[1].values()) > 50  # the counter really saw the forward
    assert counts[1] == counts[32], counts[32] - counts[1] or counts[1] - counts[32]


def test_a_step_mixing_a_prefill_chunk_and_decodes_runs_the_same_ops_at_batch_1_and_32(engine: Engine) -> None:
    counts = {}
    for batch in (1, 32):
        driver = _running(engine, batch, steps=2)
        driver.add(1000, list(range(2, 2 + PROMPT_LEN)), 4)
        counts[batch] = _count(engine, driver)
    assert counts[1] == counts[32], counts[32] - counts[1] or counts[1] - counts[32]
