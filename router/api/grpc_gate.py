"""The gate of the public gRPC port: one grpc.aio server interceptor in front of every service.

Every call, whatever its service, first has its metadata counted (more than
--max-metadata-entries: INVALID_ARGUMENT). grpc.health.v1 then passes, so that probes need no key.
Every other method, known or not (shardline.v1.Generation, server reflection, anything else),
needs `authorization: Bearer <key>` when --api-key-file is given: a missing or wrong key ends the
call with UNAUTHENTICATED before any handler runs. The caller's tenant is put in `auth.CALLER` for
the handler. The key is checked in the call's own task, where the peer's address is known: a
peer with too many recent failures (router/api/key_attempts.py) gets RESOURCE_EXHAUSTED first, with
a `retry-after` trailer. Refusals are logged with the method, the peer and the reason, never the key.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import grpc
import structlog

from shardline.router.api.auth import ANONYMOUS, CALLER, ApiKeys, Unauthenticated
from shardline.router.api.key_attempts import FailedAttempts, peer_of

log = structlog.get_logger("shardline.router")
OPEN_PREFIX = "/grpc.health.v1.Health/"


def _refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call at once; stream-stream fits every kind of call, as it reads nothing."""
    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)
    return grpc.stream_stream_rpc_method_handler(refuse)


def _guarded(handler: grpc.RpcMethodHandler | None,
             check: Callable[[grpc.aio.ServicerContext], Awaitable[None]]) -> grpc.RpcMethodHandler:
    """`handler` (None: an unknown method) behind `check`, which runs first in the call's own task
    (so that the tenant it sets is the handler's) and ends the call when it refuses."""
    if handler is None:
        async def unknown(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
            await check(context)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        return grpc.stream_stream_rpc_method_handler(unknown)
    codec = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if not handler.response_streaming:
        inner = handler.stream_unary if handler.request_streaming else handler.unary_unary

        async def unary(request, context: grpc.aio.ServicerContext):
            await check(context)
            result = inner(request, context)
            return await result if inspect.isawaitable(result) else result
        make = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
        return make(unary, **codec)
    inner = handler.stream_stream if handler.request_streaming else handler.unary_stream

    async def streaming(request, context: grpc.aio.ServicerContext):
        await check(context)
        result = inner(request, context)
        if inspect.isasyncgen(result):
            async for message in result:
                yield message
        elif inspect.isawaitable(result):  # a handler that writes with context.write
            await result
    make = grpc.stream_stream_rpc_method_handler if handler.request_streaming else grpc.unary_stream_rpc_method_handler
    return make(streaming, **codec)


class Gate(grpc.aio.ServerInterceptor):
    """Metadata cap for all, API keys for all but health; `on_refused(api)` counts key refusals;
    `attempts` slows peers that keep sending wrong keys (RESOURCE_EXHAUSTED)."""

    def __init__(self, keys: ApiKeys | None, max_metadata_entries: int,
                 on_refused: Callable[[str], None] = lambda api: None, attempts: FailedAttempts | None = None) -> None:
        self.keys, self.max_entries, self.on_refused = keys, max_metadata_entries, on_refused
        self.attempts = attempts or FailedAttempts()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = tuple(details.invocation_metadata or ())
        if len(metadata) > self.max_entries:
            return _refusal(grpc.StatusCode.INVALID_ARGUMENT, f"the call has {len(metadata)} metadata entries, "
                                                              f"more than --max-metadata-entries={self.max_entries}")
        if details.method.startswith(OPEN_PREFIX) or self.keys is None:
            CALLER.set(ANONYMOUS)
            return await continuation(details)
        values = [v for k, v in metadata if k == "authorization"]
        method = details.method

        async def check(context: grpc.aio.ServicerContext) -> None:
            peer = peer_of(context.peer())
            wait = self.attempts.retry_after(peer)
            if wait:
                context.set_trailing_metadata((("retry-after", str(wait)),))
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.attempts.message(wait))
            try:
                if len(values) > 1:
                    raise Unauthenticated("more than one authorization entry")
                tenant = self.keys.authenticate(values[0] if values else None)
            except Unauthenticated as exc:
                self.attempts.failed(peer)
                log.warning("unauthenticated call", api="grpc", method=method, peer=peer, reason=str(exc))
                self.on_refused("grpc")
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            CALLER.set(tenant)
        return _guarded(await continuation(details), check)
