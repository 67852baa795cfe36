"""Continuous batching: admission, the waiting queue, and the loop that drives the shard group.

The loop prefills a batch pulled from the queue, then decodes every running request one token per
step (one call to the group per step, all requests at once). Between steps it pauses to prefill
newcomers when enough are waiting (`waiting_served_ratio`) or the oldest has waited
`max_waiting_tokens` steps; the next Decode joins the batches. Requests that finish on the router's
side (stop string, client gone, deadline) are filtered out of the shards' batch after the step, so
their KV is freed at once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable

import grpc
import structlog

from shardline.proto import shard_pb2
from shardline.router.config import RouterConfig
from shardline.router.metrics import Metrics
from shardline.router.queue import RequestQueue
from shardline.router.request import RouterRequest
from shardline.router.shards import ShardGroup, ShardGroupError

log = structlog.get_logger("shardline.router")
# Codes with which every rank refuses a prefill identically, before touching the group.
REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)


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


class Batcher:
    def __init__(self, cfg: RouterConfig, kv_budget: int, metrics: Metrics | None = None):
        self.cfg, self.kv_budget = cfg, kv_budget
        self.metrics = metrics or Metrics()
        self.metrics.kv_capacity.set(kv_budget)
        self.queue: RequestQueue[RouterRequest] = RequestQueue()
        self.running: dict[int, RouterRequest] = {}
        self.batch_ids: list[int] = []
        self.admitted: set[RouterRequest] = set()
        self.wakeup = asyncio.Event()
        self.batch_counter = itertools.count(1)
        self.steps_waited = 0
        # Called with the error when a step fails; returns once the group is usable again.
        self.on_group_failure: Callable[[ShardGroupError], Awaitable[ShardGroup]] | None = None

    # -- admission (called by the RPC handlers) --------------------------------------------------
    def submit(self, req: RouterRequest) -> None:
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

    def fail(self, req: RouterRequest, code: grpc.StatusCode, message: str) -> None:
        req.fail(code, message)
        self.metrics.errors.labels(code.name).inc()

    def fail_all(self, code: grpc.StatusCode, message: str) -> None:
        """Ends every admitted request with a status (no group to serve them)."""
        for req in list(self.admitted):
            self.fail(req, code, message)
            self.queue.remove(req)
        self.admitted.clear()
        self.running.clear()
        self.batch_ids.clear()

    @property
    def kv_in_use(self) -> int:
        return sum(r.total_tokens for r in self.running.values())

    # -- the loop --------------------------------------------------------------------------------
    async def run(self, group: ShardGroup) -> None:
        while True:
            if not self.running and not len(self.queue) and not group.broken.is_set():
                self.wakeup.clear()
                await first_of(self.wakeup.wait(), group.broken.wait())
            try:
                group.raise_if_broken("step")
                await self._prefill_if_due(group)
                if self.running:
                    start = time.monotonic()
                    self.metrics.batch_size.observe(len(self.running))
                    reply = await group.decode(self.batch_ids)
                    self.metrics.step.labels("decode").observe(time.monotonic() - start)
                    self.batch_ids = [reply.batch_id]
                    await self._absorb(group, reply.generations, reply.batch_id)
            except ShardGroupError as exc:
                group = await self._recover(exc)
            self._update_gauges()

    def _update_gauges(self) -> None:
        m = self.metrics
        m.waiting.set(len(self.queue))
        m.running.set(len(self.running))
        m.kv_used.set(self.kv_in_use)

    async def _prefill_if_due(self, group: ShardGroup) -> None:
        for req in self.queue.drop_dead():
            self._drop(req)
        waiting = len(self.queue)
        if not waiting:
            self.steps_waited = 0
            return
        if self.running:
            self.steps_waited += 1
            if self.steps_waited < self.cfg.max_waiting_tokens and \
                    waiting < self.cfg.waiting_served_ratio * len(self.running):
                return
        pulled = self.queue.next_batch(
            max_size=self.cfg.max_batch_size - len(self.running),
            prefill_token_budget=self.cfg.max_batch_prefill_tokens,
            total_token_budget=self.kv_budget - self.kv_in_use)
        for req in pulled.dead:
            self._drop(req)
        if pulled.batch:
            await self._prefill(group, pulled.batch)

    async def _prefill(self, group: ShardGroup, reqs: list[RouterRequest]) -> None:
        batch_id = next(self.batch_counter)
        start = time.monotonic()
        for req in reqs:
            self.running[req.id] = req
            if req.prefilled_at is None:
                req.prefilled_at = start
                self.metrics.queue_time.observe(start - req.created)
            self.metrics.prompt_tokens.inc(req.prompt_len)
        batch = shard_pb2.Batch(id=batch_id, requests=[r.to_shard() for r in reqs])
        try:
            reply = await group.prefill(batch, [r.request_id for r in reqs])
        except ShardGroupError as exc:
            if exc.code not in REFUSALS:
                raise
            self._refused(reqs, exc)
            return
        self.metrics.step.labels("prefill").observe(time.monotonic() - start)
        self.steps_waited = 0
        self.batch_ids.append(batch_id)
        await self._absorb(group, reply.generations, batch_id)

    async def _absorb(self, group: ShardGroup, gens, batch_id: int) -> None:
        """Hands each token to its request; filters out of the batch what ended on the router's side."""
        ended_here = []
        for gen in gens:
            req = self.running[gen.request_id]
            if not req.cancelled:
                self._observe_token(req, req.on_token(gen))
            if req.done or req.cancelled:
                self._finish(req)
                if gen.finish_reason == shard_pb2.FINISH_REASON_UNSPECIFIED:
                    ended_here.append(req.id)
        if ended_here:
            keep = [g.request_id for g in gens if g.request_id in self.running]
            await group.filter(batch_id, keep)
        if not self.running:
            self.batch_ids.clear()

    def _refused(self, reqs: list[RouterRequest], exc: ShardGroupError) -> None:
        """Every rank refused the prefill before any collective: the group is intact, only these
        requests fail (never a restart of the whole group for one bad batch)."""
        log.error("shards refused a prefill", error=str(exc), requests=[r.request_id for r in reqs])
        for req in reqs:
            self._finish(req)
            self.fail(req, exc.code, f"the shards refused the request: {exc.details}")

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

    def _finish(self, req: RouterRequest) -> None:
        self.running.pop(req.id, None)
        self.admitted.discard(req)

    def _drop(self, req: RouterRequest) -> None:
        """A queued request whose client left or whose deadline passed: never prefilled."""
        self.admitted.discard(req)
        self.fail(req, grpc.StatusCode.DEADLINE_EXCEEDED if not req.cancelled else grpc.StatusCode.CANCELLED,
                  "request expired while waiting in the queue")

    async def _recover(self, exc: ShardGroupError) -> ShardGroup:
        """After a failed step: running requests go back to the queue head to be re-prefilled from
        prompt + tokens already streamed, once the supervisor has a working group again."""
        log.error("shard group step failed", error=str(exc), running=len(self.running))
        self.metrics.restarts.inc()
        for req in self.running.values():
            if not req.cancelled:
                self.queue.put(req)
        self.running.clear()
        self.batch_ids.clear()
        if self.on_group_failure is None:
            self.fail_all(grpc.StatusCode.UNAVAILABLE, f"shard group failed: {exc}")
            raise exc
        return await self.on_group_failure(exc)
