"""Shard groups in separate processes (gloo, CPU, float32) driven through the internal gRPC API.

One group per (architecture, layout) is started once (a module fixture; spawning is what costs)
and serves every check for that layout: greedy parity with transformers for a batch of prompts,
requests joined into a running batch and filtered out mid-way, and Info (ranks, layers, exact
parameter bytes). A few layouts additionally serve the seeded-sampling checks and the error and
KV-capacity checks. The checkpoints are chosen so that the matrix covers, per architecture, TP 1,
2 and 4, PP 2 and TP 2 x PP 2, and among them: a vocabulary (331) not divisible by any TP size, one
KV head under TP 2 and 4 (mistral), KV heads replicated under TP 4, uneven default PP splits (3 and
5 layers over 2 stages), explicit --pp-partition overrides (llama "1,2", qwen3 "4,1"), tied
embeddings under PP (qwen3, with head_dim 24 != hidden / heads), qkv biases (qwen2) and a
multi-file `model.safetensors.index.json` checkpoint (llama).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import torch
from safetensors import safe_open

from checkpoints import _reference_model, random_prompts, reference_generate, single_thread
from shard_harness import (RunningGroup, call_all, fresh_id, generate, greedy, joined_run,
                           request, run_batches, running_group, shard_group)
from shardline.proto import shard_pb2
from shardline.router.shards import ShardGroup

pytestmark = pytest.mark.slow

T = TypeVar("T")
VOCAB = 331
NEW_TOKENS = 24
KV_TOKENS = 512  # --kv-cache-tokens of every group; enforced only after Warmup
MAX_POSITIONS = 512  # the checkpoints' max_position_embeddings

ARCH_CHECKPOINTS: dict[str, dict[str, Any]] = {
    "llama": {"arch": "llama", "num_layers": 3, "max_shard_size": "60KB"},
    "mistral": {"arch": "mistral", "num_layers": 2, "num_kv_heads": 1},
    "qwen2": {"arch": "qwen2", "num_layers": 4},
    "qwen3": {"arch": "qwen3", "num_layers": 5, "head_dim": 24, "tie_word_embeddings": True},
}


@dataclass(frozen=True)
class Layout:
    arch: str
    tp: int
    pp: int
    # Global layer ranges per stage, written out by hand (not computed by shard/pipeline.py).
    stages: tuple[tuple[int, int], ...]
    partition: str = ""

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


def _layouts() -> dict[str, Layout]:
    stages_pp2 = {"llama": ((0, 2), (2, 3)), "mistral": ((0, 1), (1, 2)),
                  "qwen2": ((0, 2), (2, 4)), "qwen3": ((0, 3), (3, 5))}
    overrides = {"llama": ("1,2", ((0, 1), (1, 3))), "qwen3": ("4,1", ((0, 4), (4, 5)))}
    out = {}
    for arch, kw in ARCH_CHECKPOINTS.items():
        whole = ((0, kw["num_layers"]),)
        for tp in (1, 2, 4):
            out[f"{arch}-tp{tp}"] = Layout(arch, tp, 1, whole)
        out[f"{arch}-pp2"] = Layout(arch, 1, 2, stages_pp2[arch])
        partition, stages = overrides.get(arch, ("", stages_pp2[arch]))
        out[f"{arch}-tp2pp2"] = Layout(arch, 2, 2, stages, partition)
    return out


LAYOUTS = _layouts()
PROMPTS = [random_prompts(1, VOCAB, min_len=n, max_len=n, seed=n)[0] for n in (1, 6, 13, 21)]
JOIN_PROMPTS = [random_prompts(1, VOCAB, min_len=n, max_len=n, seed=100 + n)[0] for n in (9, 2, 17, 4, 11)]


@dataclass
class Served:
    layout: Layout
    checkpoint: Path
    running: RunningGroup

    def run(self, body: Callable[[ShardGroup], Awaitable[T]], step_timeout: float = 60.0) -> T:
        """Runs `body(group)` with a fresh client in a fresh event loop."""
        async def main() -> T:
            async with self.running.connect(step_timeout=step_timeout) as group:
                return await body(group)
        return asyncio.run(main())

    def reference(self, prompts: list[list[int]], max_new_tokens: int = NEW_TOKENS) -> list[list[int]]:
        return reference_generate(self.checkpoint, prompts, max_new_tokens)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def served(request: pytest.FixtureRequest, checkpoint_factory: Callable[..., Path],
           tmp_path_factory: pytest.TempPathFactory):
    layout = LAYOUTS[request.param]
    checkpoint = checkpoint_factory(**ARCH_CHECKPOINTS[layout.arch])
    with running_group(checkpoint, tmp_path_factory.mktemp("sockets"), tp=layout.tp, pp=layout.pp,
                       pp_partition=layout.partition, kv_cache_tokens=KV_TOKENS) as running:
        yield Served(layout, checkpoint, running)
        assert not running.exited(), f"shard ranks exited during the tests: {running.exited()}"


# -- every layout ---------------------------------------------------------------------------------

def test_greedy_matches_transformers(served: Served) -> None:
    tokens = served.run(lambda g: greedy(g, PROMPTS, NEW_TOKENS))
    assert tokens == served.reference(PROMPTS)


def test_joined_and_filtered_requests_get_their_solo_tokens(served: Served) -> None:
    """Batch A runs 3 steps alone, batch B joins, then one request of each is filtered out."""
    p = JOIN_PROMPTS
    first = [request(p[0], NEW_TOKENS), request(p[1], 10)]
    second = [request(p[2], NEW_TOKENS), request(p[3], 1), request(p[4], 12)]
    join_after, drop_after = 3, 2
    dropped = [first[0].id, second[2].id]
    collected = served.run(lambda g: joined_run(g, first, second, join_after=join_after,
                                                drop=dropped, drop_after=drop_after))
    solo = served.reference(p)
    expected_lengths = {first[0].id: 1 + join_after + drop_after, first[1].id: 10,
                        second[0].id: NEW_TOKENS, second[1].id: 1, second[2].id: 1 + drop_after}
    for req, reference in zip(first + second, solo):
        got = collected.tokens[req.id]
        assert len(got) == expected_lengths[req.id], f"request {req.id}"
        assert got == reference[:len(got)], f"request {req.id} (prompt length {len(req.prompt_token_ids)})"


def _checkpoint_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def expected_parameter_bytes(checkpoint: Path, tp: int, tp_rank: int, layers: range, first: bool,
                             last: bool, kv_heads: int, tied: bool) -> int:
    """Float32 bytes one rank should hold, from the checkpoint's tensor shapes and the sharding rules:
    q/gate/up rows and o/down columns split by TP; k/v split by KV head, one head each when there are
    fewer KV heads than ranks; embedding and lm_head rows padded to ceil(vocab / tp); norms (and
    row-parallel biases) whole; embedding on the first stage, final norm and lm_head on the last;
    with tied embeddings the last stage holds its own copy unless it is also the first.
    """
    total = 0
    for name, shape in _checkpoint_shapes(checkpoint).items():
        numel = math.prod(shape)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = -(-shape[0] // tp) * shape[1]
            if name == "model.embed_tokens.weight":
                total += rows * first + rows * (tied and last and not first)
            else:
                total += rows * last
        elif name == "model.norm.weight":
            total += numel * last
        else:
            index, module = int(name.split(".")[2]), name.split(".")[-2]
            if index not in layers:
                continue
            if module in ("q_proj", "gate_proj", "up_proj") or (
                    module in ("o_proj", "down_proj") and name.endswith("weight")):
                total += numel // tp
            elif module in ("k_proj", "v_proj"):
                total += numel // kv_heads * max(1, kv_heads // tp)
            else:
                total += numel
    return total * 4


def test_info_and_parameter_bytes(served: Served) -> None:
    layout, kw = served.layout, ARCH_CHECKPOINTS[served.layout.arch]
    infos = served.run(lambda g: g.info())
    tied = kw.get("tie_word_embeddings", False)
    kv_heads = kw.get("num_kv_heads", 2)
    whole_model = sum(math.prod(s) for s in _checkpoint_shapes(served.checkpoint).values()) * 4
    by_rank: dict[tuple[int, int], int] = {}
    for rank, info in enumerate(infos):
        tp_rank, pp_rank = rank % layout.tp, rank // layout.tp
        assert (info.rank, info.world_size, info.tp_rank, info.tp_size, info.pp_rank, info.pp_size) == (
            rank, layout.world_size, tp_rank, layout.tp, pp_rank, layout.pp)
        assert (info.device, info.dtype, info.model_type, info.vocab_size) == ("cpu", "float32", layout.arch, VOCAB)
        assert info.backend == ("none" if layout.world_size == 1 else "gloo")
        assert list(info.eos_token_ids) == [1] and info.max_position_embeddings == MAX_POSITIONS
        assert (info.first_layer, info.last_layer) == layout.stages[pp_rank]
        layers = range(*layout.stages[pp_rank])
        first, last = pp_rank == 0, pp_rank == layout.pp - 1
        assert info.parameter_bytes == expected_parameter_bytes(
            served.checkpoint, layout.tp, tp_rank, layers, first, last, kv_heads, tied), f"rank {rank}"
        by_rank[tp_rank, pp_rank] = info.parameter_bytes
    if layout.world_size == 1:
        assert by_rank[0, 0] == whole_model
    if layout.tp == 2 and layout.pp == 1:
        assert all(b <= 0.55 * whole_model for b in by_rank.values()), (by_rank, whole_model)
    if layout.pp == 2 and layout.tp == 1:
        shapes = _checkpoint_shapes(served.checkpoint)
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
    batch = shard_pb2.Batch(id=fresh_id(), requests=[request(p, 2) for p in PROMPTS[:2]])
    replies = served.run(lambda g: call_all(g, "Prefill", shard_pb2.PrefillRequest(batch=batch)))
    assert all(not isinstance(r, grpc.aio.AioRpcError) for r in replies), replies
    assert len(replies) == served.layout.world_size and len(replies[0].generations) == 2
    assert all(list(r.generations) == list(replies[0].generations) for r in replies)
    served.run(lambda g: g.clear(batch.id))


# -- seeded sampling (a layout whose sampling rank is not rank 0) ------------------------------------

SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.9)


@pytest.mark.parametrize("served", ["qwen2-tp2pp2"], indirect=True)
def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates(served: Served) -> None:
    prompt, others = JOIN_PROMPTS[0], JOIN_PROMPTS[1:]

    def sampled(seed: int, prompt: list[int] = prompt) -> shard_pb2.Request:
        return request(prompt, NEW_TOKENS, seed=seed, **SAMPLED)

    async def body(g: ShardGroup) -> dict[str, Any]:
        out: dict[str, Any] = {}
        out["alone"] = (await generate(g, [sampled(7)]))[0]
        out["again"] = (await generate(g, [sampled(7)]))[0]
        mates = [request(others[0], NEW_TOKENS), sampled(8, others[1]),
                 request(others[2], 5, temperature=1.5, seed=9), sampled(7, others[3])]
        out["batched"] = (await generate(g, mates[:2] + [sampled(7)] + mates[2:]))[2]
        late = sampled(7)
        collected = await joined_run(g, [sampled(3, others[0]), sampled(4, others[1])], [late], join_after=4)
        out["joined"] = collected.tokens[late.id]
        out["seeds"] = [(await generate(g, [sampled(seed)]))[0] for seed in (11, 12, 13)]
        out["top_k_1"] = (await generate(g, [request(prompt, NEW_TOKENS, temperature=0.8, top_k=1, seed=5)]))[0]
        return out

    out = served.run(body)
    assert len(out["alone"]) == NEW_TOKENS and all(0 <= t < VOCAB for t in out["alone"])
    assert out["again"] == out["alone"]
    assert out["batched"] == out["alone"]
    assert out["joined"] == out["alone"]
    assert len({tuple(t) for t in out["seeds"] + [out["alone"]]}) == 4, "different seeds gave the same tokens"
    greedy_tokens = served.reference([prompt])[0]
    assert out["top_k_1"] == greedy_tokens
    assert out["alone"] != greedy_tokens  # temperature 0.8 really samples


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

    async def body(g: ShardGroup):
        penalized, plain = request(prompt, NEW_TOKENS, repetition_penalty=1.3), request(prompt, NEW_TOKENS)
        return await run_batches(g, [penalized, plain]), penalized.id, plain.id

    collected, penalized_id, plain_id = served.run(body)
    reference = _transformers_generate(served.checkpoint, prompt, repetition_penalty=1.3)
    assert collected.tokens[penalized_id] == reference.sequences[0, len(prompt):].tolist()
    plain = _transformers_generate(served.checkpoint, prompt)
    assert collected.tokens[plain_id] == plain.sequences[0, len(prompt):].tolist()
    assert collected.tokens[penalized_id] != collected.tokens[plain_id]  # the penalty mattered
    # Logprobs are those of the raw model distribution, also for the penalized request.
    for rid, ref in ((plain_id, plain), (penalized_id, reference)):
        raw = torch.stack([torch.log_softmax(step[0].float(), -1) for step in ref.logits])
        chosen = raw.gather(1, torch.tensor(collected.tokens[rid]).unsqueeze(1)).squeeze(1)
        assert torch.allclose(torch.tensor(collected.logprobs[rid]), chosen, atol=1e-4), rid


# -- errors and KV capacity --------------------------------------------------------------------------

def _codes(replies: list) -> list[grpc.StatusCode | None]:
    return [r.code() if isinstance(r, grpc.aio.AioRpcError) else None for r in replies]


@pytest.mark.parametrize("served", ["llama-tp2pp2"], indirect=True)
def test_errors_reach_every_rank_and_the_group_still_serves(served: Served) -> None:
    world = served.layout.world_size

    async def body(g: ShardGroup) -> dict[str, list]:
        out = {}
        out["decode"] = await call_all(g, "Decode", shard_pb2.DecodeRequest(batch_ids=[987654321]))
        out["filter"] = await call_all(g, "FilterBatch", shard_pb2.FilterBatchRequest(batch_id=987654321))
        bad = shard_pb2.Batch(id=fresh_id(), requests=[request(PROMPTS[1], 4), request([5, VOCAB, 7], 4)])
        out["vocab"] = await call_all(g, "Prefill", shard_pb2.PrefillRequest(batch=bad))
        too_long = shard_pb2.Batch(id=fresh_id(), requests=[request([3] * 500, MAX_POSITIONS - 499)])
        out["positions"] = await call_all(g, "Prefill", shard_pb2.PrefillRequest(batch=too_long))
        live = shard_pb2.Batch(id=fresh_id(), requests=[request(PROMPTS[0], 3)])
        await g.prefill(live)
        again = shard_pb2.Batch(id=live.id, requests=[request(PROMPTS[2], 3)])
        out["duplicate"] = await call_all(g, "Prefill", shard_pb2.PrefillRequest(batch=again))
        await g.clear(live.id)
        out["after"] = [await greedy(g, PROMPTS, NEW_TOKENS)]
        return out

    out = served.run(body, step_timeout=30.0)
    assert _codes(out["decode"]) == [grpc.StatusCode.NOT_FOUND] * world
    assert _codes(out["filter"]) == [grpc.StatusCode.NOT_FOUND] * world
    assert _codes(out["vocab"]) == [grpc.StatusCode.INVALID_ARGUMENT] * world
    assert all(f"token id {VOCAB}" in r.details() for r in out["vocab"])
    assert _codes(out["positions"]) == [grpc.StatusCode.INVALID_ARGUMENT] * world
    assert _codes(out["duplicate"]) == [grpc.StatusCode.INVALID_ARGUMENT] * world
    assert out["after"][0] == served.reference(PROMPTS)


@pytest.mark.parametrize("served", ["llama-tp2pp2"], indirect=True)
def test_filter_and_clear_free_kv_capacity(served: Served) -> None:
    """--kv-cache-tokens 512: once Warmup has run, Prefill is refused past it until KV is freed."""
    def needing(tokens: int, prompt_len: int = 8) -> shard_pb2.Request:
        return request([3 + i % 50 for i in range(prompt_len)], tokens - prompt_len)

    async def body(g: ShardGroup) -> dict[str, Any]:
        out: dict[str, Any] = {}
        out["capacity"] = await g.warmup(max_prefill_tokens=32)
        out["info"] = [i.kv_capacity_tokens for i in await g.info()]
        held = shard_pb2.Batch(id=fresh_id(), requests=[needing(100), needing(100)])
        await g.prefill(held)
        whole = shard_pb2.Batch(id=fresh_id(), requests=[needing(KV_TOKENS, prompt_len=500)])
        out["full_while_held"] = _codes(await call_all(g, "Prefill", shard_pb2.PrefillRequest(batch=whole)))
        rest = shard_pb2.Batch(id=fresh_id(), requests=[needing(KV_TOKENS - 200)])
        out["rest"] = len((await g.prefill(rest)).generations)
        await g.clear(rest.id)
        out["kept"] = await g.filter(held.id, [held.requests[1].id])
        over = shard_pb2.Batch(id=fresh_id(), requests=[needing(KV_TOKENS - 99)])
        out["over_after_filter"] = _codes(await call_all(g, "Prefill", shard_pb2.PrefillRequest(batch=over)))
        fits = shard_pb2.Batch(id=fresh_id(), requests=[needing(KV_TOKENS - 100)])
        out["fits_after_filter"] = len((await g.prefill(fits)).generations)
        await g.clear()
        out["full_after_clear"] = (await g.prefill(whole)).generations[0].token_id
        await g.clear()
        return out

    out = served.run(body)
    world = served.layout.world_size
    assert out["capacity"] == KV_TOKENS and out["info"] == [KV_TOKENS] * world
    assert out["full_while_held"] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * world
    assert out["rest"] == 1
    assert out["kept"] == 1
    assert out["over_after_filter"] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * world
    assert out["fits_after_filter"] == 1
    whole_prompt = [3 + i % 50 for i in range(500)]
    assert out["full_after_clear"] == served.reference([whole_prompt], 1)[0][0]


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
