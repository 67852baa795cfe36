"""The public gRPC API (shardline.v1.Generation) plus grpc.health.v1 and server reflection.

Handlers validate, admit and enqueue; the batcher does the rest and feeds each request's event
queue, which the handler turns into stream messages or a status. A client that goes away (or whose
deadline passes) cancels its handler, and the request leaves the batch at the next step.

Text is bounded in bytes, then tokenized off the event loop (router/tokenization.py), for Generate
and Tokenize alike. The server owns its port alone (no SO_REUSEPORT) and sets gRPC's message size
limits from the request bounds.
"""

from __future__ import annotations

import errno
import secrets
import socket
import time
from importlib.metadata import version

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shardline.proto import serving_pb2, serving_pb2_grpc
from shardline.router.batcher import Batcher, NeverFits, Overloaded
from shardline.router.config import RouterConfig
from shardline.router.detokenizer import IncrementalDetokenizer
from shardline.router.request import Failure, RouterRequest
from shardline.router.tokenization import PromptTokenizer
from shardline.router.validation import (
    BYTES_PER_TOKEN,
    Limits,
    ValidationError,
    ValidRequest,
    check_text_bytes,
    check_token_count,
    prompt_text,
    validate,
)

log = structlog.get_logger("shardline.router")
SERVICE = "shardline.v1.Generation"
HEALTH_SERVICES = ("", SERVICE, "readiness")
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class GenerationServicer(serving_pb2_grpc.GenerationServicer):
    def __init__(self, cfg: RouterConfig, tokenizer, vocab_size: int):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.prompts = PromptTokenizer(tokenizer)
        self.limits = Limits(max_input_tokens=cfg.max_input_tokens, max_total_tokens=cfg.max_total_tokens,
                             vocab_size=vocab_size, max_stop_sequences=cfg.max_stop_sequences,
                             default_max_new_tokens=cfg.default_max_new_tokens,
                             max_request_bytes=cfg.max_request_bytes)
        self.batcher: Batcher | None = None
        self.accepting = True
        self.info: serving_pb2.InfoResponse | None = None
        self.ids = iter(range(1, 2**63))
        self.unavailable_reason = "the shards are still loading"

    async def validate(self, request: serving_pb2.GenerateRequest) -> ValidRequest:
        """The validated request; a text prompt is bounded in bytes, then tokenized off the loop."""
        text = prompt_text(request, self.limits)
        ids = None if text is None else await self.prompts.encode_async(text)
        return validate(request, self.limits, ids)

    async def _admit(self, request: serving_pb2.GenerateRequest, context) -> tuple[RouterRequest, Batcher]:
        try:
            valid = await self.validate(request)
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
        except NeverFits as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
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
        """The ids Generate would use for this text, under the same bounds."""
        try:
            check_text_bytes("text", request.text, self.limits)
            ids = await self.prompts.encode_async(request.text)
            check_token_count("text", len(ids), self.limits)
        except ValidationError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return serving_pb2.TokenizeResponse(ids=ids, tokens=self.prompts.tokens(ids))

    async def Info(self, request, context):
        if self.info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.unavailable_reason)
        return self.info


def message_limit(limits: Limits) -> int:
    """Bytes gRPC takes in one message, either way: twice what the largest valid request (its text
    or ids) or answer (ids, logprobs and text of max_total_tokens) needs, and at least 16 MiB, so
    that validation, not gRPC, answers a multi-megabyte prompt with a message naming the limit."""
    text = limits.max_request_bytes or BYTES_PER_TOKEN * limits.max_input_tokens
    need = max(text + 5 * limits.max_input_tokens, (5 + 5 + BYTES_PER_TOKEN) * limits.max_total_tokens)
    return max(16 << 20, 2 * need)


def server_options(limits: Limits) -> list[tuple[str, int]]:
    """grpc.aio server options: a port of its own, and explicit message size limits."""
    size = message_limit(limits)
    return [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size)]


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on host:port (binding as grpc does, SO_REUSEADDR only)."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


class RouterServer:
    """The router's grpc.aio server: Generation, health (NOT_SERVING until ready), reflection."""

    def __init__(self, cfg: RouterConfig, servicer: GenerationServicer):
        self.cfg, self.servicer = cfg, servicer
        self.server = grpc.aio.server(options=server_options(servicer.limits))
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
        self.port = self._bind(self.cfg.host, self.cfg.port)
        await self.server.start()
        return self.port

    def _bind(self, host: str, port: int) -> int:
        """Adds the listening port; raises RuntimeError with one line naming the port and the flag."""
        in_use = (f"port {port} (--port) is already in use on {host}: another server listens there; "
                  f"stop it or choose another --port")
        if port and port_in_use(host, port):  # checked first: grpc would also log its own error lines
            raise RuntimeError(in_use)
        try:
            bound = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise RuntimeError(in_use if port and port_in_use(host, port) else
                               f"cannot listen on {host}:{port} (--host, --port)")
        return bound

    async def set_ready(self, ready: bool) -> None:
        for name in HEALTH_SERVICES:
            await self.health.set(name, SERVING if ready else NOT_SERVING)

    async def stop(self, grace: float) -> None:
        await self.set_ready(False)
        await self.server.stop(grace)
        self.servicer.prompts.close()


def shardline_version() -> str:
    return version("shardline")
