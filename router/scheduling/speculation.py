"""Speculative decoding, the router's half: n-gram proposals from a request's own tokens.

With `--speculative ngram`, a decoding request's next step may carry up to
`--num-speculative-tokens` proposed tokens: the tokens that followed the latest earlier occurrence
of the sequence's last n tokens (prompt and output together; the longest n in
[--ngram-min, --ngram-max] that occurred before wins). The shards run them after the request's
held token in one row and keep the proposals their own samples confirm (shard/engine.py), so the
output is exactly what it is without speculation. The scheduler gives the proposals KV slots from
the allocator; the rejected ones' slots stay with the request and are written by its next tokens,
and the prefix cache only ever sees computed tokens (`fed` is cut back to the accepted length).

Proposals need the request's latest token, so while speculation is on (at most
`--speculative-max-batch` decoding requests), the batcher streams a step's tokens before planning
the next instead of overlapping the two, and only in steps where some request is ready to
propose. A request opts out per call (`speculative: false`); one with a repetition penalty never
speculates (the penalty of each position would depend on the proposals before it). A request whose
proposals fail, or that finds no match, backs off: it skips proposing (and its steps overlap
again) for a number of decode steps that doubles with each poor step (up to 16) and resets to one
when a step does well, so text that does not repeat itself costs almost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

POOR = 0.5  # a verified step that accepts less than this share of its proposals counts against them
MAX_BACKOFF = 16


class NgramIndex:
    """The latest position following each n-gram of a growing sequence (n in [lo, hi]), kept up to
    date incrementally: O(hi - lo + 1) dictionary updates per new token, never a rescan."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi
        self.after: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(lo, hi + 1)}
        self.indexed = 0  # n-grams ending before this position are in `after`

    def propose(self, span, length: int, k: int) -> list[int]:
        """Up to k tokens to follow sequence[:length] (read through `span(start, stop)`)."""
        if k <= 0 or length < self.lo + 1:
            return []
        self._index(span, length - 1)  # every n-gram that ends before the last token
        tail = span(max(0, length - self.hi), length)
        for n in range(min(self.hi, length - 1), self.lo - 1, -1):
            at = self.after[n].get(tuple(tail[len(tail) - n:]))
            if at is not None:
                return span(at, min(at + k, length))
        return []

    def _index(self, span, end: int) -> None:
        if end <= self.indexed:
            return
        first = max(0, self.indexed + 1 - self.hi)
        tokens = span(first, end)
        for e in range(self.indexed + 1, end + 1):  # n-grams ending at e (exclusive)
            for n, table in self.after.items():
                if e - n >= first:
                    table[tuple(tokens[e - n - first:e - first])] = e
        self.indexed = end


@dataclass
class RequestSpeculation:
    """One request's proposer and how well its proposals did."""

    index: NgramIndex
    skip: int = 0  # decode steps left without proposing
    backoff: int = 1


class Speculator:
    def __init__(self, tokens: int, ngram_min: int, ngram_max: int, max_batch: int):
        self.tokens, self.ngram_min, self.ngram_max, self.max_batch = tokens, ngram_min, ngram_max, max_batch

    def active(self, decoding: int) -> bool:
        """Whether steps speculate with this many decoding requests."""
        return decoding <= self.max_batch

    @staticmethod
    def eligible(req) -> bool:
        return req.valid.speculative and req.valid.repetition_penalty == 1.0 and not req.valid.grammar

    def ready(self, req) -> bool:
        """Whether the request would propose in its next decode (eligible, not backing off)."""
        return self.eligible(req) and (req.speculation is None or not req.speculation.skip)

    def decoded(self, req) -> None:
        """A decode step of the request without proposals: one step less to back off."""
        if req.speculation is not None and req.speculation.skip:
            req.speculation.skip -= 1

    def propose(self, req, most: int) -> list[int]:
        """At most `most` (and --num-speculative-tokens) tokens to verify after the request's
        latest token, which the router must already know (it was streamed). Finding none counts
        as a poor step."""
        if most <= 0 or not self.ready(req):
            return []
        state = self.state_of(req)
        drafts = state.index.propose(req.span, req.length, min(most, self.tokens))
        if not drafts:
            self._back_off(state)
        return drafts

    def state_of(self, req) -> RequestSpeculation:
        if req.speculation is None:
            req.speculation = RequestSpeculation(NgramIndex(self.ngram_min, self.ngram_max))
        return req.speculation

    def verified(self, req, proposed: int, accepted: int) -> None:
        """The shards kept `accepted` of the request's `proposed` tokens: adapt its backoff."""
        state = self.state_of(req)
        if accepted < POOR * proposed:
            self._back_off(state)
        else:
            state.backoff = 1

    @staticmethod
    def _back_off(state: RequestSpeculation) -> None:
        state.skip = state.backoff
        state.backoff = min(MAX_BACKOFF, 2 * state.backoff)
