"""Unit tests for the waiting queue (router/queue.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from shardline.router.queue import Entry, RequestQueue

BIG = 10**9


@dataclass(eq=False)
class Waiting(Entry):
    """A test entry with a name and a switch that kills it."""

    name: str = ""
    dead: bool = field(default=False)

    def is_dead(self) -> bool:
        return self.dead


def _entry(name: str, priority: int = 0, prompt_len: int = 10, max_new_tokens: int = 10) -> Waiting:
    return Waiting(priority=priority, prompt_len=prompt_len, max_new_tokens=max_new_tokens, name=name)


def _names(entries: list[Waiting]) -> list[str]:
    return [e.name for e in entries]


def _take(queue: RequestQueue[Waiting], max_size: int = 100, prefill: int = BIG, total: int = BIG, **kw):
    return queue.next_batch(max_size=max_size, prefill_token_budget=prefill, total_token_budget=total, **kw)


def _queue(*entries: Waiting) -> RequestQueue[Waiting]:
    ticks = iter(range(100, 10_000))
    queue: RequestQueue[Waiting] = RequestQueue(clock=lambda: float(next(ticks)))
    for e in entries:
        queue.put(e)
    return queue


def test_higher_priority_first_then_fifo() -> None:
    queue = _queue(_entry("a"), _entry("b", 5), _entry("c"), _entry("d", 5), _entry("e", -1), _entry("f", 7))
    assert _names(_take(queue).batch) == ["f", "b", "d", "a", "c", "e"]
    assert len(queue) == 0 and queue.peek() is None


def test_put_stamps_arrival_and_enqueue_time() -> None:
    a, b = _entry("a"), _entry("b", 3)
    queue = _queue(a, b)
    assert (a.arrival, a.enqueued_at, b.arrival, b.enqueued_at) == (0, 100.0, 1, 101.0)
    assert queue.peek() is b and len(queue) == 2 and a in queue


def test_put_twice_is_an_error() -> None:
    a = _entry("a")
    queue = _queue(a)
    with pytest.raises(ValueError, match="already queued"):
        queue.put(a)


def test_entry_put_back_keeps_its_place_and_wait() -> None:
    a, b = _entry("a"), _entry("b")
    queue = _queue(a, b)
    assert _names(_take(queue, max_size=1).batch) == ["a"]
    queue.put(_entry("c"))
    queue.put(a)
    assert a.enqueued_at == 100.0
    assert _names(_take(queue).batch) == ["a", "b", "c"]


def test_max_size() -> None:
    queue = _queue(*(_entry(str(i)) for i in range(5)))
    assert _names(_take(queue, max_size=2).batch) == ["0", "1"]
    assert len(queue) == 3


def test_prefill_budget_is_inclusive_and_never_skips_ahead() -> None:
    queue = _queue(*(_entry(name, prompt_len=n) for name, n in [("a", 40), ("b", 60), ("c", 50), ("d", 1)]))
    assert _names(_take(queue, prefill=100).batch) == ["a", "b"]
    assert _names(_take(queue, prefill=50).batch) == ["c"]
    assert _names(_take(queue, prefill=50).batch) == ["d"]


def test_total_budget_counts_prompt_and_new_tokens() -> None:
    queue = _queue(_entry("a", max_new_tokens=90), _entry("b", prompt_len=5, max_new_tokens=5), _entry("c"))
    assert _take(queue, total=99).batch == []
    assert _names(_take(queue, total=110).batch) == ["a", "b"]
    assert _names(queue.next_batch(max_size=1, prefill_token_budget=10, total_token_budget=20).batch) == ["c"]


def test_min_size_takes_nothing_when_too_few_fit() -> None:
    queue = _queue(_entry("a"), _entry("b", prompt_len=500), _entry("c"))
    pulled = _take(queue, prefill=100, min_size=2)
    assert pulled.batch == [] and len(queue) == 3
    assert _names(_take(queue, min_size=2).batch) == ["a", "b", "c"]


def test_dead_entries_are_dropped_and_reported() -> None:
    a, b, c, d = _entry("a"), _entry("b", prompt_len=90), _entry("c"), _entry("d", prompt_len=95)
    a.dead = b.dead = True
    queue = _queue(a, b, c, d)
    pulled = _take(queue, max_size=2, prefill=100)
    assert _names(pulled.batch) == ["c"]
    assert _names(pulled.dead) == ["a", "b"]
    assert len(queue) == 1 and queue.peek() is d


def test_drop_dead_sweeps_the_whole_queue() -> None:
    entries = [_entry(str(i), priority=i % 3) for i in range(6)]
    for e in entries[1::2]:
        e.dead = True
    queue = _queue(*entries)
    assert sorted(_names(queue.drop_dead())) == ["1", "3", "5"]
    assert _names(_take(queue).batch) == ["2", "4", "0"]


def test_remove() -> None:
    a, b, c = _entry("a"), _entry("b", 1), _entry("c")
    queue = _queue(a, b, c)
    assert queue.remove(b) is True
    assert queue.remove(b) is False
    assert b not in queue and len(queue) == 2 and queue.peek() is a
    queue.put(b)
    assert _names(_take(queue).batch) == ["b", "a", "c"]


def test_removed_entries_do_not_pile_up() -> None:
    queue = _queue()
    keep = _entry("keep", priority=-1)
    queue.put(keep)
    for i in range(1000):
        e = _entry(str(i))
        queue.put(e)
        queue.remove(e)
    assert len(queue) == 1 and len(queue._heap) < 40
    assert _take(queue).batch == [keep]
