"""The scheduler: what the shards do in the next step, and which KV blocks each request writes.

Every step has a token budget (`--max-batch-prefill-tokens`): each decoding request costs one
token, and prompts fill what is left, in chunks, so a long prompt never stalls running streams.
Per step, in this order:

1. requests that ended (finished, cancelled, expired) leave the shards: their blocks are released
   and their ids go out in the step's `free` list;
2. every decoding request gets the block its next token needs; when none is free, the
   lowest-priority, most recently admitted running request is preempted: its blocks are released
   and it goes back to the queue, to be resumed later by recomputing prompt + streamed tokens;
3. requests still prefilling (admitted earlier, prompt longer than the budget) run their next chunk;
4. waiting requests are admitted, best first, while the budget, `--max-batch-size` and the free
   blocks allow: a request reuses the longest cached prefix of whole blocks (router/scheduling/prefix_cache.py)
   and is admitted with blocks for the rest of its prompt (plus a watermark kept free for decodes),
   never ahead of a better one that does not fit.

Blocks a request computed stay in the prefix cache when it leaves the shards (finished, cancelled
or preempted), so a preempted request usually resumes from its own blocks.

Requests that were part of a failed step are suspects: one runs only alone, until it finishes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from shardline.proto import shard_pb2
from shardline.router.scheduling.blocks import BlockAllocator
from shardline.router.scheduling.prefix_cache import PrefixCache
from shardline.router.scheduling.queue import RequestQueue
from shardline.router.scheduling.request import RouterRequest


@dataclass
class Plan:
    """One step: the message to send and the requests it concerns."""

    step: shard_pb2.StepRequest
    work: dict[int, tuple[RouterRequest, shard_pb2.Work]] = field(default_factory=dict)
    started: list[RouterRequest] = field(default_factory=list)
    dropped: list[RouterRequest] = field(default_factory=list)  # left the shards without finishing
    preempted: list[RouterRequest] = field(default_factory=list)

    @property
    def members(self) -> list[RouterRequest]:
        return [req for req, _ in self.work.values()]

    @property
    def sampled(self) -> list[RouterRequest]:
        """Requests that get a token from this step, in work order (the shards' reply order)."""
        return [req for req, w in self.work.values() if w.sample]

    def rollback(self, running: dict[int, RouterRequest]) -> None:
        """The step did not run: what its work fed is not on the shards (for requests still there)."""
        for req, w in self.work.values():
            if running.get(req.id) is req:
                req.fed -= len(w.token_ids) or 1

    def seal(self) -> shard_pb2.StepRequest:
        self.step.work.extend(w for _, w in self.work.values())
        return self.step


class Scheduler:
    def __init__(self, allocator: BlockAllocator, queue: RequestQueue[RouterRequest], *,
                 step_tokens: int, max_batch_size: int, watermark_blocks: int = 1,
                 cache: PrefixCache | None = None):
        self.allocator, self.queue, self.cache = allocator, queue, cache
        self.hit_tokens = self.query_tokens = 0  # prefix cache statistics, for the metrics
        self.step_tokens, self.max_batch_size = step_tokens, max_batch_size
        self.watermark = watermark_blocks
        self.running: dict[int, RouterRequest] = {}  # in admission order
        self.to_free: list[int] = []  # sequences to drop on the shards at the next step
        self._admissions = itertools.count()

    # -- leaving the shards ----------------------------------------------------------------------
    def release(self, req: RouterRequest) -> None:
        """The request leaves the shards: blocks back to the pool, its id into the next `free`."""
        self.running.pop(req.id, None)
        self.cache_computed(req)
        self.allocator.release(req.blocks)
        req.blocks, req.fed, req.prefill_end = [], 0, 0
        if req.on_shards:
            self.to_free.append(req.id)
            req.on_shards = False

    def forget_all(self) -> list[RouterRequest]:
        """After the shards lost their state (restart, reset): nothing is on them any more."""
        running = list(self.running.values())
        for req in running:
            req.blocks, req.fed, req.prefill_end, req.on_shards = [], 0, 0, False
        self.running.clear()
        self.to_free.clear()
        if self.cache is not None:
            self.cache.clear()
        self.allocator.reset()
        return running

    def cache_computed(self, req: RouterRequest) -> None:
        """Puts the request's computed full blocks into the prefix cache (if there is one)."""
        if self.cache is not None and req.blocks:
            sequence = req.sequence
            self.cache.insert(sequence[:min(req.fed, len(sequence))], req.blocks)

    # -- planning --------------------------------------------------------------------------------
    def plan(self) -> Plan | None:
        """The next step, or None when there is nothing to do."""
        plan = Plan(shard_pb2.StepRequest())
        for req in [r for r in self.running.values() if r.is_dead() or r.done]:
            self.release(req)
            plan.dropped.append(req)
        budget = self.step_tokens
        for req in list(self.running.values()):
            if req.id in self.running and not req.prefilling:
                budget -= self._decode(plan, req)
        for req in list(self.running.values()):
            if req.prefilling and budget > 0:
                budget -= self._chunk(plan, req, budget)
        budget = self._admit(plan, budget)
        plan.step.free.extend(self.to_free)
        self.to_free = []
        if not plan.work and not plan.step.free:
            return None
        return plan

    def _decode(self, plan: Plan, req: RouterRequest) -> int:
        """Schedules one decode token; preempts for its block if needed. Returns tokens used."""
        while len(req.blocks) * self.allocator.block_size <= req.fed:
            got = self.allocator.allocate(1)
            if got is not None:
                req.blocks += got
                plan.work.setdefault(req.id, (req, shard_pb2.Work(id=req.id)))[1].new_blocks.extend(got)
                break
            victim = self._victim()
            self._preempt(plan, victim)
            if victim is req:
                return 0
        work = plan.work.setdefault(req.id, (req, shard_pb2.Work(id=req.id)))[1]
        work.sample = True
        req.fed += 1
        return 1

    def _victim(self) -> RouterRequest:
        return min(self.running.values(), key=lambda r: (r.priority, -r.admitted_seq))

    def _preempt(self, plan: Plan, victim: RouterRequest) -> None:
        work = plan.work.pop(victim.id, None)
        if work is not None:
            victim.fed -= len(work[1].token_ids) or 1
        self.release(victim)
        self.queue.put(victim)
        plan.preempted.append(victim)

    def _chunk(self, plan: Plan, req: RouterRequest, budget: int) -> int:
        """Schedules the next prompt chunk of a prefilling request (its blocks are already held)."""
        tokens = req.sequence[req.fed:min(req.prefill_end, req.fed + budget)]
        work = plan.work.setdefault(req.id, (req, shard_pb2.Work(id=req.id)))[1]
        work.token_ids.extend(tokens)
        req.fed += len(tokens)
        work.sample = req.fed >= req.prefill_end
        return len(tokens)

    def _admit(self, plan: Plan, budget: int) -> int:
        plan.dropped.extend(self.queue.drop_dead())
        while budget > 0 and len(self.running) < self.max_batch_size:
            head = self.queue.peek()
            if head is None or head in plan.preempted or not self._may_start(head):
                break
            if not self._place(head):
                break
            self.queue.remove(head)
            head.admitted_seq = next(self._admissions)
            head.prefill_end = len(head.sequence)
            self.running[head.id] = head
            plan.started.append(head)
            start = head.new_sequence()
            start.cached_token_ids.extend(head.sequence[:head.fed])
            plan.step.start.append(start)
            plan.work[head.id] = (head, shard_pb2.Work(id=head.id, new_blocks=head.blocks))
            budget -= self._chunk(plan, head, budget)
        return budget

    def _place(self, head: RouterRequest) -> bool:
        """Gives the head its cached prefix and fresh blocks for the rest, keeping a watermark
        free while others run; False (nothing held) when they do not fit."""
        sequence = head.sequence
        hit = self.cache.match(sequence) if self.cache is not None else []
        need = self.allocator.blocks_for(len(sequence)) - len(hit)
        spare = self.watermark if self.running else 0
        fresh = self.allocator.allocate(need + spare)
        if fresh is None:
            self.allocator.release(hit)
            return False
        self.allocator.release(fresh[need:])
        head.blocks, head.fed = hit + fresh[:need], len(hit) * self.allocator.block_size
        self.query_tokens += len(sequence)
        self.hit_tokens += head.fed
        if not head.token_ids:
            head.cached_tokens = head.fed
        return True

    def _may_start(self, head: RouterRequest) -> bool:
        """Suspects run alone: none starts beside others, nothing starts beside a suspect."""
        if any(r.strikes for r in self.running.values()):
            return False
        return not head.strikes or not self.running
