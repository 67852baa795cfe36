"""The shard engine: loads this rank's slice, keeps the batches, runs Prefill and Decode steps.

Every rank of the group runs the same call in lock-step. A step embeds (first stage) or receives
hidden states (later stages), runs this stage's layers, then sends them on or, on the last stage,
computes logits. The sampling rank (TP rank 0 of the last stage) picks the tokens and broadcasts
them, so every rank keeps identical batch state and returns identical generations. Anything that
can be rejected is checked before the first collective, identically on every rank, so a bad call
fails on all ranks instead of leaving some waiting in a collective.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from shardline.proto import shard_pb2
from shardline.shard.attention import StepContext
from shardline.shard.batch import Batch, Sequence
from shardline.shard.config import ShardConfig
from shardline.shard.kv_cache import SequenceKV, bytes_per_token, capacity_tokens
from shardline.shard.layers import column_major_weights, local_kv_heads
from shardline.shard.models.registry import load_config, model_class
from shardline.shard.parallel import ParallelState
from shardline.shard.pipeline import stage_layers
from shardline.shard.sampling import sample
from shardline.shard.weights import load_weights, parameter_bytes


class UnknownBatchError(KeyError):
    """A call named a batch this shard does not hold."""


class CapacityError(RuntimeError):
    """A prefill would exceed the KV capacity reported at Warmup."""


def eos_token_ids(model_dir: Path, config) -> frozenset[int]:
    ids: set[int] = set()
    sources = [getattr(config, "eos_token_id", None)]
    if (model_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig
        sources.append(GenerationConfig.from_pretrained(str(model_dir)).eos_token_id)
    for src in sources:
        ids.update([src] if isinstance(src, int) else (src or []))
    return frozenset(ids)


class Engine:
    def __init__(self, cfg: ShardConfig, ps: ParallelState):
        self.cfg, self.ps = cfg, ps
        self.config = load_config(cfg.model_dir)
        self.layers = stage_layers(self.config.num_hidden_layers, ps.pp_size, ps.pp_rank,
                                   cfg.group.pp_partition)
        self.dtype = getattr(torch, cfg.dtype)
        with torch.device("meta"):
            self.model = model_class(self.config)(self.config, ps, self.layers, self.dtype)
        self.model.to_empty(device=ps.device)
        self.model.tie_weights()
        load_weights(self.model, cfg.model_dir)
        if ps.device.type == "cpu":
            column_major_weights(self.model)
        self.model.materialize(ps.device)
        self.model.eval()
        self.spec = self.model.spec
        self.eos_ids = eos_token_ids(cfg.model_dir, self.config)
        self.parameter_bytes = parameter_bytes(self.model)
        self.kv_heads = local_kv_heads(self.spec.num_kv_heads, ps.tp_size)
        self.kv_capacity = 0  # tokens; 0 until Warmup measured it (then enforced)
        self.batches: dict[int, Batch] = {}

    # -- KV accounting ---------------------------------------------------------------------------
    @property
    def kv_tokens_in_use(self) -> int:
        return sum(s.capacity for b in self.batches.values() for s in b.sequences)

    def _allocate(self, seq: Sequence) -> None:
        seq.kv = SequenceKV(len(self.layers), self.kv_heads, seq.capacity, self.spec.head_dim,
                            self.dtype, self.ps.device)

    # -- calls -----------------------------------------------------------------------------------
    def prefill(self, batch: shard_pb2.Batch) -> list[shard_pb2.Generation]:
        seqs = [Sequence.from_pb(r) for r in batch.requests]
        self._check_prefill(batch.id, seqs)
        for s in seqs:
            self._allocate(s)
        self.batches[batch.id] = Batch(batch.id, seqs)
        ids = [t for s in seqs for t in s.prefill_ids()]
        return self._step(self.batches[batch.id], ids, [len(s.prefill_ids()) for s in seqs])

    def decode(self, batch_ids: list[int]) -> tuple[list[shard_pb2.Generation], int]:
        missing = [b for b in batch_ids if b not in self.batches]
        if not batch_ids or missing:
            raise UnknownBatchError(f"Decode names batches this shard does not hold: {missing or batch_ids}")
        if len(set(batch_ids)) != len(batch_ids):
            raise ValueError(f"Decode names a batch more than once: {batch_ids}")
        merged = self.batches[batch_ids[0]]
        for other in batch_ids[1:]:
            merged.sequences += self.batches.pop(other).sequences
        ids = [s.generated[-1] for s in merged.sequences]
        return self._step(merged, ids, [1] * len(ids)), merged.id

    def filter(self, batch_id: int, request_ids: list[int]) -> int:
        if batch_id not in self.batches:
            raise UnknownBatchError(f"FilterBatch names batch {batch_id}, which this shard does not hold")
        batch = self.batches[batch_id]
        batch.keep(set(request_ids))
        if not batch.sequences:
            del self.batches[batch_id]
        return len(batch)

    def clear(self, batch_id: int | None) -> None:
        if batch_id is None:
            self.batches.clear()
        else:
            self.batches.pop(batch_id, None)

    def warmup(self, max_prefill_tokens: int, max_total_tokens: int) -> int:
        """Runs one prefill of max_prefill_tokens, then measures the KV capacity in tokens."""
        per_seq = max(1, min(max_prefill_tokens, self.config.max_position_embeddings - 1))
        lengths = [per_seq] * (max_prefill_tokens // per_seq) + [max_prefill_tokens % per_seq]
        requests = [shard_pb2.Request(id=i, prompt_token_ids=[2 + (j % 7) for j in range(n)],
                                      stopping=shard_pb2.StoppingCriteria(max_new_tokens=1))
                    for i, n in enumerate(lengths) if n]
        self.kv_capacity = 0
        self.prefill(shard_pb2.Batch(id=2**63, requests=requests))
        self.clear(2**63)
        if self.cfg.kv_cache_tokens:
            capacity = self.cfg.kv_cache_tokens
        else:
            per_token = bytes_per_token(len(self.layers), self.kv_heads, self.spec.head_dim, self.dtype)
            share = self.cfg.kv_memory_fraction / (self.ps.world_size if self.ps.device.type == "cpu" else 1)
            capacity = capacity_tokens(per_token, self.ps.device, share)
        if max_total_tokens:
            capacity = min(capacity, max_total_tokens)
        self.kv_capacity = capacity
        return capacity

    # -- one forward step ------------------------------------------------------------------------
    def _check_prefill(self, batch_id: int, seqs: list[Sequence]) -> None:
        live = {s.request_id for b in self.batches.values() for s in b.sequences}
        if batch_id in self.batches:
            raise ValueError(f"Prefill batch id {batch_id} is already in use")
        if not seqs:
            raise ValueError(f"Prefill batch {batch_id} has no requests")
        ids = [s.request_id for s in seqs]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"Prefill batch {batch_id}: request id {repeated[0]} appears twice")
        limit = self.config.max_position_embeddings
        for s in seqs:
            if s.request_id in live:
                raise ValueError(f"request id {s.request_id} is already running")
            if not s.prompt or s.max_new_tokens < 1 or len(s.generated) >= s.max_new_tokens:
                raise ValueError(f"request {s.request_id}: needs a prompt and max_new_tokens > "
                                 f"generated ({len(s.generated)}), got {s.max_new_tokens}")
            if s.capacity > limit:
                raise ValueError(f"request {s.request_id}: prompt + max_new_tokens = {s.capacity} exceeds "
                                 f"max_position_embeddings = {limit}")
            bad = [t for t in s.prefill_ids() if t >= self.spec.vocab_size]
            if bad:
                raise ValueError(f"request {s.request_id}: token id {bad[0]} is outside the vocabulary "
                                 f"(size {self.spec.vocab_size})")
        needed = self.kv_tokens_in_use + sum(s.capacity for s in seqs)
        if self.kv_capacity and needed > self.kv_capacity:
            raise CapacityError(f"Prefill needs {needed} KV tokens, capacity is {self.kv_capacity}")

    def _step(self, batch: Batch, ids: list[int], q_lens: list[int]) -> list[shard_pb2.Generation]:
        seqs, ps, device = list(batch.sequences), self.ps, self.ps.device
        positions = torch.cat([torch.arange(s.kv.length, s.kv.length + n, device=device)
                               for s, n in zip(seqs, q_lens)])
        cos, sin = self.model.rotary.tables(positions, self.dtype)
        ctx = StepContext([s.kv for s in seqs], q_lens, cos, sin)
        with torch.inference_mode():
            if ps.is_first_stage:
                h = self.model.embed(torch.tensor(ids, dtype=torch.long, device=device))
            else:
                h = ps.recv_prev((len(ids), self.spec.hidden_size), self.dtype)
            h = self.model.run_layers(h, ctx)
            for s, n in zip(seqs, q_lens):
                s.kv.length += n
            if not ps.is_last_stage:
                ps.send_next(h)
            picked = torch.zeros(len(seqs), 2, dtype=torch.float64)
            if ps.is_last_stage:
                logits = self.model.logits(h[ctx.last_token_indices()])
                if ps.rank == ps.sampling_rank:
                    picked = self._sample(seqs, logits)
            ps.broadcast_from_sampler(picked)
        return self._record(batch, seqs, picked)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        need_seen = [s.params.repetition_penalty != 1.0 for s in seqs]
        seen = [s.seen_ids(logits.device) if need else torch.empty(0) for s, need in zip(seqs, need_seen)]
        tokens, logprobs = sample(logits, [s.params for s in seqs], seen, [len(s.generated) for s in seqs])
        return torch.tensor([tokens, logprobs], dtype=torch.float64).T.contiguous()

    def _record(self, batch: Batch, seqs: list[Sequence], picked: torch.Tensor) -> list[shard_pb2.Generation]:
        out, finished = [], set()
        for s, (token, logprob) in zip(seqs, picked.tolist()):
            token = int(token)
            s.generated.append(token)
            reason = s.finish_reason(token, self.eos_ids)
            if reason != shard_pb2.FINISH_REASON_UNSPECIFIED:
                finished.add(s.request_id)
            out.append(shard_pb2.Generation(request_id=s.request_id, token_id=token, logprob=logprob,
                                            finish_reason=reason))
        if finished:
            self.filter(batch.id, [s.request_id for s in seqs if s.request_id not in finished])
        return out


def timed(fn, *args):
    """Runs fn(*args) and returns (result, elapsed nanoseconds)."""
    start = time.perf_counter_ns()
    result = fn(*args)
    return result, time.perf_counter_ns() - start
