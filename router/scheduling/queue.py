"""The waiting queue: requests admitted but not yet prefilled.

Owns the order waiting requests are served in: higher `priority` first; among equal priorities,
round-robin between tenants (the names of router/api/auth.py), each tenant's own requests in arrival
order. It also drops requests whose client went away or whose deadline passed (they are never
prefilled). What fits in a step is the scheduler's decision (router/scheduling/scheduler.py).

Each priority level keeps its waiting tenants in turn order. Serving a tenant's request (removing
the entry `peek` just returned) sends that tenant to the back of the turn; a tenant that starts
waiting joins just before the one served last, so a newcomer behind another tenant's burst waits
for at most one request of it per turn, never for the whole burst. An entry put back (preempted)
keeps its arrival and its tenant is served next, so it resumes first. Only waiting entries take
memory.
"""

from __future__ import annotations

import bisect
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
    tenant: str = ""  # who asked (router/api/auth.py); the unit of round-robin among equal priorities
    arrival: int = field(default=-1, init=False)
    enqueued_at: float = field(default=0.0, init=False)

    def is_dead(self) -> bool:
        """True when the client went away or the deadline passed; subclasses say how."""
        return False


E = TypeVar("E", bound=Entry)
_Item = tuple[int, int, Entry]  # (arrival, put sequence, entry): a tenant's entries sort by arrival


@dataclass
class _Level:
    """The waiting entries of one priority: each tenant's in arrival order, the tenants in turn."""

    tenants: dict[str, list[_Item]] = field(default_factory=dict)
    turn: list[str] = field(default_factory=list)  # tenants with entries; turn[0] is served next
    last_served: str | None = None

    def join(self, tenant: str, first: bool = False) -> None:
        """A tenant starts waiting: before the one served last (it had its turn), else at the back;
        `first`: at the front (a preempted request resumes where it was: first)."""
        if tenant in self.turn:
            self.turn.remove(tenant)
        at = len(self.turn) - 1 if self.turn and self.turn[-1] == self.last_served else len(self.turn)
        self.turn.insert(0 if first else at, tenant)

    def leave(self, item: _Item, served: bool) -> None:
        tenant = item[2].tenant
        waiting = self.tenants[tenant]
        waiting.remove(item)
        if served:
            self.last_served = tenant
        if not waiting:
            del self.tenants[tenant]
            self.turn.remove(tenant)
        elif served:  # its turn is over: to the back
            self.turn.remove(tenant)
            self.turn.append(tenant)


class RequestQueue(Generic[E]):
    """Waiting entries, best first: higher priority, then tenants in turn, then earlier arrival."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._levels: dict[int, _Level] = {}
        self._live: dict[E, _Item] = {}
        self._arrivals = itertools.count()
        self._puts = itertools.count()
        self._head: E | None = None  # what `peek` returned last: removing it means serving it

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, entry: object) -> bool:
        return entry in self._live

    def put(self, entry: E) -> None:
        """Queues `entry`; a first put stamps its `arrival` and `enqueued_at`; a later one (put
        back) makes its tenant the next served."""
        if entry in self._live:
            raise ValueError("entry is already queued")
        back = entry.arrival >= 0
        if not back:
            entry.arrival = next(self._arrivals)
            entry.enqueued_at = self._clock()
        level = self._levels.setdefault(entry.priority, _Level())
        if entry.tenant not in level.tenants or back:
            level.tenants.setdefault(entry.tenant, [])
            level.join(entry.tenant, first=back)
        item = (entry.arrival, next(self._puts), entry)
        bisect.insort(level.tenants[entry.tenant], item)
        self._live[entry] = item

    def remove(self, entry: E) -> bool:
        """Takes `entry` out of the queue: served when it is what `peek` just returned, else
        cancelled (or dead); False if it was not queued."""
        item = self._live.pop(entry, None)
        if item is None:
            return False
        served = entry is self._head
        self._head = None if served else self._head
        level = self._levels[entry.priority]
        level.leave(item, served)
        if not level.tenants:
            del self._levels[entry.priority]
        return True

    def peek(self) -> E | None:
        """The entry that would be served next (dead or not), or None when the queue is empty."""
        if not self._levels:
            return None
        level = self._levels[max(self._levels)]
        self._head = level.tenants[level.turn[0]][0][2]
        return self._head

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
