"""The public gRPC API (shardline.v1.Generation) plus grpc.health.v1 and server reflection.

Handlers validate, admit and enqueue; the batcher does the rest and feeds each request's event
queue, which the handler turns into stream messages or a status. A client that goes away (or whose
deadline passes) cancels its handler, and the request leaves the batch at the next step.
"""

from __future__ import annotations

import secrets
import time
from importlib.metadata import version

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shardline.proto import serving_pb2, serving_pb2_grpc
from shardline.router.batcher import Batcher, Overloaded
from shardline.router.config import RouterConfig
from shardline.router.detokenizer import IncrementalDetokenizer
from shardline.router.request import Failure, RouterRequest
from shardline.router.validation import Limits, ValidationError, validate

log = structlog.get_logger("shardline.router")
SERVICE = "shardline.v1.Generation"
HEALTH_SERVICES = ("", SERVICE, "readiness")
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class GenerationServicer(serving_pb2_grpc.GenerationServicer):
    def __init__(self, cfg: RouterConfig, tokenizer, vocab_size: int):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.limits = Limits(max_input_tokens=cfg.max_input_tokens, max_total_tokens=cfg.max_total_tokens,
                             vocab_size=vocab_size, max_stop_sequences=cfg.max_stop_sequences,
                             default_max_new_tokens=cfg.default_max_new_tokens)
        self.batcher: Batcher | None = None
        self.accepting = True
        self.info: serving_pb2.InfoResponse | None = None
        self.ids = iter(range(1, 2**63))
        self.unavailable_reason = "the shards are still loading"

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    async def _admit(self, request: serving_pb2.GenerateRequest, context) -> tuple[RouterRequest, Batcher]:
        try:
            valid = validate(request, self.limits, self.tokenize)
        except ValidationError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        batcher = self.batcher
        if batcher is None or not self.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.unavailable_reason)
        remaining = context.time_remaining()
        req = RouterRequest(
            priority=valid.priority, prompt_len=valid.prompt_len, max_new_tokens=valid.max_new_tokens,
            id=next(self.ids), request_id=secrets.token_hex(8), valid=valid,
            seed=valid.seed if valid.seed is not None else secrets.randbits(63),
            detokenizer=IncrementalDetokenizer(self.tokenizer, valid.stop),
            deadline=time.monotonic() + remaining if remaining is not None else None)
        try:
            batcher.submit(req)
        except Overloaded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        return req, batcher

    async def _events(self, req: RouterRequest, batcher: Batcher, context):
        """Yields the request's stream messages; aborts the RPC on a failure event."""
        try:
            while True:
                event = await req.events.get()
                if isinstance(event, Failure):
                    await context.abort(event.code, event.message)
                yield event
                if event.finish_reason:
                    return
        finally:
            if not req.done:
                batcher.cancel(req)
            log.info("request", **req.summary())

    async def GenerateStream(self, request, context):
        req, batcher = await self._admit(request, context)
        async for message in self._events(req, batcher, context):
            yield message

    async def Generate(self, request, context):
        req, batcher = await self._admit(request, context)
        async for _ in self._events(req, batcher, context):
            pass
        return req.response()

    async def Tokenize(self, request, context):
        ids = self.tokenize(request.text)
        return serving_pb2.TokenizeResponse(ids=ids, tokens=self.tokenizer.convert_ids_to_tokens(ids))

    async def Info(self, request, context):
        if self.info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.unavailable_reason)
        return self.info


class RouterServer:
    """The router's grpc.aio server: Generation, health (NOT_SERVING until ready), reflection."""

    def __init__(self, cfg: RouterConfig, servicer: GenerationServicer):
        self.cfg, self.servicer = cfg, servicer
        self.server = grpc.aio.server()
        serving_pb2_grpc.add_GenerationServicer_to_server(servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (serving_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self.port = 0

    async def start(self) -> int:
        """Listens (health NOT_SERVING, liveness SERVING) and returns the bound port."""
        for name in HEALTH_SERVICES:  # the aio servicer starts SERVING: say otherwise first
            await self.health.set(name, NOT_SERVING)
        await self.health.set("liveness", SERVING)
        self.port = self.server.add_insecure_port(f"{self.cfg.host}:{self.cfg.port}")
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {self.cfg.host}:{self.cfg.port}")
        await self.server.start()
        return self.port

    async def set_ready(self, ready: bool) -> None:
        for name in HEALTH_SERVICES:
            await self.health.set(name, SERVING if ready else NOT_SERVING)

    async def stop(self, grace: float) -> None:
        await self.set_ready(False)
        await self.server.stop(grace)


def shardline_version() -> str:
    return version("shardline")
