"""The gate of the public gRPC port: one grpc.aio server interceptor in front of every service.

Every call, whatever its service, first has its metadata counted (more than
--max-metadata-entries: INVALID_ARGUMENT). grpc.health.v1 then passes, so that probes need no key.
Every other method, known or not (shardline.v1.Generation, server reflection, anything else),
needs `authorization: Bearer <key>` when --api-key-file is given: a missing or wrong key ends the
call with UNAUTHENTICATED before any handler runs. The caller's tenant is put in `auth.CALLER` for
the handler. Refusals are logged with the method and the reason, never the key.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import structlog

from shardline.router.api.auth import ANONYMOUS, CALLER, ApiKeys, Unauthenticated

log = structlog.get_logger("shardline.router")
OPEN_PREFIX = "/grpc.health.v1.Health/"


def _refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call at once; stream-stream fits every kind of call, as it reads nothing."""
    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)
    return grpc.stream_stream_rpc_method_handler(refuse)


class Gate(grpc.aio.ServerInterceptor):
    """Metadata cap for all, API keys for all but health; `on_refused(api)` counts key refusals."""

    def __init__(self, keys: ApiKeys | None, max_metadata_entries: int,
                 on_refused: Callable[[str], None] = lambda api: None) -> None:
        self.keys, self.max_entries, self.on_refused = keys, max_metadata_entries, on_refused

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
        try:
            if len(values) > 1:
                raise Unauthenticated("more than one authorization entry")
            tenant = self.keys.authenticate(values[0] if values else None)
        except Unauthenticated as exc:
            log.warning("unauthenticated call", api="grpc", method=details.method, reason=str(exc))
            self.on_refused("grpc")
            return _refusal(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        CALLER.set(tenant)
        return await continuation(details)
