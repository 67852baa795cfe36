"""The waiting queue: requests admitted but not yet prefilled.

Owns the order waiting requests are served in (higher `priority` first, then arrival order) and
the dropping of requests whose client went away or whose deadline passed (they are never
prefilled). What fits in a step is the scheduler's decision (router/scheduler.py).

A heap keyed by (-priority, arrival) gives O(log n) `put` and pop; `remove` is O(1) and lazy: the
heap item stays behind and is skipped when it surfaces, and the heap is rebuilt when such stale
items outnumber live ones.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar


@dataclass(eq=False)
class Entry:
    """One waiting request as the queue sees it; compared and hashed by identity.

    The router subclasses it with its own request state and overrides `is_dead`. `arrival` (a
    sequence number) and `enqueued_at` (`clock()` time) are set by the first `put`, and kept when
    an entry is put back, so that it keeps its place and its waiting time.
    """

    priority: int
    prompt_len: int
    max_new_tokens: int
    arrival: int = field(default=-1, init=False)
    enqueued_at: float = field(default=0.0, init=False)

    def is_dead(self) -> bool:
        """True when the client went away or the deadline passed; subclasses say how."""
        return False


E = TypeVar("E", bound=Entry)
_Item = tuple[int, int, int, Entry]  # (-priority, arrival, push sequence, entry)


class RequestQueue(Generic[E]):
    """Waiting entries, best first: higher priority, then earlier arrival."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heap: list[_Item] = []
        self._live: dict[E, _Item] = {}
        self._arrivals = itertools.count()
        self._pushes = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, entry: object) -> bool:
        return entry in self._live

    def put(self, entry: E) -> None:
        """Queues `entry`; a first put stamps its `arrival` and `enqueued_at`."""
        if entry in self._live:
            raise ValueError("entry is already queued")
        if entry.arrival < 0:
            entry.arrival = next(self._arrivals)
            entry.enqueued_at = self._clock()
        item = (-entry.priority, entry.arrival, next(self._pushes), entry)
        heapq.heappush(self._heap, item)
        self._live[entry] = item

    def remove(self, entry: E) -> bool:
        """Takes `entry` out of the queue (a cancelled request); False if it was not queued."""
        if self._live.pop(entry, None) is None:
            return False
        if len(self._heap) > 2 * len(self._live) + 32:
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)
        return True

    def peek(self) -> E | None:
        """The entry that would be served next (dead or not), or None when the queue is empty."""
        while self._heap and self._live.get(self._heap[0][3]) is not self._heap[0]:
            heapq.heappop(self._heap)
        return self._heap[0][3] if self._heap else None

    def drop_dead(self) -> list[E]:
        """Removes and returns every dead entry, wherever it is in the queue (O(n))."""
        dead = [entry for entry in self._live if entry.is_dead()]
        for entry in dead:
            self.remove(entry)
        return dead

    def pop(self) -> E | None:
        """Removes and returns the best entry (dead or not), or None when the queue is empty."""
        entry = self.peek()
        if entry is not None:
            self.remove(entry)
        return entry
