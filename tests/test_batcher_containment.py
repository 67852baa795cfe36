"""A router exception concerning one request fails that request alone, with INTERNAL, and the
others finish exactly; the server's loop never stops for it."""

from __future__ import annotations

import grpc
from fake_shards import KvFakeGroup, kv_expected
from test_batcher import batcher_for, ids, make, serve, tokenizer  # noqa: F401

from shardline.router.scheduling.request import Failure


def _expected(r) -> list[int]:
    return kv_expected(r.id, list(r.valid.prompt_token_ids), r.valid.max_new_tokens)


def test_an_exception_while_planning_a_start_fails_that_request_alone(tokenizer):  # noqa: F811
    group = KvFakeGroup()
    batcher = batcher_for(group)
    good, poison, late = make(tokenizer, 1, 6), make(tokenizer, 2, 6, prompt=[9, 9]), make(tokenizer, 3, 4)

    def broken_start():
        raise KeyError("sampling parameters")
    poison.new_sequence = broken_start
    results = serve(batcher, group, [good, poison, late])
    assert isinstance(results[1][-1], Failure) and results[1][-1].code == grpc.StatusCode.INTERNAL
    assert "planning" in results[1][-1].message
    assert ids(results[0]) == _expected(good) and ids(results[2]) == _expected(late)
    assert not group.refusals and all(n.id != 2 for s in group.steps for n in s.start)


def test_an_exception_while_planning_a_decode_fails_that_request_alone(tokenizer):  # noqa: F811
    group = KvFakeGroup(block_size=2)
    batcher = batcher_for(group)
    good, poison = make(tokenizer, 1, 8), make(tokenizer, 2, 8)

    class Broken(type(poison)):
        @property
        def ends_in_flight(self) -> bool:
            if len(self.token_ids) >= 3:
                raise IndexError("a bug in the decode rule")
            return False
    poison.__class__ = Broken
    results = serve(batcher, group, [good, poison])
    assert isinstance(results[1][-1], Failure) and results[1][-1].code == grpc.StatusCode.INTERNAL
    assert ids(results[1]) == _expected(poison)[:len(ids(results[1]))] and len(ids(results[1])) >= 3
    assert ids(results[0]) == _expected(good)
    assert not group.refusals


def test_an_exception_while_handling_a_token_fails_that_request_alone(tokenizer):  # noqa: F811
    group = KvFakeGroup()
    batcher = batcher_for(group)
    good, poison, other = make(tokenizer, 1, 6), make(tokenizer, 2, 6), make(tokenizer, 3, 5)
    push = poison.detokenizer.push
    calls = []

    def broken_push(token_id):
        calls.append(token_id)
        if len(calls) == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return push(token_id)
    poison.detokenizer.push = broken_push
    results = serve(batcher, group, [good, poison, other])
    assert isinstance(results[1][-1], Failure) and results[1][-1].code == grpc.StatusCode.INTERNAL
    assert ids(results[1]) == _expected(poison)[:2]
    assert ids(results[0]) == _expected(good) and ids(results[2]) == _expected(other)
    assert not group.refusals


def test_an_exception_that_concerns_no_single_request_fails_its_step_and_the_loop_goes_on(tokenizer):  # noqa: F811
    group = KvFakeGroup()
    batcher = batcher_for(group)
    plan, raised = batcher.scheduler.plan, []

    def plan_once_broken():
        if len(group.steps) == 3 and not raised:
            raised.append(True)
            raise RuntimeError("a bug in the step plan")
        return plan()
    batcher.scheduler.plan = plan_once_broken
    first = [make(tokenizer, 1, 6), make(tokenizer, 2, 6)]
    results = serve(batcher, group, first)
    assert raised and all(isinstance(e[-1], Failure) and e[-1].code == grpc.StatusCode.INTERNAL for e in results)
    after = make(tokenizer, 3, 4)
    (events,) = serve(batcher, group, [after])
    assert ids(events) == _expected(after) and not group.refusals


def test_an_exception_planning_from_idle_fails_the_queue_head_and_the_loop_goes_on(tokenizer):  # noqa: F811
    """No step in flight (the first plan after idling): nothing was planned to charge, so the
    running requests and the admission tried first fail; a bug that repeats cannot spin."""
    group = KvFakeGroup()
    batcher = batcher_for(group)
    plan, raised = batcher.scheduler.plan, []

    def plan_broken_from_idle():
        if not group.steps and not raised:
            raised.append(True)
            raise RuntimeError("a bug in the step plan")
        return plan()
    batcher.scheduler.plan = plan_broken_from_idle
    head, behind = make(tokenizer, 1, 6), make(tokenizer, 2, 5)
    results = serve(batcher, group, [head, behind])
    assert raised and isinstance(results[0][-1], Failure) and results[0][-1].code == grpc.StatusCode.INTERNAL
    assert ids(results[1]) == _expected(behind) and not group.refusals
