"""Requests alive in a shard and the batches that group them.

A `Sequence` owns its tokens, sampling parameters and KV slab; a `Batch` is just an ordered list of
sequences, so joining and filtering batches move references, never KV.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shardline.proto import shard_pb2
from shardline.shard.kv_cache import SequenceKV
from shardline.shard.sampling import SamplingParams


@dataclass
class Sequence:
    request_id: int
    prompt: list[int]
    generated: list[int]
    params: SamplingParams
    max_new_tokens: int
    ignore_eos: bool
    kv: SequenceKV | None = None

    @classmethod
    def from_pb(cls, r: shard_pb2.Request) -> "Sequence":
        s = r.sampling
        params = SamplingParams(s.temperature, s.top_k, s.top_p if s.top_p > 0 else 1.0,
                                s.repetition_penalty if s.repetition_penalty > 0 else 1.0, s.seed)
        return cls(r.id, list(r.prompt_token_ids), list(r.generated_token_ids), params,
                   r.stopping.max_new_tokens, r.stopping.ignore_eos)

    @property
    def capacity(self) -> int:
        """Tokens of KV this sequence can ever need."""
        return len(self.prompt) + self.max_new_tokens

    def prefill_ids(self) -> list[int]:
        """Tokens run at prefill: the prompt, then anything generated before a restart."""
        return self.prompt + self.generated

    def seen_ids(self, device: torch.device) -> torch.Tensor:
        """Distinct ids of prompt and output, for the repetition penalty."""
        return torch.tensor(sorted(set(self.prompt) | set(self.generated)), dtype=torch.long, device=device)

    def finish_reason(self, token: int, eos_ids: frozenset[int]) -> int:
        if token in eos_ids and not self.ignore_eos:
            return shard_pb2.FINISH_REASON_EOS
        if len(self.generated) >= self.max_new_tokens:
            return shard_pb2.FINISH_REASON_LENGTH
        return shard_pb2.FINISH_REASON_UNSPECIFIED


@dataclass
class Batch:
    id: int
    sequences: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sequences)

    def keep(self, request_ids: set[int]) -> None:
        """Keeps only the given requests; the others' KV is released with their last reference."""
        self.sequences = [s for s in self.sequences if s.request_id in request_ids]
