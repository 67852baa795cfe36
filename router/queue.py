"""The waiting queue: requests admitted but not yet prefilled.

Owns the order waiting requests are served in: higher `priority` first; among equal priorities,
round-robin between tenants; within one tenant, arrival order. It also drops requests whose
client went away or whose deadline passed (they are never prefilled). What fits in a step is the
scheduler's decision (router/scheduler.py).

Round-robin by rounds: each priority level has a floor, the round of the last entry served from
it. A tenant's new entry gets the round after its previous waiting one, but never below the floor,
so a tenant arriving behind another's burst of 100 is served after at most one more of the burst,
not after all of it. A tenant with nothing waiting starts again at the floor. An entry put back
(preempted) keeps its round and arrival, so it keeps its place.

A heap keyed by (-priority, round, arrival) gives O(log n) `put` and pop; `remove` is O(1) and
lazy: the heap item stays behind and is skipped when it surfaces, and the heap is rebuilt when such
stale items outnumber live ones.
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
    sequence number), `enqueued_at` (`clock()` time) and `round` are set by the first `put`, and
    kept when an entry is put back, so that it keeps its place and its waiting time.
    """

    priority: int
    prompt_len: int
    max_new_tokens: int
    tenant: str = ""  # who asked (router/auth.py); the unit of round-robin among equal priorities
    arrival: int = field(default=-1, init=False)
    enqueued_at: float = field(default=0.0, init=False)
    round: int = field(default=-1, init=False)

    def is_dead(self) -> bool:
        """True when the client went away or the deadline passed; subclasses say how."""
        return False


E = TypeVar("E", bound=Entry)
_Item = tuple[int, int, int, int, Entry]  # (-priority, round, arrival, push sequence, entry)


class RequestQueue(Generic[E]):
    """Waiting entries, best first: higher priority, then tenants in turn, then earlier arrival."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heap: list[_Item] = []
        self._live: dict[E, _Item] = {}
        self._arrivals = itertools.count()
        self._pushes = itertools.count()
        self._floor: dict[int, int] = {}  # priority -> round of the last entry served
        self._levels: dict[int, int] = {}  # priority -> entries waiting
        self._tenants: dict[tuple[int, str], list[int]] = {}  # (priority, tenant) -> [waiting, next round]

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, entry: object) -> bool:
        return entry in self._live

    def put(self, entry: E) -> None:
        """Queues `entry`; a first put stamps its `arrival`, `enqueued_at` and `round`."""
        if entry in self._live:
            raise ValueError("entry is already queued")
        if entry.arrival < 0:
            entry.arrival = next(self._arrivals)
            entry.enqueued_at = self._clock()
        floor = self._floor.get(entry.priority, 0)
        turn = self._tenants.setdefault((entry.priority, entry.tenant), [0, floor])
        if entry.round < 0:
            entry.round = max(turn[1], floor)
            turn[1] = entry.round + 1
        else:  # put back: its old round, but never behind a level that started over
            entry.round = min(entry.round, floor)
        turn[0] += 1
        self._levels[entry.priority] = self._levels.get(entry.priority, 0) + 1
        item = (-entry.priority, entry.round, entry.arrival, next(self._pushes), entry)
        heapq.heappush(self._heap, item)
        self._live[entry] = item

    def remove(self, entry: E) -> bool:
        """Takes `entry` out of the queue (served or cancelled); False if it was not queued."""
        if self._live.pop(entry, None) is None:
            return False
        self._forget(entry)
        if len(self._heap) > 2 * len(self._live) + 32:
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)
        return True

    def _forget(self, entry: E) -> None:
        """Drops the counts of a removed entry; an emptied tenant or level starts over next time."""
        key = (entry.priority, entry.tenant)
        self._tenants[key][0] -= 1
        if self._tenants[key][0] == 0:
            del self._tenants[key]
        self._levels[entry.priority] -= 1
        if self._levels[entry.priority] == 0:
            del self._levels[entry.priority]
            self._floor.pop(entry.priority, None)

    def peek(self) -> E | None:
        """The entry that would be served next (dead or not), or None when the queue is empty."""
        while self._heap and self._live.get(self._heap[0][4]) is not self._heap[0]:
            heapq.heappop(self._heap)
        if not self._heap:
            return None
        head = self._heap[0][4]
        self._floor[head.priority] = max(self._floor.get(head.priority, 0), head.round)
        return head

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
