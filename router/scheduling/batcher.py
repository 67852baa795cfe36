"""Continuous batching: admission, and the loop that drives the shard group one step at a time.

Each iteration asks the scheduler for the next step (frees, new sequences with their blocks,
prefill chunks and decodes together), sends it to every rank at once, and hands each sampled token
to its request, which decides whether it has finished (stop string, EOS, max_new_tokens); finished
and cancelled requests leave the shards in the next step's `free` list.

A failed step is judged by its cause. A dead or hung shard restarts the group (counted against
--max-restarts) and every running request resumes from prompt + streamed tokens. Any other error
(the shards refused the step, or raised while running it) is charged to the requests in that
step: each gets a strike, runs alone afterwards, and is failed by itself at its second strike;
such failures never use up --max-restarts for everyone.

A router exception while planning, landing or absorbing one request's part of a step fails that
request alone (INTERNAL, logged with its request id) and the loop goes on. An exception that
concerns no single request fails the requests of the step it was handling (`_concerned`), resets
the shards and resumes everyone else from prompt + streamed tokens: the server never stops for a bug.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
import structlog

from shardline.proto import shard_pb2
from shardline.router.scheduling.blocks import BlockAllocator
from shardline.router.config import RouterConfig
from shardline.router.metrics import Metrics
from shardline.router.scheduling.prefix_cache import PrefixCache
from shardline.router.scheduling.queue import RequestQueue
from shardline.router.scheduling.request import RouterRequest
from shardline.router.scheduling.scheduler import Plan, Scheduler
from shardline.router.scheduling.speculation import Speculator
from shardline.router.group.shards import ShardGroup, ShardGroupError

log = structlog.get_logger("shardline.router")
# Codes that mean a rank is gone or stuck (the group must be replaced), not that the step was bad.
INFRASTRUCTURE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
# The shards refused the step before running it: nothing changed on any rank.
REFUSED = grpc.StatusCode.INVALID_ARGUMENT
MAX_STRIKES = 2


async def first_of(*aws) -> None:
    """Waits until the first of the awaitables completes; cancels the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


class Overloaded(Exception):
    """More than --max-concurrent-requests would be admitted."""


class NeverFits(ValueError):
    """The request needs more KV than the whole pool holds."""


class Batcher:
    def __init__(self, cfg: RouterConfig, allocator: BlockAllocator, metrics: Metrics | None = None,
                 eos_ids: frozenset[int] = frozenset(), step_tokens: int = 0):
        self.cfg, self.eos_ids = cfg, eos_ids
        self.metrics = metrics or Metrics()
        self.queue: RequestQueue[RouterRequest] = RequestQueue()
        self.admitted: set[RouterRequest] = set()
        self.wakeup = asyncio.Event()
        self.resize(allocator, step_tokens or cfg.step_tokens("cpu"))
        # Called with the error when the group must be replaced; returns the new, warmed-up group.
        # `counted` is False when the failure was charged to requests rather than to the group.
        self.on_group_failure: Callable[[ShardGroupError, bool], Awaitable[ShardGroup]] | None = None

    def resize(self, allocator: BlockAllocator, step_tokens: int) -> None:
        """Uses a (new) pool and step budget; only between steps, with nothing on the shards."""
        self.allocator = allocator
        self.cache = PrefixCache(allocator) if self.cfg.prefix_cache else None
        c = self.cfg
        speculator = (Speculator(c.num_speculative_tokens, c.ngram_min, c.ngram_max, c.speculative_max_batch)
                      if c.speculative == "ngram" else None)
        self.scheduler = Scheduler(allocator, self.queue, step_tokens=step_tokens,
                                   max_batch_size=self.cfg.max_batch_size,
                                   watermark_blocks=max(1, allocator.num_blocks // 100), cache=self.cache,
                                   speculator=speculator)
        self.metrics.kv_blocks_total.set(allocator.num_blocks)
        self.metrics.kv_capacity.set(allocator.capacity_tokens)

    @property
    def running(self) -> dict[int, RouterRequest]:
        return self.scheduler.running

    # -- admission (called by the RPC handlers) --------------------------------------------------
    def submit(self, req: RouterRequest) -> None:
        need = req.prompt_len + req.max_new_tokens
        if need > self.allocator.capacity_tokens:
            raise NeverFits(f"prompt ({req.prompt_len} tokens) + max_new_tokens ({req.max_new_tokens}) = {need} "
                            f"KV tokens, more than the shards' whole KV pool holds "
                            f"({self.allocator.capacity_tokens} tokens)")
        if len(self.admitted) >= self.cfg.max_concurrent_requests:
            raise Overloaded(f"{len(self.admitted)} requests already admitted "
                             f"(--max-concurrent-requests={self.cfg.max_concurrent_requests})")
        self.admitted.add(req)
        self.queue.put(req)
        self.wakeup.set()

    def cancel(self, req: RouterRequest) -> None:
        """The client went away: free its slot now; a running request leaves the shards next step."""
        req.cancelled = True
        self.queue.remove(req)
        self.admitted.discard(req)
        self.wakeup.set()

    def fail(self, req: RouterRequest, code: grpc.StatusCode, message: str, cache: bool = True) -> None:
        self.scheduler.release(req, cache=cache)
        self.queue.remove(req)
        self.admitted.discard(req)
        req.fail(code, message)
        self.metrics.errors.labels(code.name).inc()

    def fail_all(self, code: grpc.StatusCode, message: str) -> None:
        """Ends every admitted request with a status (no group to serve them)."""
        for req in list(self.admitted):
            self.fail(req, code, message)
        self.scheduler.forget_all()

    # -- the loop --------------------------------------------------------------------------------
    async def run(self, group: ShardGroup) -> None:
        """Steps back to back: as soon as step N's reply is in, step N+1 is planned and sent, and
        N's tokens are streamed while the shards compute N+1 (decodes run the token the shards
        sampled themselves). A request that ended in N is computed once more in N+1; that extra
        token is dropped, never streamed. While steps speculate, N's tokens are streamed first:
        the proposals for N+1 follow them."""
        inflight: tuple[Plan, asyncio.Future] | None = None
        while True:
            plan = None
            try:
                self._update_gauges()  # inside the guard, and after a failed turn as well
                if inflight is None:
                    plan = self._plan()
                    if plan is None and not group.broken.is_set():
                        self.wakeup.clear()
                        await first_of(self.wakeup.wait(), group.broken.wait())
                        continue
                    inflight = self._send(group, plan or Plan(shard_pb2.StepRequest()))
                plan, call = inflight
                reply = await call
                self._landed(plan, reply)
                cpu = time.thread_time()
                streamed = self.scheduler.speculating()
                if streamed:
                    self._absorb(plan, reply)
                following = self._plan()
                inflight = self._send(group, following) if following is not None else None
                if not streamed:
                    self._absorb(plan, reply)
                self.metrics.router_cpu.observe(time.thread_time() - cpu)
            except ShardGroupError as exc:
                inflight = None
                group = await self._failed(group, plan, exc)
            except Exception as exc:  # a router bug no single request was charged with
                group = await self._contain(group, self._concerned(plan), inflight, exc)
                inflight = None

    def _plan(self) -> Plan | None:
        plan = self.scheduler.plan()
        for req, exc in self.scheduler.failed:
            self._internal(req, exc, "planning a step")
        self.scheduler.failed.clear()
        for req in plan.dropped if plan else ():
            if not req.cancelled and not req.done:
                self.fail(req, grpc.StatusCode.DEADLINE_EXCEEDED, "request deadline passed")
            self.admitted.discard(req)
        for _ in plan.preempted if plan else ():
            self.metrics.preemptions.inc()
        return plan

    def _send(self, group: ShardGroup, plan: Plan) -> tuple[Plan, asyncio.Future]:
        request = plan.seal()
        if plan.work:
            self.metrics.batch_size.observe(len(plan.work))

        async def call() -> shard_pb2.StepResponse:
            start = time.monotonic()
            group.raise_if_broken("Step")
            reply = await group.step(request, [r.request_id for r in plan.started])
            self.metrics.step.labels("prefill" if request.start else "decode").observe(time.monotonic() - start)
            return reply
        return plan, asyncio.ensure_future(call())

    def _landed(self, plan: Plan, reply: shard_pb2.StepResponse) -> None:
        """The step ran: its new sequences exist on the shards, its prompt chunks are cached, and
        the proposals the shards rejected are no longer counted as fed."""
        plan.tokens = self._split(plan, reply)
        for req, gens in plan.tokens:
            work = plan.work[req.id][1]
            if work.draft_token_ids:
                self._verified(req, work, len(gens) - 1)
        now = time.monotonic()
        for req in plan.started:
            req.on_shards = True
            if req.prefilled_at is None:
                req.prefilled_at = now
                self.metrics.queue_time.observe(now - req.created)
                self.metrics.prompt_tokens.inc(req.prompt_len)
        for req, work in plan.work.values():
            if work.token_ids and req.id in self.running:
                try:
                    self.scheduler.cache_computed(req)
                except Exception as exc:  # noqa: BLE001 - contained to this request
                    self._internal(req, exc, "caching a step's blocks")

    @staticmethod
    def _split(plan: Plan, reply: shard_pb2.StepResponse) -> list[tuple[RouterRequest, list[shard_pb2.Generation]]]:
        """Each sampled request's generations: one, or for a speculative work 1 + accepted in a row."""
        gens, out, at = reply.generations, [], 0
        for req, work in plan.work.values():
            if not work.sample:
                continue
            n = 1
            while n <= len(work.draft_token_ids) and at + n < len(gens) and gens[at + n].request_id == work.id:
                n += 1
            out.append((req, list(gens[at:at + n])))
            at += n
        if at != len(gens) or any(g.request_id != req.id for req, got in out for g in got):
            raise ShardGroupError("Step", 0, grpc.StatusCode.INTERNAL, f"the shards returned {len(gens)} "
                                  f"tokens that do not match the step's {len(out)} sampled sequences")
        return out

    def _verified(self, req: RouterRequest, work: shard_pb2.Work, accepted: int) -> None:
        proposed, m = len(work.draft_token_ids), self.metrics
        if self.running.get(req.id) is req:
            req.fed -= proposed - accepted  # rejected: their slots are rewritten by the next tokens
        self.scheduler.speculator.verified(req, proposed, accepted)
        m.spec_proposed.inc(proposed)
        m.spec_accepted.inc(accepted)
        for position in range(1, proposed + 1):
            m.spec_proposed_by_position.labels(str(position)).inc()
            if position <= accepted:
                m.spec_by_position.labels(str(position)).inc()

    def _absorb(self, plan: Plan, reply: shard_pb2.StepResponse) -> None:
        """Hands each sampled token to its request (detokenize, stop strings, finish, stream); a
        request that finishes inside a run of accepted proposals drops the rest of it."""
        for req, gens in plan.tokens:
            if req.cancelled or req.done:
                continue  # ended in the previous step: this is the overlap's extra token
            try:
                for gen in gens:
                    self._observe_token(req, req.on_token(gen, self.eos_ids))
                    if req.done:
                        break  # the rest of an accepted run is dropped, never streamed
                if req.done:
                    self.queue.remove(req)  # preempted while its last token was in flight
                    self.scheduler.release(req)
                    self.admitted.discard(req)
            except Exception as exc:  # noqa: BLE001 - contained to this request
                self._internal(req, exc, "handling its token")

    def _internal(self, req: RouterRequest, exc: Exception, doing: str) -> None:
        """A router bug concerning one request: that request fails, the server goes on."""
        log.error("request failed inside the router", request_id=req.request_id, doing=doing,
                  error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        if not req.done:
            self.fail(req, grpc.StatusCode.INTERNAL, f"internal error while {doing}: {type(exc).__name__}",
                      cache=False)
        else:
            self.scheduler.release(req, cache=False)
            self.queue.remove(req)
            self.admitted.discard(req)

    def _concerned(self, plan: Plan | None) -> list[RouterRequest]:
        """Whom an unattributed router exception fails: the step's requests, or, when no step was
        planned yet, the running requests and the queue's head (the admission planning tried
        first), so that a bug that repeats fails a request each turn instead of spinning."""
        if plan is not None:
            return plan.members
        head = self.queue.peek()
        return [*self.running.values(), *([head] if head is not None else [])]

    async def _contain(self, group: ShardGroup, members: list[RouterRequest], inflight, exc: Exception) -> ShardGroup:
        """A router exception that concerns no single request: those it concerns fail, the
        shards forget every sequence and the others resume from prompt + streamed tokens."""
        log.error("router step failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc,
                  requests=[r.request_id for r in members])
        if inflight is not None:
            try:
                await inflight[1]  # let the ranks finish it; its tokens are recomputed
            except ShardGroupError:
                pass
        for req in members:
            if not req.done:
                self.fail(req, grpc.StatusCode.INTERNAL, f"internal error in the router: {type(exc).__name__}",
                          cache=False)
        return await self._resync(group)

    async def _resync(self, group: ShardGroup) -> ShardGroup:
        for req in self.scheduler.forget_all():
            if not req.cancelled and not req.done and req not in self.queue:
                self.queue.put(req)
        try:
            await group.clear()
        except ShardGroupError as err:
            return await self._recover(err, counted=False)
        return group

    async def _failed(self, group: ShardGroup, plan: Plan, exc: ShardGroupError) -> ShardGroup:
        """Judges a failed step; returns the group to go on with."""
        infrastructure = exc.code in INFRASTRUCTURE or group.broken.is_set()
        plan.rollback(self.running)
        if not infrastructure:
            self._strike(plan, exc)
        if exc.code == REFUSED and not group.broken.is_set():
            log.error("shards refused a step", error=str(exc), requests=[r.request_id for r in plan.members])
            if self.cache is not None:
                self.cache.drop_all()  # it may name blocks the refused step was to fill
            self._requeue_refused(plan)
            return group
        return await self._recover(exc, counted=infrastructure)

    def _strike(self, plan: Plan, exc: ShardGroupError) -> None:
        for req in plan.members:
            req.strikes += 1
            if req.strikes >= MAX_STRIKES:
                log.error("request failed repeatedly on the shards", request_id=req.request_id, error=str(exc))
                self.fail(req, grpc.StatusCode.INTERNAL,
                          f"the request failed on the shards in {req.strikes} steps; last error: {exc.details}")

    def _requeue_refused(self, plan: Plan) -> None:
        """Nothing of the refused step happened: its frees are still due and its starts never
        existed; the suspects leave the shards and queue again, to run alone."""
        self.scheduler.to_free.extend(plan.step.free)
        for req in plan.started:
            req.on_shards = False
        for req in plan.members:
            if req.id in self.running:
                self.scheduler.release(req)
                self.queue.put(req)

    async def _recover(self, exc: ShardGroupError, counted: bool) -> ShardGroup:
        """Running requests go back to the queue, to be resumed from prompt + tokens already
        streamed once the supervisor has a working group again."""
        log.error("shard group step failed", error=str(exc), running=len(self.running), counted=counted)
        self.metrics.restarts.inc()
        for req in self.scheduler.forget_all():
            if not req.cancelled and not req.done and req not in self.queue:
                self.queue.put(req)
        if self.on_group_failure is None:
            self.fail_all(grpc.StatusCode.UNAVAILABLE, f"shard group failed: {exc}")
            raise exc
        return await self.on_group_failure(exc, counted)

    def _observe_token(self, req: RouterRequest, gap: float | None) -> None:
        m = self.metrics
        m.generated_tokens.inc()
        if gap is None:
            m.ttft.observe(req.first_token_at - req.created)
        else:
            m.itl.observe(gap)
        if req.done:
            m.e2e.observe(time.monotonic() - req.created)
            m.finished.labels(req.summary()["finish_reason"]).inc()

    def _update_gauges(self) -> None:
        m, a = self.metrics, self.allocator
        m.waiting.set(len(self.queue))
        m.running.set(len(self.running))
        m.kv_blocks_used.set(a.used)
        m.kv_used.set(sum(len(r.blocks) for r in self.running.values()) * a.block_size)  # not the cache's
        m.prefix_cached_blocks.set(self.cache.cached_blocks if self.cache is not None else 0)
        s = self.scheduler
        m.prefix_query_tokens.inc(s.query_tokens)
        m.prefix_hit_tokens.inc(s.hit_tokens)
        s.query_tokens = s.hit_tokens = 0
