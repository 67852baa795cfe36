"""The shard engine: loads this rank's slice, holds the KV block pool, runs one Step per call.

Every rank of the group runs the same call in lock-step. A step embeds (first stage) or receives
hidden states (later stages), runs this stage's layers over every token of the step at once, then
sends them on or, on the last stage, computes logits of the rows to sample. The sampling rank (TP
rank 0 of the last stage) picks the tokens and broadcasts them, so every rank keeps identical
sequence state and returns identical generations. The step is checked before the first
collective, identically on every rank, so a bad call is refused on all ranks with nothing changed.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from shardline.proto import shard_pb2
from shardline.shard import compiled
from shardline.shard import step as step_plan
from shardline.shard.attention import StepContext, make_backend, resolve
from shardline.shard.batch_state import BatchState
from shardline.shard.config import ShardConfig
from shardline.shard.constraints import Grammars, load_tokenizer
from shardline.shard.kv_cache import KVPool, bytes_per_token, free_memory_bytes, pool_blocks
from shardline.shard.layers import column_major_weights, local_kv_heads
from shardline.shard.models.registry import load_config, model_class
from shardline.shard.parallel import ParallelState
from shardline.shard.pipeline import stage_layers
from shardline.shard.sampling import SamplingBatch, sample
from shardline.shard.sequences import Limits, Sequence, Sequences, StepRefused
from shardline.shard.warmup import warmup_steps
from shardline.shard.weights import load_weights, parameter_bytes

__all__ = ["Engine", "StepRefused", "eos_token_ids", "timed"]


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
        self.windows = {self.spec.layer_windows[i] for i in self.layers}
        self.block_size = cfg.kv_block_size
        compiled.use_cache_dir()  # before anything compiles (flex kernels, the layer stack)
        self.backend_name = resolve(cfg.attention_backend, ps.device)
        self.compiled = compiled.enabled(cfg.compile, ps.device)
        self.run_layers = (compiled.compiled_layers(self.model, cfg.model_dir) if self.compiled
                           else self.model.run_layers)
        self.sequences = Sequences()
        # structured output: only the sampling rank masks logits, so only it loads the tokenizer
        samples = ps.is_last_stage and ps.rank == ps.sampling_rank
        self.grammars = Grammars(load_tokenizer(cfg.model_dir, self.spec.vocab_size, self.eos_ids) if samples
                                 else None, self.spec.vocab_size, self.eos_ids)
        self._set_pool(0)  # no blocks until Warmup sizes it

    def _set_pool(self, num_blocks: int) -> None:
        """A pool of `num_blocks`, with the batch state and attention backend that read it."""
        self.pool = self.state = self.backend = None  # free the old pool before the new one is made
        self.pool = KVPool(len(self.layers), num_blocks, self.block_size, self.kv_heads, self.spec.head_dim,
                           self.dtype, self.ps.device)
        self.backend = make_backend(self.backend_name, self.pool, self.windows)
        per_sequence = -(-self.config.max_position_embeddings // self.block_size)
        self.state = BatchState(self.backend.table_width(per_sequence, num_blocks), num_blocks,
                                self.spec.vocab_size, self.ps.device, block_size=self.block_size)

    @property
    def limits(self) -> Limits:
        return Limits(self.spec.vocab_size, self.config.max_position_embeddings, self.pool.num_blocks,
                      self.block_size)

    # -- calls -----------------------------------------------------------------------------------
    def step(self, request: shard_pb2.StepRequest) -> list[shard_pb2.Generation]:
        work = self.sequences.apply(request, self.limits)
        self.state.apply(request, work)
        if self.backend.reads_whole_blocks:
            self.pool.zero_blocks(self.state.fresh_blocks)
        if not work:
            return []
        return self._forward(work, [not w.token_ids for w in request.work],
                             [len(w.draft_token_ids) for w in request.work])

    def reset(self) -> None:
        self.sequences.clear()
        self.state.clear()

    def warmup(self, max_step_tokens: int, max_batch_size: int, max_kv_tokens: int,
               max_context_tokens: int = 0) -> int:
        """Runs the worst-case steps on a scratch pool, then sizes the real pool; returns its blocks."""
        self.reset()
        steps, scratch_blocks = warmup_steps(max_step_tokens, max_batch_size, self.block_size,
                                             self.config.max_position_embeddings, max_context_tokens, max_kv_tokens)
        self._set_pool(scratch_blocks)
        for request in steps:
            self.step(request)
        self.reset()
        self._set_pool(0)
        if self.ps.device.type == "cuda":
            torch.cuda.empty_cache()
        self._set_pool(self._measure_blocks(max_kv_tokens))
        return self.pool.num_blocks

    def _measure_blocks(self, max_kv_tokens: int) -> int:
        if self.cfg.kv_cache_tokens:
            cap = self.cfg.kv_cache_tokens if not max_kv_tokens else min(self.cfg.kv_cache_tokens, max_kv_tokens)
            return max(1, cap // self.block_size)
        per_token = bytes_per_token(len(self.layers), self.kv_heads, self.spec.head_dim, self.dtype)
        share = self.cfg.kv_memory_fraction / (self.ps.world_size if self.ps.device.type == "cpu" else 1)
        return max(1, pool_blocks(per_token, self.block_size, free_memory_bytes(self.ps.device), share,
                                  max_kv_tokens))

    # -- one forward step ------------------------------------------------------------------------
    def _forward(self, work: list[tuple[Sequence, list[int], bool]], decode: list[bool],
                 drafts: list[int]) -> list[shard_pb2.Generation]:
        ps, state = self.ps, self.state
        plan = step_plan.plan(work, decode, state, self.block_size, drafts)
        state.mark_run(plan.token_rows, plan.ids)
        self.backend.plan(plan, state)
        cos, sin = self.model.rotary.tables(plan.positions, self.dtype)
        ctx = StepContext(self.pool, plan, self.backend, cos, sin)
        # (sequence, positions sampled) per sampled work; position j samples with step index generated + j
        sampled = [(seq, 1 + d) for (seq, _, do), d in zip(work, drafts) if do]
        positions = [(seq, j) for seq, n in sampled for j in range(n)]
        with torch.inference_mode():
            if ps.is_first_stage:
                h = self.model.embed(plan.ids)
            else:
                h = ps.recv_prev((plan.tokens, self.spec.hidden_size), self.dtype)
            h = self.run_layers(h, ctx)
            if not ps.is_last_stage:
                ps.send_next(h)
            top_n = max((s.params.top_logprobs for s, _ in sampled), default=0)
            picked = torch.zeros(2 + 2 * top_n, len(positions), dtype=torch.float64, device=ps.device)
            if ps.is_last_stage and sampled:
                logits = self.model.logits(h.index_select(0, plan.sample_index))
                if ps.rank == ps.sampling_rank:
                    picked = self._sample(positions, plan.sample_rows, logits, top_n)
            if sampled:
                ps.broadcast_from_sampler(picked)
        speculative = any(drafts)
        if not speculative:
            state.advance(torch.cat([p.rows for p in (plan.single, plan.multi) if p is not None]),
                          torch.cat([p.lens for p in (plan.single, plan.multi) if p is not None]))
        picked = picked.cpu()
        values = picked.tolist()  # once: indexing the tensor per row costs torch ops per sequence
        emitted = self._accepted(work, drafts, values[0])
        ran = [len(run) if not d else len(emitted[i]) for i, ((_, run, _), d) in enumerate(zip(work, drafts))]
        if speculative:
            rows = torch.cat([p.rows for p in (plan.single, plan.multi) if p is not None])
            state.advance(rows, torch.tensor([ran[i] for i in plan.order], dtype=torch.long, device=ps.device))
        for (seq, _, _), n in zip(work, ran):
            seq.computed += n
        if sampled:
            last = [cols[-1] for cols in emitted if cols]
            tokens = picked[0].to(torch.long)
            if speculative:
                index = torch.tensor(last, dtype=torch.long)
                state.record_sampled(plan.sample_rows.index_select(0, index.to(ps.device)),
                                     tokens.index_select(0, index).to(ps.device))
            else:
                state.record_sampled(plan.sample_rows, tokens.to(ps.device))
        return self._record([(seq, cols) for (seq, _, do), cols in zip(work, emitted) if do], values, top_n)

    @staticmethod
    def _accepted(work: list[tuple[Sequence, list[int], bool]], drafts: list[int], tokens: list[float]) -> list[list[int]]:
        """Per work, the columns of the sampled tokens it emits: its one token, or for a speculative
        row the samples up to and including the first that differs from the proposal it follows."""
        out, col = [], 0
        for (_, run, do), d in zip(work, drafts):
            if not do:
                out.append([])
                continue
            accepted = 0
            while accepted < d and int(tokens[col + accepted]) == run[1 + accepted]:
                accepted += 1
            out.append(list(range(col, col + accepted + 1)))
            col += 1 + d
        return out

    def _sample(self, positions: list[tuple[Sequence, int]], rows: torch.Tensor, logits: torch.Tensor,
                top_n: int) -> torch.Tensor:
        """[2 + 2 * top_n, rows] float64: tokens, their logprobs, then the top ids and their logprobs."""
        seqs = [s for s, _ in positions]
        penalized = self.state.seen is not None and any(s.params.repetition_penalty != 1.0 for s in seqs)
        seen = self.state.seen.index_select(0, rows) if penalized else None
        batch = SamplingBatch.build([s.params for s in seqs], [s.generated + j for s, j in positions], seen,
                                    logits.device)
        parts = sample(logits, batch, top_n, self._allowed(seqs, logits))
        columns = [parts[0].double().unsqueeze(0), parts[1].double().unsqueeze(0)]
        if top_n:
            columns += [parts[2].double().T, parts[3].double().T]
        return torch.cat(columns)

    def _allowed(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor | None:
        """[rows, vocab] bool of the tokens each row may sample (None when no row has a grammar)."""
        rows = [k for k, s in enumerate(seqs) if s.grammar]
        if not rows:
            return None
        states = []
        for k in rows:
            seq = seqs[k]
            if seq.constrained is None:
                seq.constrained = self.grammars.start(seq.grammar)
            states.append(seq.constrained)
        pending = [seqs[k].tokens[seqs[k].prompt_len + st.consumed:] for k, st in zip(rows, states)]
        allowed = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        allowed[index] = self.grammars.masks(states, pending).to(logits.device)
        return allowed

    def _record(self, emitted: list[tuple[Sequence, list[int]]], values: list[list[float]],
                top_n: int) -> list[shard_pb2.Generation]:
        out = []
        for seq, cols in emitted:
            for col in cols:
                token = int(values[0][col])
                seq.tokens.append(token)
                gen = shard_pb2.Generation(request_id=seq.id, token_id=token, logprob=values[1][col])
                for k in range(min(seq.params.top_logprobs, top_n)):
                    gen.top_logprobs.add(token_id=int(values[2 + k][col]), logprob=values[2 + top_n + k][col])
                out.append(gen)
        return out


def timed(fn, *args):
    """Runs fn(*args) and returns (result, elapsed nanoseconds)."""
    start = time.perf_counter_ns()
    result = fn(*args)
    return result, time.perf_counter_ns() - start
