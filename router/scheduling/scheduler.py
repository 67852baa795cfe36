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

A decoding request whose token in flight is known to be its last (max_new_tokens) is not decoded
again: that token would be dropped, and its block could preempt a live request. It is also the
first choice of a preemption, which costs it nothing: it leaves the queue once that token lands.

Blocks are offered to the prefix cache as they are computed, each once (O(new blocks) per step).

Requests that were part of a failed step are suspects: one runs only alone, until it finishes.
An exception while planning one request's part of a step takes that request out of the step and
the shards and into `failed` (the batcher fails it with INTERNAL); the step goes on without it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from shardline.proto import shard_pb2
from shardline.router.scheduling.blocks import BlockAllocator
from shardline.router.scheduling.prefix_cache import PrefixCache
from shardline.router.scheduling.queue import RequestQueue
from shardline.router.scheduling.request import RouterRequest
from shardline.router.scheduling.speculation import Speculator


def fed_by(work: shard_pb2.Work) -> int:
    """Tokens a work sends to the shards: its explicit tokens, or a decode's held token and proposals."""
    return len(work.token_ids) or 1 + len(work.draft_token_ids)


@dataclass
class Plan:
    """One step: the message to send and the requests it concerns."""

    step: shard_pb2.StepRequest
    work: dict[int, tuple[RouterRequest, shard_pb2.Work]] = field(default_factory=dict)
    new: dict[int, shard_pb2.NewSequence] = field(default_factory=dict)  # the step's starts
    started: list[RouterRequest] = field(default_factory=list)
    dropped: list[RouterRequest] = field(default_factory=list)  # left the shards without finishing
    preempted: list[RouterRequest] = field(default_factory=list)
    # Filled when the step lands: each sampled request and its generations (1 + accepted proposals).
    tokens: list[tuple[RouterRequest, list[shard_pb2.Generation]]] = field(default_factory=list)

    @property
    def members(self) -> list[RouterRequest]:
        return [req for req, _ in self.work.values()]

    def rollback(self, running: dict[int, RouterRequest]) -> None:
        """The step did not run: what its work fed is not on the shards (for requests still there)."""
        for req, w in self.work.values():
            if running.get(req.id) is req:
                req.fed -= fed_by(w)

    def forget(self, req: RouterRequest) -> None:
        """Takes the request out of the step (it failed while being planned)."""
        self.work.pop(req.id, None)
        self.new.pop(req.id, None)
        if req in self.started:
            self.started.remove(req)

    def seal(self) -> shard_pb2.StepRequest:
        self.step.start.extend(self.new.values())
        self.step.work.extend(w for _, w in self.work.values())
        return self.step


class Scheduler:
    def __init__(self, allocator: BlockAllocator, queue: RequestQueue[RouterRequest], *,
                 step_tokens: int, max_batch_size: int, watermark_blocks: int = 1,
                 cache: PrefixCache | None = None, speculator: Speculator | None = None):
        self.allocator, self.queue, self.cache, self.speculator = allocator, queue, cache, speculator
        self.hit_tokens = self.query_tokens = 0  # prefix cache statistics, for the metrics
        self.step_tokens, self.max_batch_size = step_tokens, max_batch_size
        self.watermark = watermark_blocks
        self.running: dict[int, RouterRequest] = {}  # in admission order
        self.to_free: list[int] = []  # sequences to drop on the shards at the next step
        self.failed: list[tuple[RouterRequest, Exception]] = []  # raised while planned; the batcher fails them
        self._admissions = itertools.count()
        self._speculate = False  # set per plan: this step may carry proposals

    # -- leaving the shards ----------------------------------------------------------------------
    def release(self, req: RouterRequest, cache: bool = True) -> None:
        """The request leaves the shards: blocks back to the pool, its id into the next `free`.
        With `cache`, its computed full blocks stay in the prefix cache."""
        self.running.pop(req.id, None)
        if cache:
            self.cache_computed(req)
        self.allocator.release(req.blocks)
        req.blocks, req.fed, req.prefill_end = [], 0, 0
        req.cache_at, req.cache_blocks = None, 0
        if req.on_shards:
            self.to_free.append(req.id)
            req.on_shards = False

    def forget_all(self) -> list[RouterRequest]:
        """After the shards lost their state (restart, reset): nothing is on them any more."""
        running = list(self.running.values())
        for req in running:
            req.blocks, req.fed, req.prefill_end, req.on_shards = [], 0, 0, False
            req.cache_at, req.cache_blocks = None, 0
        self.running.clear()
        self.to_free.clear()
        if self.cache is not None:
            self.cache.clear()
        self.allocator.reset()
        return running

    def cache_computed(self, req: RouterRequest) -> None:
        """Puts the request's computed full blocks that are not cached yet into the prefix cache
        (if there is one): each block is offered once, so caching costs O(new blocks)."""
        if self.cache is None or req.cache_at is None:
            return
        bs = self.allocator.block_size
        full = min(req.fed, req.length) // bs
        if full <= req.cache_blocks:
            return
        keys = (tuple(req.span(i * bs, (i + 1) * bs)) for i in range(req.cache_blocks, full))
        req.cache_at = self.cache.extend(req.cache_at, keys, req.blocks[req.cache_blocks:full])
        req.cache_blocks = full

    # -- planning --------------------------------------------------------------------------------
    def plan(self) -> Plan | None:
        """The next step, or None when there is nothing to do."""
        plan = Plan(shard_pb2.StepRequest())
        for req in [r for r in self.running.values() if r.is_dead()]:
            self._guarded(plan, req, self._leave)
        budget = self.step_tokens
        self._speculate = self.speculating()
        for req in list(self.running.values()):
            if req.id in self.running and not req.prefilling:
                budget -= self._guarded(plan, req, self._decode, budget)
        for req in list(self.running.values()):
            if req.prefilling and budget > 0:
                budget -= self._guarded(plan, req, self._chunk, budget)
        budget = self._admit(plan, budget)
        plan.step.free.extend(self.to_free)
        self.to_free = []
        if not plan.work and not plan.step.free:
            return None
        return plan

    def _guarded(self, plan: Plan, req: RouterRequest, part, *args) -> int:
        """Plans one request's part of the step; an exception takes that request (alone) out of
        the step and the shards, into `failed`. Returns the tokens it used."""
        try:
            return part(plan, req, *args)
        except Exception as exc:  # a router bug concerning this request: it must not stop the step
            self._contain(plan, req, exc)
            return 0

    def _contain(self, plan: Plan, req: RouterRequest, exc: Exception) -> None:
        plan.forget(req)
        self.queue.remove(req)
        try:
            self.release(req, cache=False)
        except Exception:  # its blocks are lost to the pool rather than the server to the bug
            self.running.pop(req.id, None)
        self.failed.append((req, exc))

    def _leave(self, plan: Plan, req: RouterRequest) -> int:
        self.release(req)
        plan.dropped.append(req)
        return 0

    def speculating(self) -> bool:
        """Whether the next step may carry proposals (--speculative, few enough decoding requests)."""
        if self.speculator is None:
            return False
        decoding = [r for r in self.running.values() if not r.prefilling]
        return self.speculator.active(len(decoding)) and any(self.speculator.ready(r) for r in decoding)

    def _decode(self, plan: Plan, req: RouterRequest, budget: int) -> int:
        """Schedules one decode token (and proposals after it, when speculating); preempts for its
        block if needed. Returns tokens used."""
        if req.ends_in_flight:
            return 0  # its token in flight is its last: a decode now would be dropped
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
        return 1 + self._propose(req, work, budget - 1)

    def _propose(self, req: RouterRequest, work: shard_pb2.Work, budget: int) -> int:
        """Proposals after the decode token, when the router knows that token (it was streamed:
        fed == length after feeding it), within the budget and max_new_tokens; their KV slots come
        from free blocks only (a guess never preempts anyone). Returns the proposals added."""
        if self.speculator is None:
            return 0
        if not self._speculate or req.fed != req.length or not self.speculator.ready(req):
            self.speculator.decoded(req)
            return 0
        room = req.valid.max_new_tokens - len(req.token_ids)  # the step returns up to 1 + proposals
        drafts = self.speculator.propose(req, min(budget, room - 1))
        if not drafts:
            return 0
        bs = self.allocator.block_size
        short = req.fed + len(drafts) - len(req.blocks) * bs
        if short > 0:
            got = self.allocator.allocate(-(-short // bs))
            if got is None:
                drafts = drafts[:len(req.blocks) * bs - req.fed]
            else:
                req.blocks += got
                work.new_blocks.extend(got)
        work.draft_token_ids.extend(drafts)
        req.fed += len(drafts)
        return len(drafts)

    def _victim(self) -> RouterRequest:
        """A request whose last token is in flight first (preempting it costs nothing), then the
        lowest-priority, most recently admitted one."""
        return min(self.running.values(), key=lambda r: (not r.ends_in_flight, r.priority, -r.admitted_seq))

    def _preempt(self, plan: Plan, victim: RouterRequest) -> None:
        work = plan.work.pop(victim.id, None)
        if work is not None:
            victim.fed -= fed_by(work[1])
        self.release(victim)
        self.queue.put(victim)
        plan.preempted.append(victim)

    def _chunk(self, plan: Plan, req: RouterRequest, budget: int) -> int:
        """Schedules the next prompt chunk of a prefilling request (its blocks are already held)."""
        tokens = req.span(req.fed, min(req.prefill_end, req.fed + budget))
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
            try:
                placed = self._place(head)
            except Exception as exc:
                self._contain(plan, head, exc)
                continue
            if not placed:
                break
            self.queue.remove(head)
            budget -= self._guarded(plan, head, self._start, budget)
        return budget

    def _start(self, plan: Plan, head: RouterRequest, budget: int) -> int:
        """Starts a placed request on the shards with its first prompt chunk."""
        head.admitted_seq = next(self._admissions)
        head.prefill_end = head.length
        self.running[head.id] = head
        plan.started.append(head)
        start = head.new_sequence()
        start.cached_token_ids.extend(head.span(0, head.fed))
        plan.new[head.id] = start
        plan.work[head.id] = (head, shard_pb2.Work(id=head.id, new_blocks=head.blocks))
        return self._chunk(plan, head, budget)

    def _place(self, head: RouterRequest) -> bool:
        """Gives the head its cached prefix and fresh blocks for the rest, keeping a watermark
        free while others run; False (nothing held) when they do not fit."""
        sequence = head.sequence
        hit, at = self.cache.match(sequence) if self.cache is not None else ([], None)
        need = self.allocator.blocks_for(len(sequence)) - len(hit)
        spare = self.watermark if self.running else 0
        fresh = self.allocator.allocate(need + spare)
        if fresh is None:
            self.allocator.release(hit)
            return False
        self.allocator.release(fresh[need:])
        head.blocks, head.fed = hit + fresh[:need], len(hit) * self.allocator.block_size
        head.cache_at, head.cache_blocks = at, len(hit)
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
