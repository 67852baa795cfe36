"""Shard groups in separate processes (gloo, CPU, float32) driven through the v2 Step protocol.

One group per (architecture, layout) of tests/shard_matrix.py is started once (a module fixture;
spawning is what costs), warmed up with `--kv-cache-tokens 512`, and serves every check for that
layout: greedy parity with transformers for a batch of prompts; continuous batching as a router
does it (requests starting at different steps, freed mid-stream, finishing at their first token, a
long prompt prefilled in chunks next to running decodes, a request freed and restarted from
prompt + generated, a request reading another's blocks as a cached prefix), every request getting
exactly its solo tokens; Info (ranks, layers, exact
parameter bytes, KV blocks); identical generations from every rank. `tests/step_driver.Driver`
plays the router. A few layouts also serve the seeded-sampling, repetition-penalty/logprob,
refused-step and Warmup/Reset checks.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import torch

from checkpoints import _reference_model, random_prompts, reference_generate, single_thread
from shard_harness import (RunningGroup, call_all, drive, fresh_id, greedy, running_group, shard_group,
                           warmup)
from shard_matrix import ARCH_CHECKPOINTS, Layout, checkpoint_shapes, expected_parameter_bytes, layouts
from shardline.proto import shard_pb2
from shardline.router.group.shards import ShardGroup
from step_driver import Driver
from test_speculative_engine import SpecDriver, proposer

pytestmark = pytest.mark.slow

T = TypeVar("T")
VOCAB = 331
NEW_TOKENS = 24
KV_TOKENS = 512  # --kv-cache-tokens of every group
MAX_POSITIONS = 512  # the checkpoints' max_position_embeddings
CHUNK = 8  # prompt tokens per step in the continuous-batching run

LAYOUTS = layouts()
PROMPTS = [random_prompts(1, VOCAB, min_len=n, max_len=n, seed=n)[0] for n in (1, 6, 13, 21)]
JOIN_PROMPTS = [random_prompts(1, VOCAB, min_len=n, max_len=n, seed=100 + n)[0] for n in (9, 2, 17, 4, 11)]
LONG_PROMPT = random_prompts(1, VOCAB, min_len=45, max_len=45, seed=145)[0]


@functools.lru_cache(maxsize=None)
def _reference(checkpoint: Path, prompts: tuple[tuple[int, ...], ...], max_new_tokens: int) -> list[list[int]]:
    return reference_generate(checkpoint, [list(p) for p in prompts], max_new_tokens)


@dataclass
class Served:
    layout: Layout
    checkpoint: Path
    running: RunningGroup
    warmed: tuple[int, int]  # what Warmup reported: (KV blocks, block size)

    def run(self, body: Callable[[ShardGroup], Awaitable[T]], step_timeout: float = 60.0) -> T:
        """Runs `body(group)` with a fresh client in a fresh event loop."""
        async def main() -> T:
            async with self.running.connect(step_timeout=step_timeout) as group:
                return await body(group)
        return asyncio.run(main())

    def driver(self, chunk: int = 1 << 30) -> Driver:
        return Driver(self.warmed[1], self.warmed[0], chunk)

    def reference(self, prompts: list[list[int]], max_new_tokens: int = NEW_TOKENS) -> list[list[int]]:
        return _reference(self.checkpoint, tuple(map(tuple, prompts)), max_new_tokens)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def served(request: pytest.FixtureRequest, checkpoint_factory: Callable[..., Path],
           tmp_path_factory: pytest.TempPathFactory):
    layout = LAYOUTS[request.param]
    checkpoint = checkpoint_factory(**ARCH_CHECKPOINTS[layout.arch])
    with running_group(checkpoint, tmp_path_factory.mktemp("sockets"), tp=layout.tp, pp=layout.pp,
                       pp_partition=layout.partition, kv_cache_tokens=KV_TOKENS,
                       kv_block_size=layout.block_size) as running:
        served = Served(layout, checkpoint, running, (0, 0))
        served.warmed = served.run(warmup)
        yield served
        assert not running.exited(), f"shard ranks exited during the tests: {running.exited()}"


# -- every layout ------------------------------------------------------------------------------------

def test_greedy_matches_transformers(served: Served) -> None:
    tokens = served.run(lambda g: greedy(g, served.driver(), PROMPTS, NEW_TOKENS))
    assert tokens == served.reference(PROMPTS)


def test_speculative_rows_give_transformers_tokens(served: Served) -> None:
    """Decodes carrying proposals, right then wrong from the second on: every rank keeps the same
    accepted prefix, so the group's tokens stay transformers' whatever the layout."""
    truth = served.reference(PROMPTS)
    blocks, block_size = served.warmed

    async def body(group: ShardGroup) -> list[list[int]]:
        driver = SpecDriver(PROMPTS, proposer(truth, 2), blocks, block_size, first_id=fresh_id())
        for _ in range(len(PROMPTS) + 1):
            fresh_id()  # the driver numbers its rows after the id it was given
        ids = [r.id for r in driver.rows]
        while not driver.done:
            driver.took((await group.step(driver.next_step())).generations)
        await group.step(shard_pb2.StepRequest(free=ids))
        return driver.outputs
    assert served.run(body) == truth


def _cached_prompt(block_size: int) -> list[int]:
    return LONG_PROMPT[:32 // block_size * block_size] + JOIN_PROMPTS[3]


def _scenario(ids: dict[str, int], block_size: int) -> dict[int, Callable[[Driver], None]]:
    """Before step 0: a starts (its first step samples nothing); 1: b; 3: c, d (one token only), e
    join; 5: a 45-token prompt joins, in chunks of 8; 6: a is freed; 8: c is freed and restarted from
    prompt + generated; 9: e is freed; 11: g starts from the long prompt's first ~32 tokens, read
    from its blocks as a cached prefix."""
    p = JOIN_PROMPTS

    def cached(d: Driver) -> None:
        blocks = d.tracked(ids["long"]).blocks[:32 // block_size]
        d.add(ids["g"], _cached_prompt(block_size), 6, cached_blocks=blocks)

    def join(*specs):
        return lambda d: [d.add(ids[name], prompt, n) for name, prompt, n in specs]
    return {0: join(("a", p[0], NEW_TOKENS)), 1: join(("b", p[1], 10)),
            3: join(("c", p[2], NEW_TOKENS), ("d", p[3], 1), ("e", p[4], 12)),
            5: join(("long", LONG_PROMPT, 12)),
            6: lambda d: d.drop(ids["a"]), 8: lambda d: d.resume(ids["c"]), 9: lambda d: d.drop(ids["e"]),
            11: cached}


def _chunks_next_to_decodes(driver: Driver, rid: int) -> int:
    """Steps in which `rid` ran a prompt chunk while some other sequence decoded."""
    return sum(any(w.id == rid and w.token_ids for w in s.work) and
               any(w.id != rid and not w.token_ids for w in s.work) for s in driver.history)


def test_continuous_batching_gives_every_request_its_solo_tokens(served: Served) -> None:
    ids = {name: fresh_id() for name in ("a", "b", "c", "d", "e", "long", "g")}
    block_size = served.warmed[1]
    driver = served.run(lambda g: drive(g, served.driver(chunk=CHUNK), _scenario(ids, block_size)))
    prompts = dict(zip("abcde", JOIN_PROMPTS), long=LONG_PROMPT, g=_cached_prompt(block_size))
    # a: 9-token prompt in 2 chunks (steps 0-1), decodes 2-5, freed before 6; e likewise from step 3.
    lengths = dict(a=5, b=10, c=NEW_TOKENS, d=1, e=5, long=12, g=6)
    solo = dict(zip(prompts, served.reference(list(prompts.values()))))
    for name, rid in ids.items():
        got = driver.tokens(rid)
        assert len(got) == lengths[name], name
        assert got == solo[name][:len(got)], f"{name} (prompt length {len(prompts[name])})"
    assert not any(w.sample for w in driver.history[0].work)  # a step that samples nothing
    assert _chunks_next_to_decodes(driver, ids["long"]) == 6  # steps 5-10, next to b's decodes
    assert [len(n.cached_token_ids) for n in driver.history[11].start] == [32 // block_size * block_size]
    restarted = [s for s in driver.history if ids["c"] in s.free]
    assert len(restarted) == 2 and [n.id for n in restarted[0].start] == [ids["c"]]  # restart, then end


def test_info_reports_ranks_layers_parameter_bytes_and_kv_blocks(served: Served) -> None:
    layout, kw = served.layout, ARCH_CHECKPOINTS[served.layout.arch]
    infos = served.run(lambda g: g.info())
    assert served.warmed == (KV_TOKENS // layout.block_size, layout.block_size)
    by_rank: dict[tuple[int, int], int] = {}
    for rank, info in enumerate(infos):
        tp_rank, pp_rank = rank % layout.tp, rank // layout.tp
        assert (info.rank, info.world_size, info.tp_rank, info.tp_size, info.pp_rank, info.pp_size) == (
            rank, layout.world_size, tp_rank, layout.tp, pp_rank, layout.pp)
        assert (info.device, info.dtype, info.model_type, info.vocab_size) == ("cpu", "float32", layout.arch, VOCAB)
        assert info.backend == ("none" if layout.world_size == 1 else "gloo")
        assert list(info.eos_token_ids) == [1] and info.max_position_embeddings == MAX_POSITIONS
        assert (info.kv_blocks, info.kv_block_size) == served.warmed, f"rank {rank}"
        assert (info.first_layer, info.last_layer) == layout.stages[pp_rank]
        assert info.parameter_bytes == expected_parameter_bytes(
            served.checkpoint, layout.tp, range(*layout.stages[pp_rank]), pp_rank == 0, pp_rank == layout.pp - 1,
            kw.get("num_kv_heads", 2), kw.get("tie_word_embeddings", False)), f"rank {rank}"
        by_rank[tp_rank, pp_rank] = info.parameter_bytes
    _check_split_sizes(served, by_rank)


def _check_split_sizes(served: Served, by_rank: dict[tuple[int, int], int]) -> None:
    layout, shapes = served.layout, checkpoint_shapes(served.checkpoint)
    tied = ARCH_CHECKPOINTS[layout.arch].get("tie_word_embeddings", False)
    whole_model = sum(math.prod(s) for s in shapes.values()) * 4
    if layout.world_size == 1:
        assert by_rank[0, 0] == whole_model
    if layout.tp == 2 and layout.pp == 1:
        assert all(b <= 0.55 * whole_model for b in by_rank.values()), (by_rank, whole_model)
    if layout.pp == 2 and layout.tp == 1:
        embedding = math.prod(shapes["model.embed_tokens.weight"]) * 4
        assert by_rank[0, 0] + by_rank[0, 1] == whole_model + (embedding if tied else 0)

        def layer_bytes(stage: int) -> int:
            return 4 * sum(math.prod(s) for n, s in shapes.items() if n.startswith("model.layers.")
                           and int(n.split(".")[2]) in range(*layout.stages[stage]))
        lm_head = embedding if tied else math.prod(shapes["lm_head.weight"]) * 4
        norm = math.prod(shapes["model.norm.weight"]) * 4
        assert by_rank[0, 0] == embedding + layer_bytes(0)  # no lm_head, no final norm
        assert by_rank[0, 1] == layer_bytes(1) + norm + lm_head  # no embedding, except as tied lm_head


def test_every_rank_returns_the_same_generations(served: Served) -> None:
    ids, driver = [fresh_id(), fresh_id()], served.driver()
    for rid, prompt in zip(ids, PROMPTS):
        driver.add(rid, prompt, 2, temperature=1.0, seed=3, top_logprobs=2)
    step = driver.next_step()
    replies = served.run(lambda g: call_all(g, "Step", step))
    assert all(not isinstance(r, grpc.aio.AioRpcError) for r in replies), replies
    assert len(replies) == served.layout.world_size and [g.request_id for g in replies[0].generations] == ids
    assert all(list(r.generations) == list(replies[0].generations) for r in replies)
    assert all(len(g.top_logprobs) == 2 for g in replies[0].generations)
    freed = served.run(lambda g: call_all(g, "Step", shard_pb2.StepRequest(free=ids)))
    assert all(not isinstance(r, grpc.aio.AioRpcError) and not r.generations for r in freed), freed


# -- seeded sampling (a layout whose sampling rank is not rank 0) ------------------------------------

SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.9)


def _seeded_events(ids: dict[str, int]) -> dict[int, Callable[[Driver], None]]:
    """Copies of the seed-7 request: from step 0 between mates, joining at step 4, restarted at 6."""
    prompt, others = JOIN_PROMPTS[0], JOIN_PROMPTS[1:]

    def start(d: Driver) -> None:
        d.add(ids["mate0"], others[0], NEW_TOKENS)
        d.add(ids["mate1"], others[1], NEW_TOKENS, seed=8, **SAMPLED)
        d.add(ids["batched"], prompt, NEW_TOKENS, seed=7, **SAMPLED)
        d.add(ids["mate2"], others[2], 5, temperature=1.5, seed=9)
        d.add(ids["restarted"], prompt, NEW_TOKENS, seed=7, **SAMPLED)
        for seed in (11, 12, 13):
            d.add(ids[f"seed{seed}"], prompt, NEW_TOKENS, seed=seed, **SAMPLED)
        d.add(ids["top_k_1"], prompt, NEW_TOKENS, temperature=0.8, top_k=1, seed=5)
    return {0: start, 4: lambda d: d.add(ids["joined"], prompt, NEW_TOKENS, seed=7, **SAMPLED),
            6: lambda d: d.resume(ids["restarted"])}


@pytest.mark.parametrize("served", ["qwen2-tp2pp2"], indirect=True)
def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates_and_restarts(served: Served) -> None:
    names = ["mate0", "mate1", "batched", "mate2", "restarted", "seed11", "seed12", "seed13", "top_k_1", "joined"]
    ids = {name: fresh_id() for name in names}

    async def body(g: ShardGroup) -> tuple[list[int], Driver]:
        alone = served.driver()
        alone.add(0, JOIN_PROMPTS[0], NEW_TOKENS, seed=7, **SAMPLED)
        await drive(g, alone)
        return alone.tokens(0), await drive(g, served.driver(chunk=5), _seeded_events(ids))

    alone, driver = served.run(body)
    assert len(alone) == NEW_TOKENS and all(0 <= t < VOCAB for t in alone)
    for name in ("batched", "joined", "restarted"):
        assert driver.tokens(ids[name]) == alone, name
    seeds = [tuple(driver.tokens(ids[f"seed{s}"])) for s in (11, 12, 13)]
    assert len(set(seeds + [tuple(alone)])) == 4, "different seeds gave the same tokens"
    greedy_tokens = served.reference([JOIN_PROMPTS[0]])[0]
    assert driver.tokens(ids["top_k_1"]) == greedy_tokens
    assert alone != greedy_tokens  # temperature 0.8 really samples


def _transformers_generate(checkpoint: Path, prompt: list[int], **kwargs: Any):
    model = _reference_model(str(checkpoint.resolve()))
    ids = torch.tensor([prompt])
    with single_thread(), torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              do_sample=False, eos_token_id=None, return_dict_in_generate=True,
                              output_logits=True, **kwargs)


@pytest.mark.parametrize("served", ["qwen2-tp2pp2"], indirect=True)
def test_repetition_penalty_and_logprobs_match_transformers(served: Served) -> None:
    prompt = JOIN_PROMPTS[2]
    driver = served.driver()
    driver.add(1, prompt, NEW_TOKENS, repetition_penalty=1.3)
    driver.add(2, prompt, NEW_TOKENS)
    served.run(lambda g: drive(g, driver))
    penalized, plain = driver.tracked(1), driver.tracked(2)
    reference = _transformers_generate(served.checkpoint, prompt, repetition_penalty=1.3)
    assert penalized.generated == reference.sequences[0, len(prompt):].tolist()
    plain_ref = _transformers_generate(served.checkpoint, prompt)
    assert plain.generated == plain_ref.sequences[0, len(prompt):].tolist()
    assert penalized.generated != plain.generated  # the penalty mattered
    # Logprobs are those of the raw model distribution, also for the penalized request.
    for got, ref in ((plain, plain_ref), (penalized, reference)):
        raw = torch.stack([torch.log_softmax(step[0].float(), -1) for step in ref.logits])
        chosen = raw.gather(1, torch.tensor(got.generated).unsqueeze(1)).squeeze(1)
        assert torch.allclose(torch.tensor(got.logprobs), chosen, atol=1e-4), got.id


# -- refused steps, Warmup and Reset -----------------------------------------------------------------

def _new(step: shard_pb2.StepRequest, tokens: list[int], blocks: list[int]) -> None:
    rid = fresh_id()
    step.start.append(shard_pb2.NewSequence(id=rid, prompt_len=len(tokens)))
    step.work.append(shard_pb2.Work(id=rid, token_ids=tokens, new_blocks=blocks, sample=True))


# Each spoils a valid step (the driver's next one, which decodes every live request) in one way.
SPOILERS: dict[str, tuple[Callable[[shard_pb2.StepRequest, list[int]], None], str]] = {
    "vocab": (lambda s, ids: _new(s, [5, VOCAB], [31]), f"token id {VOCAB} is outside the vocabulary"),
    "positions": (lambda s, ids: _new(s, [3] * (MAX_POSITIONS + 1), []), "exceed max_position_embeddings = 512"),
    "blocks_missing": (lambda s, ids: _new(s, [3] * 20, [31]), "need 2 KV blocks, it holds 1"),
    "outside_pool": (lambda s, ids: _new(s, [3, 4], [32]), "block 32 is outside the pool (32 blocks)"),
    "unknown_free": (lambda s, ids: s.free.append(987654321), "does not hold"),
    "duplicate_start": (lambda s, ids: s.start.append(shard_pb2.NewSequence(id=ids[0], prompt_len=1)),
                        "already exist"),
}


def _codes(replies: list) -> list[grpc.StatusCode | None]:
    return [r.code() if isinstance(r, grpc.aio.AioRpcError) else None for r in replies]


@pytest.mark.parametrize("served", ["llama-tp2pp2"], indirect=True)
def test_refused_steps_change_nothing_on_any_rank(served: Served) -> None:
    ids = [fresh_id() for _ in PROMPTS]
    driver = served.driver()
    for rid, prompt in zip(ids, PROMPTS):
        driver.add(rid, prompt, NEW_TOKENS)

    async def body(g: ShardGroup) -> dict[str, list]:
        for _ in range(3):
            driver.absorb((await g.step(driver.next_step())).generations)
        out = {}
        for name, (spoil, _) in SPOILERS.items():
            step = driver.peek()
            spoil(step, ids)
            out[name] = await call_all(g, "Step", step)
        await drive(g, driver)
        return out

    out = served.run(body, step_timeout=30.0)
    for name, (_, message) in SPOILERS.items():
        assert _codes(out[name]) == [grpc.StatusCode.INVALID_ARGUMENT] * served.layout.world_size, name
        assert all(message in r.details() for r in out[name]), (name, out[name][0].details())
    assert [driver.tokens(r) for r in ids] == served.reference(PROMPTS)


@pytest.mark.parametrize("served", ["llama-tp2pp2"], indirect=True)
def test_warmup_sizes_the_pool_and_reset_forgets_every_sequence(served: Served) -> None:
    """Warmup capped at 100 tokens: 6 blocks, all usable by one request; block 6 is refused; Warmup
    and Reset forget live sequences; Warmup uncapped gives the --kv-cache-tokens pool back."""
    prompt = [3 + i % 50 for i in range(90)]

    async def body(g: ShardGroup) -> dict[str, Any]:
        out: dict[str, Any] = {"capped": await warmup(g, max_kv_tokens=100)}
        out["info"] = [(i.kv_blocks, i.kv_block_size) for i in await g.info()]
        full = Driver(16, 6)
        full.add(1, prompt, 6)
        await drive(g, full)
        out["full"] = full.tokens(1)
        beyond = shard_pb2.StepRequest()
        _new(beyond, [3, 4], [6])
        out["beyond"] = _codes(await call_all(g, "Step", beyond))
        out["after_warmup"] = await _forgotten(g, lambda: warmup(g))
        out["after_reset"] = await _forgotten(g, g.clear)
        out["restored"] = [(i.kv_blocks, i.kv_block_size) for i in await g.info()]
        return out

    out = served.run(body)
    world = served.layout.world_size
    assert out["capped"] == (6, 16) and out["info"] == [(6, 16)] * world
    assert out["full"] == served.reference([prompt], 6)[0]
    assert out["beyond"] == [grpc.StatusCode.INVALID_ARGUMENT] * world
    assert out["after_warmup"] == out["after_reset"] == [grpc.StatusCode.INVALID_ARGUMENT] * world
    assert out["restored"] == [(KV_TOKENS // 16, 16)] * world


async def _forgotten(g: ShardGroup, forget: Callable[[], Awaitable[Any]]) -> list:
    """Starts a sequence, calls `forget`, then decodes it: every rank's status code."""
    driver = Driver(16, 32)
    driver.add(fresh_id(), PROMPTS[2], 4)
    driver.absorb((await g.step(driver.next_step())).generations)
    await forget()
    return _codes(await call_all(g, "Step", driver.next_step()))


# -- a group that cannot start -------------------------------------------------------------------------

def test_bad_partition_fails_every_rank_and_the_harness_cleans_up(checkpoint_factory, tmp_path: Path) -> None:
    """--pp-partition 3,3 on 5 layers: both ranks exit; nothing is left running or on disk."""
    checkpoint = checkpoint_factory(**ARCH_CHECKPOINTS["qwen3"])

    async def body() -> None:
        async with shard_group(checkpoint, tmp_path, pp=2, pp_partition="3,3", timeout=60.0):
            raise AssertionError("a group with a bad partition served")

    with pytest.raises(RuntimeError, match="exited before serving"):
        asyncio.run(body())
    assert list(tmp_path.glob("*.sock")) == []
