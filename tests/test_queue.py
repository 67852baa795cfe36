"""Unit tests for the waiting queue (router/scheduling/queue.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from shardline.router.scheduling.queue import Entry, RequestQueue

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


def _take(queue: RequestQueue[Waiting], max_size: int = 100) -> list[Waiting]:
    """Pops up to max_size entries, best first."""
    out = []
    while len(out) < max_size and (entry := queue.pop()) is not None:
        out.append(entry)
    return out


def _queue(*entries: Waiting) -> RequestQueue[Waiting]:
    ticks = iter(range(100, 10_000))
    queue: RequestQueue[Waiting] = RequestQueue(clock=lambda: float(next(ticks)))
    for e in entries:
        queue.put(e)
    return queue


def test_higher_priority_first_then_fifo() -> None:
    queue = _queue(_entry("a"), _entry("b", 5), _entry("c"), _entry("d", 5), _entry("e", -1), _entry("f", 7))
    assert _names(_take(queue)) == ["f", "b", "d", "a", "c", "e"]
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
    assert _names(_take(queue, max_size=1)) == ["a"]
    queue.put(_entry("c"))
    queue.put(a)
    assert a.enqueued_at == 100.0
    assert _names(_take(queue)) == ["a", "b", "c"]


def test_max_size() -> None:
    queue = _queue(*(_entry(str(i)) for i in range(5)))
    assert _names(_take(queue, max_size=2)) == ["0", "1"]
    assert len(queue) == 3


def test_drop_dead_sweeps_the_whole_queue() -> None:
    entries = [_entry(str(i), priority=i % 3) for i in range(6)]
    for e in entries[1::2]:
        e.dead = True
    queue = _queue(*entries)
    assert sorted(_names(queue.drop_dead())) == ["1", "3", "5"]
    assert _names(_take(queue)) == ["2", "4", "0"]


def test_remove() -> None:
    a, b, c = _entry("a"), _entry("b", 1), _entry("c")
    queue = _queue(a, b, c)
    assert queue.remove(b) is True
    assert queue.remove(b) is False
    assert b not in queue and len(queue) == 2 and queue.peek() is a
    queue.put(b)
    assert _names(_take(queue)) == ["b", "a", "c"]


def test_removed_entries_do_not_pile_up() -> None:
    queue = _queue()
    keep = _entry("keep", priority=-1)
    queue.put(keep)
    for i in range(1000):
        e = _entry(str(i))
        queue.put(e)
        queue.remove(e)
    assert len(queue) == 1 and list(queue._levels) == [-1]  # nothing kept for what left
    assert _take(queue) == [keep]
