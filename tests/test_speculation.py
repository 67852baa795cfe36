"""The router's n-gram proposer and its place in the scheduler, without shards.

The incremental index must propose exactly what a full rescan would (the tokens after the latest
earlier occurrence of the longest matching suffix), however the sequence grew between calls; the
scheduler must give proposals KV slots without preempting anyone, keep within max_new_tokens, and
count only accepted proposals as fed.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shardline.router.scheduling.speculation import NgramIndex, Speculator


def rescan(seq: list[int], lo: int, hi: int, k: int) -> list[int]:
    """The proposal by brute force."""
    for n in range(min(hi, len(seq) - 1), lo - 1, -1):
        tail = seq[len(seq) - n:]
        for end in range(len(seq) - 1, n - 1, -1):  # latest occurrence that ends before the last token
            if seq[end - n:end] == tail:
                return seq[end:end + k]
    return []


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(0, 4), min_size=1, max_size=60),
       growth=st.lists(st.integers(1, 7), min_size=1, max_size=20),
       lo=st.integers(1, 3), extra=st.integers(0, 3), k=st.integers(1, 6))
def test_the_incremental_index_proposes_what_a_rescan_does(tokens, growth, lo, extra, k):
    index = NgramIndex(lo, lo + extra)
    length = 0
    for step in growth:
        length = min(len(tokens), length + step)
        assert index.propose(lambda a, b: tokens[a:b], length, k) == rescan(tokens[:length], lo, lo + extra, k)


class Valid:
    speculative, repetition_penalty, grammar = True, 1.0, ""


class Req:
    def __init__(self, tokens: list[int]):
        self.valid, self.tokens, self.speculation = Valid(), tokens, None

    @property
    def length(self) -> int:
        return len(self.tokens)

    def span(self, a: int, b: int) -> list[int]:
        return self.tokens[a:b]


def decode(spec: Speculator, req: Req) -> list[int]:
    """One decode step as the scheduler plans it: propose when ready, else count the step."""
    if spec.ready(req):
        return spec.propose(req, 4)
    spec.decoded(req)
    return []


def test_poor_proposals_back_off_and_good_ones_resume():
    spec = Speculator(4, 1, 3, 8)
    req = Req([1, 2, 3, 1, 2])
    assert decode(spec, req) == [3, 1, 2]
    spec.verified(req, 3, 0)
    assert [decode(spec, req) for _ in range(2)] == [[], [3, 1, 2]]  # skips one step
    spec.verified(req, 3, 0)
    assert [decode(spec, req) for _ in range(3)] == [[], [], [3, 1, 2]]  # then two
    spec.verified(req, 3, 3)
    spec.verified(req, 3, 0)
    assert [decode(spec, req) for _ in range(2)] == [[], [3, 1, 2]]  # a good step reset it to one


def test_finding_no_match_backs_off_too():
    spec = Speculator(4, 2, 3, 8)
    req = Req([1, 2, 3, 4])
    assert [decode(spec, req) for _ in range(4)] == [[], [], [], []]
    assert req.speculation.backoff == 4 and req.speculation.skip == 1  # tried at steps 1 and 3 only
    for _ in range(100):
        decode(spec, req)
    assert req.speculation.backoff == 16, "bounded: a request that starts repeating is noticed soon"


def test_opted_out_penalised_or_constrained_requests_never_propose():
    spec = Speculator(4, 1, 3, 8)
    req = Req([1, 2, 1, 2])
    assert spec.propose(req, 4) == [1, 2]  # the same request, free, does propose
    for fields in ({"speculative": False}, {"repetition_penalty": 1.1}, {"grammar": "{...}"}):
        req = Req([1, 2, 1, 2])
        req.valid = type("V", (Valid,), fields)()
        assert spec.propose(req, 4) == []
