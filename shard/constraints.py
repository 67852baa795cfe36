"""Structured output on the sampling rank: llguidance matchers and the token masks they give.

A sequence started with a grammar (`NewSequence.grammar`, compiled and checked by the router) gets
a matcher here, on the sampling rank only. Before each of its samples the matcher catches up with
the tokens the sequence generated so far (its own samples, or the generated tokens a resumed
sequence is fed again: either way `Sequence.tokens` past the prompt), then gives the bitmask of
the tokens allowed next; the sampler sets every other logit to -inf for that row. End of sequence
is allowed exactly where the grammar accepts. A matcher that fails (a limit of the grammar hit
mid-way) leaves only end of sequence, so the request ends instead of producing garbage.

The mask is computed here rather than in the router because the router plans step N+1 before step
N's token is back (steps overlap); the sampling rank has that token already. Rows without a
grammar are untouched and cost nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

log = structlog.get_logger("shardline.shard")

CACHED_GRAMMARS = 128  # compiled matchers kept for reuse (a new sequence copies one)


@dataclass
class Constrained:
    """One sequence's matcher and how many of its generated tokens it has consumed."""

    matcher: object
    consumed: int = 0
    failed: bool = False


def load_tokenizer(model_dir: Path, vocab_size: int, eos_ids: frozenset[int]):
    """The llguidance tokenizer of the checkpoint (None, with the reason logged, when it cannot be built)."""
    try:
        import llguidance.hf
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        return llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size, eos_token=sorted(eos_ids) or None)
    except Exception as exc:  # noqa: BLE001 - any reason means "no structured output here"
        log.warning("structured output unavailable on this shard", reason=f"{type(exc).__name__}: {exc}")
        return None


class Grammars:
    """The matchers of this rank's constrained sequences (sampling rank only)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int]):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.eos = sorted(eos_ids)
        self.words = (vocab_size + 31) // 32
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._bits = torch.arange(32, dtype=torch.int32)

    def start(self, grammar: str) -> Constrained:
        """A fresh matcher for a sequence starting with `grammar` (compiled once, then copied)."""
        if self.tokenizer is None:
            return Constrained(None, failed=True)
        from llguidance import LLMatcher

        template = self._compiled.get(grammar)
        if template is None:
            template = LLMatcher(self.tokenizer, grammar, log_level=0)
            self._compiled[grammar] = template
            if len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(grammar)
        return Constrained(template.deep_copy())

    def masks(self, states: list[Constrained], pending: list[list[int]]) -> torch.Tensor:
        """[rows, vocab] bool: the tokens each state allows next, after consuming `pending[k]`
        (the tokens its sequence generated since the state last consumed)."""
        bitmask = torch.zeros(len(states), self.words, dtype=torch.int32)
        for k, (state, tokens) in enumerate(zip(states, pending)):
            m = state.matcher
            if not state.failed:
                if tokens:
                    m.consume_tokens(tokens)
                    state.consumed += len(tokens)
                if not m.is_error():
                    m.unsafe_compute_mask_ptr(bitmask[k].data_ptr(), self.words * 4)
            if state.failed or m.is_error() or not bool(bitmask[k].any()):
                self._fail(state)
                bitmask[k].zero_()
                for eos in self.eos:
                    bitmask[k, eos // 32] |= _bit(eos % 32)
        allowed = (bitmask.unsqueeze(-1) >> self._bits) & 1
        return allowed.view(len(states), -1)[:, :self.vocab_size].bool()

    @staticmethod
    def _fail(state: Constrained) -> None:
        if not state.failed:
            state.failed = True
            reason = "no tokenizer for structured output on this shard" if state.matcher is None else (
                state.matcher.get_error() or "no token is allowed")
            log.warning("grammar failed mid-output; only end of sequence is allowed now", error=reason)


def _bit(i: int) -> int:
    """Bit i of an int32 word, as the signed value torch stores."""
    return (1 << i) - (1 << 32 if i == 31 else 0)
