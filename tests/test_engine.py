"""The shard engine in-process at world size 1, driven through Engine.step as the router would.

Token ids are compared with transformers' greedy decoding (float32): prompts prefilled whole or in
chunks next to running decodes, freed blocks reused by later requests, a request restarted from
prompt + generated, a request finishing at its first token, EOS that never stops the shard (the
router decides), logprobs, sliding-window layers, and steps the engine must refuse with nothing
changed (tests/test_kv_pool.py covers block layouts and Warmup sizing).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from checkpoints import _reference_model, random_prompts, reference_generate
from shardline.proto import shard_pb2
from shardline.shard.config import GroupConfig, ShardConfig
from shardline.shard.engine import Engine
from shardline.shard.parallel import init_parallel
from step_driver import Driver, run_sync

VOCAB = 331
PROMPTS = random_prompts(4, VOCAB, min_len=1, max_len=18, seed=11)
KV_TOKENS = 2048


def make_engine(model_dir: Path, kv_cache_tokens: int = KV_TOKENS, block_size: int = 16,
                backend: str = "reference") -> Engine:
    """An engine warmed up with a pool of kv_cache_tokens // block_size blocks."""
    cfg = ShardConfig(model_dir=model_dir, kv_cache_tokens=kv_cache_tokens, kv_block_size=block_size,
                      attention_backend=backend, compile="off")
    engine = Engine(cfg, init_parallel(GroupConfig(), "cpu"))
    engine.warmup(64, 8, 0)
    poison_unwritten_slots(engine)
    return engine


def poison_unwritten_slots(engine: Engine) -> None:
    """The pool is uninitialised memory in production: fill every slot but the null slot with NaN,
    so a kernel that lets an unwritten slot into its output (0 * NaN) fails the token checks."""
    for pool in (engine.pool.k, engine.pool.v):
        pool.fill_(float("nan"))
        pool[:, engine.pool.null_slot] = 0


def driver_for(e: Engine, chunk: int = 1 << 30) -> Driver:
    return Driver(e.block_size, e.pool.num_blocks, chunk)


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory) -> Path:
    return checkpoint_factory(arch="llama", num_layers=2)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> list[list[int]]:
    return reference_generate(checkpoint, PROMPTS, 16)


@pytest.fixture
def engine(checkpoint: Path) -> Engine:
    return make_engine(checkpoint)


@pytest.fixture(params=["reference", "flex"])
def any_engine(checkpoint: Path, request) -> Engine:
    """The tests that use it run on each attention backend: flex must give transformers' tokens too."""
    return make_engine(checkpoint, backend=request.param)


def greedy(e: Engine, prompts: list[list[int]], max_new: int, chunk: int = 1 << 30) -> Driver:
    driver = driver_for(e, chunk)
    for i, p in enumerate(prompts):
        driver.add(i, p, max_new)
    return run_sync(e.step, driver)


@pytest.mark.parametrize("chunk", [1, 5, 1 << 30])
def test_batch_matches_transformers_whole_or_chunked(any_engine: Engine, reference, chunk: int) -> None:
    engine = any_engine
    driver = greedy(engine, PROMPTS, 16, chunk)
    assert [driver.tokens(i) for i in range(len(PROMPTS))] == reference
    mixed = [s for s in driver.history if any(w.token_ids for w in s.work) and any(not w.token_ids for w in s.work)]
    assert bool(mixed) == (chunk < max(map(len, PROMPTS)))  # long prompts' chunks ran next to decodes
    assert engine.sequences.live == {}  # the driver freed every request at the end


def test_freed_blocks_are_reused_and_the_pool_never_moves(engine: Engine, reference) -> None:
    """Four blocks for four requests of two blocks each: the last two reuse the first two's blocks."""
    k, v = engine.pool.k.data_ptr(), engine.pool.v.data_ptr()
    driver = Driver(16, 4, free_list=[3, 0, 2, 1])
    driver.add(0, PROMPTS[0], 16)
    driver.add(1, PROMPTS[1], 16)
    blocks_of: dict[int, list[int]] = {}

    def later(d: Driver) -> None:
        assert sorted(d.free_blocks) == [0, 1, 2, 3]
        d.add(2, PROMPTS[2], 16)
        d.add(3, PROMPTS[3], 16)

    def record(step):
        out = engine.step(step)
        blocks_of.update({i: list(s.blocks) for i, s in engine.sequences.live.items()})
        return out
    run_sync(record, driver, events={17: later})
    assert [driver.tokens(i) for i in range(4)] == reference
    assert sorted(blocks_of[0] + blocks_of[1]) == sorted(blocks_of[2] + blocks_of[3]) == [0, 1, 2, 3]
    assert (engine.pool.k.data_ptr(), engine.pool.v.data_ptr()) == (k, v)


@pytest.mark.parametrize("chunk", [4, 1 << 30])
def test_restarted_request_continues_exactly(engine: Engine, reference, chunk: int) -> None:
    """Freed after 5 tokens and started again from prompt + those tokens: the rest is unchanged."""
    driver = driver_for(engine, chunk)
    driver.add(7, PROMPTS[2], 16)
    driver.add(8, PROMPTS[3], 16)
    first_token_step = -(-len(PROMPTS[2]) // chunk) - 1
    run_sync(engine.step, driver, events={first_token_step + 5: lambda d: d.resume(7)})
    frees = [i for i, s in enumerate(driver.history) if 7 in s.free]
    assert len(frees) == 2 and [n.id for n in driver.history[frees[0]].start] == [7]  # restart, then end
    replayed = []
    for s in driver.history[frees[0]:]:
        work = next(w for w in s.work if w.id == 7)
        if not work.token_ids:
            break
        replayed += work.token_ids
    assert replayed == PROMPTS[2] + reference[2][:5]
    assert [driver.tokens(7), driver.tokens(8)] == [reference[2], reference[3]]


def test_seeded_request_restarted_draws_what_it_would_have(engine: Engine, reference) -> None:
    """The sampler's step index comes from the tokens the router sent, not from the shard's history."""
    sampling = dict(temperature=0.9, top_k=40, seed=11)
    plain = driver_for(engine)
    plain.add(7, PROMPTS[2], 16, **sampling)
    run_sync(engine.step, plain)
    again = driver_for(engine, chunk=4)
    again.add(8, PROMPTS[3], 16, temperature=1.0, seed=3)
    again.add(7, PROMPTS[2], 16, **sampling)
    run_sync(engine.step, again, events={8: lambda d: d.resume(7), 12: lambda d: d.resume(7)})
    assert again.tokens(7) == plain.tokens(7) != reference[2]


def test_request_started_with_generated_tokens_continues_them(engine: Engine, reference) -> None:
    """Resume as the router sends it: prompt + 5 generated tokens as input, prompt_len = the prompt."""
    prompt, done = PROMPTS[2], reference[2][:5]
    sequence = prompt + done
    blocks = list(range(-(-(len(sequence) + 11) // 16)))
    step = shard_pb2.StepRequest(start=[shard_pb2.NewSequence(id=7, prompt_len=len(prompt))],
                                 work=[shard_pb2.Work(id=7, token_ids=sequence, new_blocks=blocks, sample=True)])
    tokens = [engine.step(step)[0].token_id]
    for _ in range(10):
        tokens.append(engine.step(shard_pb2.StepRequest(work=[shard_pb2.Work(id=7, sample=True)]))[0].token_id)
    assert tokens == reference[2][5:]
    assert engine.sequences.live[7].generated == 5 + 11 and engine.sequences.live[7].prompt_len == len(prompt)


def test_the_shard_never_ends_a_sequence_by_itself(checkpoint: Path, reference, tmp_path: Path) -> None:
    """With the 4th greedy token declared EOS, the shard keeps generating past it, and past the
    router's max_new_tokens, until the router frees the sequence."""
    eos = reference[0][3]
    assert eos not in reference[0][:3]
    path = tmp_path / "ckpt"
    shutil.copytree(checkpoint, path)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((path / name).read_text())
        config["eos_token_id"] = eos
        (path / name).write_text(json.dumps(config))
    e = make_engine(path)
    assert e.eos_ids == {eos}
    driver = driver_for(e)
    driver.add(0, PROMPTS[0], 16)
    live_after: list[bool] = []

    def step(s):
        out = e.step(s)
        live_after.append(0 in e.sequences.live)
        return out
    run_sync(step, driver)
    assert driver.tokens(0) == reference[0]
    assert live_after == [True] * 16 + [False]  # 16 sampling steps, then the free


def test_request_finishing_at_its_first_token(engine: Engine, reference) -> None:
    driver = driver_for(engine)
    driver.add(0, PROMPTS[1], 1)
    driver.add(1, PROMPTS[0], 16)
    run_sync(engine.step, driver)
    assert (driver.tokens(0), driver.tokens(1)) == (reference[1][:1], reference[0])
    assert driver.history[1].free == [0] and engine.sequences.live == {}


def test_generations_come_in_work_order(engine: Engine, reference) -> None:
    """A prefill listed before decodes, and a chunk that does not sample: one generation per sampled
    work, in the order of the work (whatever order the engine runs rows in)."""
    starts = [shard_pb2.NewSequence(id=i, prompt_len=len(PROMPTS[i])) for i in (0, 1)]
    engine.step(shard_pb2.StepRequest(start=starts, work=[
        shard_pb2.Work(id=i, token_ids=PROMPTS[i], new_blocks=[i], sample=True) for i in (0, 1)]))
    step = shard_pb2.StepRequest(start=[shard_pb2.NewSequence(id=i, prompt_len=len(PROMPTS[i])) for i in (2, 3)],
                                 work=[shard_pb2.Work(id=2, token_ids=PROMPTS[2], new_blocks=[2], sample=True),
                                       shard_pb2.Work(id=1, sample=True),
                                       shard_pb2.Work(id=3, token_ids=PROMPTS[3][:2], new_blocks=[3]),
                                       shard_pb2.Work(id=0, sample=True)])
    gens = engine.step(step)
    assert [(g.request_id, g.token_id) for g in gens] == [
        (2, reference[2][0]), (1, reference[1][1]), (0, reference[0][1])]


def test_logprobs_and_top_logprobs_match_a_full_forward(engine: Engine, checkpoint: Path, reference) -> None:
    driver = driver_for(engine, chunk=4)
    driver.add(0, PROMPTS[3], 6, top_logprobs=3)
    driver.add(1, PROMPTS[0], 6)
    run_sync(engine.step, driver)
    ids = torch.tensor([PROMPTS[3] + reference[3][:6]])
    with torch.no_grad():
        logits = _reference_model(str(checkpoint.resolve()))(ids).logits[0].float()
    start = len(PROMPTS[3]) - 1
    raw = torch.log_softmax(logits[start:start + 6], -1)
    expected = raw.gather(1, ids[0, start + 1:].unsqueeze(1))
    got = driver.tracked(0)
    assert torch.allclose(torch.tensor(got.logprobs), expected.squeeze(1), atol=1e-4)
    best = raw.topk(3, dim=-1)
    assert [[t for t, _ in top] for top in got.top] == best.indices.tolist()
    assert torch.allclose(torch.tensor([[p for _, p in top] for top in got.top]), best.values, atol=1e-4)
    assert driver.tracked(1).top == [[]] * 6  # only the request that asked gets them


@pytest.mark.parametrize("window_layers, chunk, backend", [(1, 1 << 30, "reference"), (2, 1 << 30, "reference"),
                                                          (1, 4, "reference"), (1, 4, "flex")])
def test_sliding_window_only_on_the_layers_that_have_it(checkpoint_factory, tmp_path, window_layers, chunk,
                                                        backend) -> None:
    """Qwen2 with use_sliding_window: layers below max_window_layers attend fully, the rest within
    the window; prompts longer than the window tell the two apart (also prefilled in chunks)."""
    model = shutil.copytree(checkpoint_factory(arch="qwen2", num_layers=3), tmp_path / "qwen2-window")
    config = json.loads((model / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=6, max_window_layers=window_layers, layer_types=None)
    (model / "config.json").write_text(json.dumps(config))
    prompts = random_prompts(3, VOCAB, min_len=10, max_len=16, seed=4)
    expected = reference_generate(model, prompts, 12)
    driver = greedy(make_engine(model, block_size=4, backend=backend), prompts, 12, chunk)
    assert [driver.tokens(i) for i in range(len(prompts))] == expected
