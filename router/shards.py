"""Fan-out client to a shard group: the same call to every rank at once, with a deadline.

Every rank answers with identical generations (the sampling rank broadcast them), so the first
rank's answer is returned. Any rank failing, or the deadline passing, fails the whole call with a
`ShardGroupError` naming the rank: a group that lost one rank cannot go on, and the supervisor
decides what to do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardline.proto import shard_pb2, shard_pb2_grpc

MESSAGE_LIMIT = 256 * 1024 * 1024
OPTIONS = [("grpc.max_send_message_length", MESSAGE_LIMIT),
           ("grpc.max_receive_message_length", MESSAGE_LIMIT)]


class ShardGroupError(RuntimeError):
    """A call failed on some rank (or timed out); the group's state is unknown."""

    def __init__(self, method: str, rank: int, code: grpc.StatusCode, details: str):
        super().__init__(f"{method} failed on rank {rank}: {code.name}: {details}")
        self.method, self.rank, self.code, self.details = method, rank, code, details

    @property
    def timed_out(self) -> bool:
        return self.code == grpc.StatusCode.DEADLINE_EXCEEDED


class ShardGroup:
    """Connections to the ranks of one shard group (one aio channel per rank)."""

    def __init__(self, addresses: Sequence[str], step_timeout: float = 60.0):
        self.addresses = list(addresses)
        self.step_timeout = step_timeout
        self.broken = asyncio.Event()  # set by the supervisor when a rank died or stopped answering
        self.broken_reason = ""
        self.channels = [grpc.aio.insecure_channel(a, options=OPTIONS) for a in self.addresses]
        self.stubs = [shard_pb2_grpc.ShardStub(c) for c in self.channels]
        self.health = [health_pb2_grpc.HealthStub(c) for c in self.channels]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))

    def mark_broken(self, reason: str) -> None:
        """Fails the call in flight (and every later one) at once: a rank is gone."""
        self.broken_reason = reason
        self.broken.set()

    def raise_if_broken(self, method: str) -> None:
        if self.broken.is_set():
            raise ShardGroupError(method, -1, grpc.StatusCode.UNAVAILABLE, self.broken_reason)

    async def _all(self, method: str, request, timeout: float | None = None,
                   request_ids: Sequence[str] = ()) -> list:
        """Calls every rank; fails as soon as one rank fails (survivors may be stuck in a collective
        waiting for it) or the group is marked broken."""
        self.raise_if_broken(method)
        timeout = timeout or self.step_timeout
        metadata = (("x-shardline-request-ids", ",".join(request_ids)),) if request_ids else None
        calls = [asyncio.ensure_future(getattr(stub, method)(request, timeout=timeout, metadata=metadata))
                 for stub in self.stubs]
        broken = asyncio.ensure_future(self.broken.wait())
        try:
            pending = set(calls)
            while pending:
                done, pending = await asyncio.wait(pending | {broken}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(broken)
                self.raise_if_broken(method)
                for call in done:
                    if call.exception() is not None:
                        exc = call.exception()
                        code, details = (exc.code(), exc.details() or "") if isinstance(exc, grpc.aio.AioRpcError) \
                            else (grpc.StatusCode.UNKNOWN, str(exc))
                        raise ShardGroupError(method, calls.index(call), code, details)
            return [c.result() for c in calls]
        finally:
            for c in (*calls, broken):
                c.cancel()

    async def serving(self, timeout: float = 2.0) -> bool:
        """True when every rank's health is SERVING."""
        async def one(stub) -> bool:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            except grpc.aio.AioRpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        return all(await asyncio.gather(*(one(s) for s in self.health)))

    async def wait_serving(self, timeout: float, poll: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while not await self.serving():
            if time.monotonic() > deadline:
                raise TimeoutError(f"shards at {self.addresses} not serving after {timeout:.0f}s")
            await asyncio.sleep(poll)

    async def info(self) -> list[shard_pb2.InfoResponse]:
        return await self._all("Info", shard_pb2.InfoRequest())

    async def warmup(self, max_prefill_tokens: int, max_total_tokens: int = 0,
                     timeout: float | None = None) -> int:
        """Warms every rank; returns the smallest KV capacity in tokens."""
        replies = await self._all("Warmup", shard_pb2.WarmupRequest(
            max_prefill_tokens=max_prefill_tokens, max_total_tokens=max_total_tokens), timeout)
        return min(r.kv_capacity_tokens for r in replies)

    async def prefill(self, batch: shard_pb2.Batch, request_ids: Sequence[str] = ()) -> shard_pb2.PrefillResponse:
        """Prefills a batch; the public request ids travel in metadata for the shards' logs."""
        return (await self._all("Prefill", shard_pb2.PrefillRequest(batch=batch), request_ids=request_ids))[0]

    async def decode(self, batch_ids: Sequence[int]) -> shard_pb2.DecodeResponse:
        return (await self._all("Decode", shard_pb2.DecodeRequest(batch_ids=list(batch_ids))))[0]

    async def filter(self, batch_id: int, request_ids: Sequence[int]) -> int:
        replies = await self._all("FilterBatch", shard_pb2.FilterBatchRequest(
            batch_id=batch_id, request_ids=list(request_ids)))
        return replies[0].size

    async def clear(self, batch_id: int | None = None) -> None:
        request = shard_pb2.ClearCacheRequest() if batch_id is None else shard_pb2.ClearCacheRequest(batch_id=batch_id)
        await self._all("ClearCache", request)
