"""The shard engine in-process at world size 1: batch cache, KV lifetime, stopping, resuming, errors."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch

from checkpoints import random_prompts, reference_generate
from shardline.proto import shard_pb2
from shardline.shard.config import GroupConfig, ShardConfig
from shardline.shard.engine import CapacityError, Engine, UnknownBatchError
from shardline.shard.parallel import init_parallel

VOCAB = 331
PROMPTS = random_prompts(4, VOCAB, min_len=1, max_len=18, seed=11)


def make_engine(model_dir: Path, kv_cache_tokens: int = 0) -> Engine:
    cfg = ShardConfig(model_dir=model_dir, kv_cache_tokens=kv_cache_tokens)
    return Engine(cfg, init_parallel(GroupConfig(), "cpu"))


def req(rid: int, prompt: list[int], max_new: int, *, generated: list[int] = (), ignore_eos: bool = True,
        **sampling) -> shard_pb2.Request:
    return shard_pb2.Request(id=rid, prompt_token_ids=prompt, generated_token_ids=list(generated),
                             sampling=shard_pb2.SamplingParameters(**sampling),
                             stopping=shard_pb2.StoppingCriteria(max_new_tokens=max_new, ignore_eos=ignore_eos))


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory) -> Path:
    return checkpoint_factory(arch="llama", num_layers=2)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> list[list[int]]:
    return reference_generate(checkpoint, PROMPTS, 16)


@pytest.fixture
def engine(checkpoint: Path) -> Engine:
    return make_engine(checkpoint)


def run_to_end(e: Engine, batch_id: int, gens: list) -> dict[int, list]:
    out: dict[int, list] = {}
    while True:
        for g in gens:
            out.setdefault(g.request_id, []).append(g)
        if batch_id not in e.batches:
            return out
        gens, _ = e.decode([batch_id])


def test_merged_and_filtered_batches_keep_their_kv_in_place(engine: Engine, reference) -> None:
    tokens: dict[int, list[int]] = {}

    def record(gens) -> None:
        for g in gens:
            tokens.setdefault(g.request_id, []).append(g.token_id)

    record(engine.prefill(shard_pb2.Batch(id=1, requests=[req(0, PROMPTS[0], 16), req(1, PROMPTS[1], 16)])))
    slabs = {s.request_id: (weakref.ref(s.kv), s.kv.k.data_ptr()) for s in engine.batches[1].sequences}
    record(engine.decode([1])[0])
    record(engine.prefill(shard_pb2.Batch(id=2, requests=[req(2, PROMPTS[2], 16), req(3, PROMPTS[3], 16)])))
    slabs.update({s.request_id: (weakref.ref(s.kv), s.kv.k.data_ptr()) for s in engine.batches[2].sequences})
    gens, merged = engine.decode([1, 2])
    record(gens)
    assert merged == 1 and 2 not in engine.batches and [g.request_id for g in gens] == [0, 1, 2, 3]
    dropped = weakref.ref(engine.batches[1].sequences[1].kv.k)
    in_use = engine.kv_tokens_in_use
    assert engine.filter(1, [0, 2, 3]) == 3
    gc.collect()
    assert dropped() is None  # request 1's KV is freed at once
    assert engine.kv_tokens_in_use == in_use - (len(PROMPTS[1]) + 16)
    for s in engine.batches[1].sequences:
        kv, ptr = slabs[s.request_id]
        assert s.kv is kv() and s.kv.k.data_ptr() == ptr  # never copied
    for rid, gs in run_to_end(engine, 1, []).items():
        tokens[rid] += [g.token_id for g in gs]
    assert tokens[1] == reference[1][:3]
    assert [tokens[i] for i in (0, 2, 3)] == [reference[i] for i in (0, 2, 3)]
    assert engine.batches == {} and engine.kv_tokens_in_use == 0


def test_resumed_request_continues_exactly(engine: Engine, reference) -> None:
    """A request re-prefilled with its first tokens generated continues as if never interrupted."""
    done = reference[2][:5]
    gens = engine.prefill(shard_pb2.Batch(id=1, requests=[req(7, PROMPTS[2], 16, generated=done)]))
    out = run_to_end(engine, 1, gens)[7]
    assert [g.token_id for g in out] == reference[2][5:]
    assert out[-1].finish_reason == shard_pb2.FINISH_REASON_LENGTH
    assert all(g.finish_reason == shard_pb2.FINISH_REASON_UNSPECIFIED for g in out[:-1])


def test_generation_stops_at_eos_unless_ignored(checkpoint: Path, reference, tmp_path: Path) -> None:
    """With the 4th greedy token declared EOS, generation stops there (and goes on with ignore_eos)."""
    eos = reference[0][3]
    assert eos not in reference[0][:3]
    path = tmp_path / "ckpt"
    shutil.copytree(checkpoint, path)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((path / name).read_text())
        config["eos_token_id"] = eos
        (path / name).write_text(json.dumps(config))
    e = make_engine(path)
    gens = e.prefill(shard_pb2.Batch(id=1, requests=[req(0, PROMPTS[0], 16, ignore_eos=False),
                                                      req(1, PROMPTS[0], 16, ignore_eos=True)]))
    out = run_to_end(e, 1, gens)
    assert [g.token_id for g in out[0]] == reference[0][:4]
    assert out[0][-1].finish_reason == shard_pb2.FINISH_REASON_EOS
    assert [g.token_id for g in out[1]] == reference[0]


def test_request_finishing_at_prefill_leaves_no_batch(engine: Engine, reference) -> None:
    gens = engine.prefill(shard_pb2.Batch(id=5, requests=[req(0, PROMPTS[1], 1)]))
    assert [(g.token_id, g.finish_reason) for g in gens] == [(reference[1][0], shard_pb2.FINISH_REASON_LENGTH)]
    assert engine.batches == {}


def test_invalid_calls_change_nothing(engine: Engine) -> None:
    engine.prefill(shard_pb2.Batch(id=1, requests=[req(0, PROMPTS[0], 4)]))
    with pytest.raises(UnknownBatchError):
        engine.decode([1, 99])
    with pytest.raises(UnknownBatchError):
        engine.filter(99, [])
    with pytest.raises(ValueError, match="already in use"):
        engine.prefill(shard_pb2.Batch(id=1, requests=[req(1, PROMPTS[1], 4)]))
    with pytest.raises(ValueError, match="request id 0 is already running"):
        engine.prefill(shard_pb2.Batch(id=2, requests=[req(0, PROMPTS[1], 4)]))
    with pytest.raises(ValueError, match=f"token id {VOCAB} is outside the vocabulary"):
        engine.prefill(shard_pb2.Batch(id=2, requests=[req(1, [3, VOCAB], 4)]))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings = 512"):
        engine.prefill(shard_pb2.Batch(id=2, requests=[req(1, [3] * 500, 13)]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.prefill(shard_pb2.Batch(id=2, requests=[req(1, [3], 2, generated=[4, 5])]))
    assert list(engine.batches) == [1] and len(engine.batches[1]) == 1
    assert len(engine.batches[1].sequences[0].generated) == 1


def test_decode_naming_a_batch_twice_is_refused(engine: Engine) -> None:
    engine.prefill(shard_pb2.Batch(id=1, requests=[req(0, PROMPTS[0], 4)]))
    with pytest.raises(ValueError, match="more than once"):
        engine.decode([1, 1])
    assert len(engine.batches[1]) == 1  # untouched: still decodes normally
    gens, _ = engine.decode([1])
    assert len(gens) == 1


def test_prefill_of_an_empty_batch_or_repeated_request_ids_is_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="no requests"):
        engine.prefill(shard_pb2.Batch(id=1))
    with pytest.raises(ValueError, match="request id 3 appears twice"):
        engine.prefill(shard_pb2.Batch(id=1, requests=[req(3, PROMPTS[0], 4), req(3, PROMPTS[1], 4)]))
    assert engine.batches == {}


def test_capacity_is_enforced_after_warmup_and_freed_by_clear(checkpoint: Path) -> None:
    e = make_engine(checkpoint, kv_cache_tokens=100)
    e.prefill(shard_pb2.Batch(id=1, requests=[req(0, PROMPTS[0], 90)]))  # not enforced before Warmup
    e.clear(None)
    assert e.warmup(max_prefill_tokens=40, max_total_tokens=0) == 100
    assert e.batches == {}
    e.prefill(shard_pb2.Batch(id=1, requests=[req(0, [5] * 10, 50)]))
    with pytest.raises(CapacityError, match="needs 101 KV tokens, capacity is 100"):
        e.prefill(shard_pb2.Batch(id=2, requests=[req(1, [5] * 10, 31)]))
    e.prefill(shard_pb2.Batch(id=2, requests=[req(1, [5] * 10, 30)]))
    e.clear(1)
    e.prefill(shard_pb2.Batch(id=3, requests=[req(2, [5] * 10, 50)]))
    assert e.kv_tokens_in_use == 100


def test_warmup_capacity_from_memory_and_max_total_tokens(engine: Engine) -> None:
    from_memory = engine.warmup(max_prefill_tokens=64, max_total_tokens=0)
    assert from_memory > 10_000
    assert engine.warmup(max_prefill_tokens=64, max_total_tokens=300) == 300
    assert engine.kv_capacity == 300 and engine.batches == {}


def test_logprobs_of_greedy_tokens_match_a_full_forward(engine: Engine, checkpoint: Path, reference) -> None:
    from checkpoints import _reference_model
    gens = engine.prefill(shard_pb2.Batch(id=1, requests=[req(0, PROMPTS[3], 6)]))
    out = run_to_end(engine, 1, gens)[0]
    ids = torch.tensor([PROMPTS[3] + reference[3][:6]])
    with torch.no_grad():
        logits = _reference_model(str(checkpoint.resolve()))(ids).logits[0].float()
    start = len(PROMPTS[3]) - 1
    expected = torch.log_softmax(logits[start:start + 6], -1).gather(1, ids[0, start + 1:].unsqueeze(1))
    assert torch.allclose(torch.tensor([g.logprob for g in out]), expected.squeeze(1), atol=1e-4)


@pytest.mark.parametrize("window_layers", [1, 2])
def test_sliding_window_only_on_the_layers_that_have_it(checkpoint_factory, tmp_path, window_layers) -> None:
    """Qwen2 with use_sliding_window: layers below max_window_layers attend fully, the rest within
    the window; prompts longer than the window tell the two apart."""
    model = shutil.copytree(checkpoint_factory(arch="qwen2", num_layers=3), tmp_path / "qwen2-window")
    config = json.loads((model / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=6, max_window_layers=window_layers, layer_types=None)
    (model / "config.json").write_text(json.dumps(config))
    prompts = random_prompts(3, 331, min_len=10, max_len=16, seed=4)
    expected = reference_generate(model, prompts, 12)
    e = make_engine(model)
    gens = e.prefill(shard_pb2.Batch(id=1, requests=[req(i, p, 12) for i, p in enumerate(prompts)]))
    got = run_to_end(e, 1, gens)
    assert [[g.token_id for g in got[i]] for i in range(len(prompts))] == expected
