"""The sequences a shard holds between steps, exactly as the router described them.

A `Sequence` keeps its sampling parameters, the tokens run or sampled so far, its block table and
how many tokens have KV written. `Sequences` applies a step's frees, starts, block deltas and
tokens, after checking the whole step first (identically on every rank, before any collective),
so a bad step is refused with nothing changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardline.proto import shard_pb2
from shardline.shard.constraints import Constrained
from shardline.shard.sampling import SamplingParams


MAX_TOP_LOGPROBS = 20


class StepRefused(ValueError):
    """The step names something impossible; nothing was changed."""


@dataclass
class Sequence:
    id: int
    params: SamplingParams
    prompt_len: int
    tokens: list[int] = field(default_factory=list)  # run or sampled, in order
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose K/V are in the pool
    grammar: str = ""  # structured output: the llguidance grammar its samples follow ("" = none)
    constrained: Constrained | None = None  # its matcher (sampling rank, from its first sample)

    @classmethod
    def from_pb(cls, s: shard_pb2.NewSequence) -> "Sequence":
        p = s.sampling
        params = SamplingParams(p.temperature, p.top_k, p.top_p if p.top_p > 0 else 1.0,
                                p.repetition_penalty if p.repetition_penalty > 0 else 1.0, p.seed,
                                min(p.top_logprobs, MAX_TOP_LOGPROBS))
        cached = list(s.cached_token_ids)
        return cls(s.id, params, s.prompt_len, tokens=cached, computed=len(cached), grammar=s.grammar)

    @property
    def generated(self) -> int:
        """Tokens sampled so far (also the sampler's step index for the next one)."""
        return max(0, len(self.tokens) - self.prompt_len)


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_positions: int
    num_blocks: int
    block_size: int


class Sequences:
    def __init__(self) -> None:
        self.live: dict[int, Sequence] = {}

    def clear(self) -> None:
        self.live.clear()

    def apply(self, step: shard_pb2.StepRequest, limits: Limits) -> list[tuple[Sequence, list[int], bool]]:
        """Checks the step, then applies it; returns (sequence, tokens to run, sample) per work."""
        self._check(step, limits)
        for seq_id in step.free:
            del self.live[seq_id]
        for new in step.start:
            self.live[new.id] = Sequence.from_pb(new)
        out = []
        for w in step.work:
            seq = self.live[w.id]
            seq.blocks.extend(w.new_blocks)
            run = list(w.token_ids) or [seq.tokens[-1], *w.draft_token_ids]
            if w.token_ids:
                seq.tokens.extend(w.token_ids)
            out.append((seq, run, w.sample))
        return out

    def _check(self, step: shard_pb2.StepRequest, limits: Limits) -> None:
        freed = set(step.free)
        missing = freed - self.live.keys()
        if missing or len(freed) != len(step.free):
            raise StepRefused(f"Step frees sequences this shard does not hold (or twice): {sorted(missing)}")
        alive = self.live.keys() - freed
        started = {s.id for s in step.start}
        if started & alive or len(started) != len(step.start):
            raise StepRefused(f"Step starts sequences that already exist: {sorted(started & alive)}")
        worked = [w.id for w in step.work]
        if len(set(worked)) != len(worked):
            raise StepRefused("Step lists one sequence twice in its work")
        new = {s.id: Sequence.from_pb(s) for s in step.start}
        for s in step.start:  # cached tokens are never embedded, but the penalty indexes by them
            bad = [t for t in s.cached_token_ids if t >= limits.vocab_size]
            if bad:
                raise StepRefused(f"sequence {s.id}: cached token id {bad[0]} is outside the vocabulary "
                                  f"(size {limits.vocab_size})")
        for w in step.work:
            self._check_work(w, new.get(w.id) or (self.live.get(w.id) if w.id in alive else None), limits)
        if started - set(worked):
            raise StepRefused(f"Step starts sequences without work: {sorted(started - set(worked))}")

    def _check_work(self, w: shard_pb2.Work, seq: Sequence | None, limits: Limits) -> None:
        if seq is None:
            raise StepRefused(f"Step works on sequence {w.id}, which this shard does not hold")
        pending = len(seq.tokens) - seq.computed  # 1 after a sample, until it is run
        if not w.token_ids and pending != 1:
            raise StepRefused(f"sequence {w.id}: decode without a sampled token to run")
        if w.token_ids and pending != 0:
            raise StepRefused(f"sequence {w.id}: new tokens while its sampled token was not run")
        if w.draft_token_ids and (w.token_ids or not w.sample):
            raise StepRefused(f"sequence {w.id}: proposed tokens only come with a sampled decode")
        if w.draft_token_ids and seq.params.repetition_penalty != 1.0:
            raise StepRefused(f"sequence {w.id}: proposed tokens with a repetition penalty (the penalty "
                              f"of each position would need the proposals before it)")
        if w.draft_token_ids and seq.grammar:
            raise StepRefused(f"sequence {w.id}: proposed tokens with a grammar (the mask of each position "
                              f"would need the proposals before it)")
        bad = [t for t in [*w.token_ids, *w.draft_token_ids] if t >= limits.vocab_size]
        if bad:
            raise StepRefused(f"sequence {w.id}: token id {bad[0]} is outside the vocabulary "
                              f"(size {limits.vocab_size})")
        blocks = [b for b in w.new_blocks if b >= limits.num_blocks]
        if blocks:
            raise StepRefused(f"sequence {w.id}: block {blocks[0]} is outside the pool ({limits.num_blocks} blocks)")
        held = len(seq.blocks) + len(w.new_blocks)
        end = seq.computed + (len(w.token_ids) or 1 + len(w.draft_token_ids))
        if end > limits.max_positions:
            raise StepRefused(f"sequence {w.id}: {end} tokens exceed max_position_embeddings = {limits.max_positions}")
        if end > held * limits.block_size:
            raise StepRefused(f"sequence {w.id}: {end} tokens need {-(-end // limits.block_size)} KV blocks, "
                              f"it holds {held}")
