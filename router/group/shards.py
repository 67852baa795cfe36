"""Fan-out client to a shard group: the same call to every rank at once, with a deadline.

Every rank answers with identical generations (the sampling rank broadcast them), so the first
rank's answer is returned. Any rank failing, or the deadline passing, fails the whole call with a
`ShardGroupError` naming the rank: a group that lost one rank cannot go on, and the supervisor
decides what to do.

Channels are plaintext for `launch`'s private unix sockets, and TLS with `tls` (--shard-tls-*:
the shards' CA, and the router's own certificate when the shards require one).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardline.proto import shard_pb2, shard_pb2_grpc
from shardline.common.tls import ClientTlsFiles

MESSAGE_LIMIT = 256 * 1024 * 1024
OPTIONS = [("grpc.max_send_message_length", MESSAGE_LIMIT),
           ("grpc.max_receive_message_length", MESSAGE_LIMIT)]


def channel(address: str, tls: ClientTlsFiles) -> grpc.aio.Channel:
    """An aio channel to one rank: TLS when `tls` is enabled."""
    if tls.enabled:
        return grpc.aio.secure_channel(address, tls.credentials(), options=OPTIONS + tls.options())
    return grpc.aio.insecure_channel(address, options=OPTIONS)


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

    def __init__(self, addresses: Sequence[str], step_timeout: float = 60.0, tls: ClientTlsFiles = ClientTlsFiles()):
        self.addresses = list(addresses)
        self.step_timeout = step_timeout
        self.broken = asyncio.Event()  # set by the supervisor when a rank died or stopped answering
        self.broken_reason = ""
        self.constraints = False  # whether a rank can apply structured-output grammars (from Warmup)
        self.channels = [channel(a, tls) for a in self.addresses]
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

    async def warmup(self, max_step_tokens: int, max_batch_size: int, max_kv_tokens: int = 0,
                     timeout: float | None = None, max_context_tokens: int = 0) -> tuple[int, int]:
        """Warms every rank up; returns (KV blocks every rank holds, tokens per block)."""
        replies = await self._all("Warmup", shard_pb2.WarmupRequest(
            max_step_tokens=max_step_tokens, max_batch_size=max_batch_size, max_kv_tokens=max_kv_tokens,
            max_context_tokens=max_context_tokens), timeout)
        self.constraints = any(r.constraints for r in replies)  # the sampling rank loaded llguidance
        sizes = {r.kv_block_size for r in replies}
        if len(sizes) != 1:
            raise ShardGroupError("Warmup", 0, grpc.StatusCode.FAILED_PRECONDITION,
                                  f"ranks disagree on --kv-block-size: {sorted(sizes)}")
        return min(r.kv_blocks for r in replies), sizes.pop()

    async def step(self, request: shard_pb2.StepRequest, request_ids: Sequence[str] = ()) -> shard_pb2.StepResponse:
        """Runs one step on every rank; the public ids of starting requests travel in metadata."""
        return (await self._all("Step", request, request_ids=request_ids))[0]

    async def clear(self) -> None:
        """Every rank forgets every sequence (before resuming requests on a group that survived)."""
        await self._all("Reset", shard_pb2.ResetRequest())
