"""The public gRPC API (shardline.v1.Generation) plus grpc.health.v1 and server reflection.

Handlers go through the front door shared with the HTTP API (router/api/admission.py: validate,
admit, events) and turn its refusals into gRPC statuses; the batcher does the rest. A client that
goes away (or whose deadline passes) cancels its handler, and the request leaves the batch at the
next step. Tokenize has the bounds of a text prompt and runs off the event loop too.

`RouterServer` owns the public ports: gRPC (its own port, no SO_REUSEPORT, message size limits
from the request bounds or --max-message-bytes) and, with --http-port, the OpenAI-compatible HTTP
API on the same loop, and the metrics endpoint. With --tls-cert-file all of them speak only TLS
(`reload_tls` on SIGHUP); with --api-key-file each has one gate that checks the key (gRPC:
router/api/grpc_gate.py, HTTP: router/api/openai/gate.py, metrics: router/api/metrics_server.py).
"""

from __future__ import annotations

import contextlib
import errno
from importlib.metadata import version

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shardline.proto import serving_pb2, serving_pb2_grpc
from shardline.router.api.admission import FrontDoor, Refused
from shardline.router.api.auth import CALLER, load_keys
from shardline.router.config import RouterConfig
from shardline.router.api.grpc_gate import Gate
from shardline.router.api.metrics_server import serve_metrics
from shardline.router.api.validation import (
    BYTES_PER_TOKEN,
    Limits,
    ValidationError,
    check_text_bytes,
    check_token_count,
)
from shardline.common.ports import check_free
from shardline.common.tls import ServerTls, TlsError

log = structlog.get_logger("shardline.router")
SERVICE = "shardline.v1.Generation"
HEALTH_SERVICES = ("", SERVICE, "readiness")
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class GenerationServicer(FrontDoor, serving_pb2_grpc.GenerationServicer):
    """shardline.v1.Generation: the front door's requests as RPCs, refusals as gRPC statuses."""

    async def _admit(self, request: serving_pb2.GenerateRequest, context):
        try:
            valid = await self.check(request)
            return self.admit(valid, deadline=self.deadline_in(context.time_remaining()), tenant=CALLER.get())
        except Refused as refused:
            await context.abort(refused.code, refused.message)

    async def _events(self, req, batcher, context):
        try:
            async with contextlib.aclosing(self.events(req, batcher)) as events:  # cancels at once when left
                async for message in events:
                    yield message
        except Refused as refused:
            await context.abort(refused.code, refused.message)

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


def server_options(limits: Limits, size: int = 0) -> list[tuple[str, int]]:
    """grpc.aio server options: a port of its own, and explicit message size limits (`size`, or
    else `message_limit(limits)`)."""
    size = size or message_limit(limits)
    return [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size)]


class RouterServer:
    """The router's public servers: gRPC (Generation, health NOT_SERVING until ready, reflection)
    and, when --http-port is not 0, the OpenAI-compatible HTTP API; `http_port` is its bound port."""

    def __init__(self, cfg: RouterConfig, servicer: GenerationServicer):
        self.cfg, self.servicer = cfg, servicer
        sec = cfg.security
        self.keys = load_keys(sec.api_key_file)
        self.tls = ServerTls(sec.tls) if sec.tls.enabled else None
        self.message_bytes = sec.max_message_bytes or message_limit(servicer.limits)
        self.count_refusal = lambda api: servicer.tenant_metrics.unauthenticated.labels(api).inc()
        gate = Gate(self.keys, sec.max_metadata_entries, self.count_refusal)
        self.server = grpc.aio.server(options=server_options(servicer.limits, self.message_bytes),
                                      interceptors=[gate])
        serving_pb2_grpc.add_GenerationServicer_to_server(servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (serving_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self.port = self.http_port = 0
        self.ready = False
        self.http = None
        self.metrics_server = None

    async def start(self) -> int:
        """Listens (health NOT_SERVING, liveness SERVING) and returns the bound port."""
        for name in HEALTH_SERVICES:  # the aio servicer starts SERVING: say otherwise first
            await self.health.set(name, NOT_SERVING)
        await self.health.set("liveness", SERVING)
        self.port = self._bind(self.cfg.host, self.cfg.port)
        await self.server.start()
        if self.cfg.http_port:
            try:
                self.http_port = await self._start_http()
            except BaseException:
                await self.server.stop(0)
                raise
        return self.port

    async def _start_http(self) -> int:
        from shardline.router.api.openai.app import create_app  # FastAPI loads only when HTTP is on
        from shardline.router.api.openai.gate import HttpGate
        from shardline.router.api.openai.server import HttpServer

        sec = self.cfg.security
        app = create_app(self.servicer, lambda: self.ready)
        self.http = HttpServer(app, self.cfg.host, self.cfg.http_port, sec.max_http_body_bytes or self.message_bytes,
                               ssl_context=self.tls.ssl_context() if self.tls else None,
                               gate=lambda inner: HttpGate(inner, self.keys, sec.max_metadata_entries, self.count_refusal))
        port = await self.http.start()
        log.info("http listening", host=self.cfg.host, port=port, model=self.cfg.model_name, tls=self.tls is not None,
                 api_keys=self.keys is not None)
        return port

    def serve_metrics(self, registry, port: int) -> int:
        """Serves /metrics on --metrics-port behind the same keys and TLS; returns the bound port."""
        try:
            self.metrics_server = serve_metrics(registry, self.cfg.host, port, self.keys,
                                                self.tls.ssl_context() if self.tls else None)
        except OSError as exc:
            taken = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise RuntimeError(f"port {port} (--metrics-port) {taken} on {self.cfg.host}; choose another "
                               f"--metrics-port, or 0 to turn metrics off") from None
        return self.metrics_server.server_port

    def reload_tls(self) -> None:
        """SIGHUP: the certificate files again, for connections made from now on; a pair that does
        not load is logged and the old one kept."""
        if self.tls is None:
            return
        try:
            self.tls.reload()
        except TlsError as exc:
            log.error("TLS reload failed; keeping the old certificate", error=str(exc))
            return
        log.info("TLS certificates reloaded", cert_file=str(self.cfg.security.tls.cert_file))

    def _bind(self, host: str, port: int) -> int:
        """Adds the listening port; raises RuntimeError with one line naming the port and the flag."""
        check_free(host, port, "--port")  # checked first: grpc would also log its own error lines
        try:
            if self.tls is not None:
                bound = self.server.add_secure_port(f"{host}:{port}", self.tls.grpc_credentials())
            else:
                bound = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:
            bound = 0
        if bound == 0:
            check_free(host, port, "--port")  # taken in the meantime: say so
            raise RuntimeError(f"cannot listen on {host}:{port} (--host, --port)")
        return bound

    async def set_ready(self, ready: bool) -> None:
        self.ready = ready
        for name in HEALTH_SERVICES:
            await self.health.set(name, SERVING if ready else NOT_SERVING)

    async def stop(self, grace: float) -> None:
        await self.set_ready(False)
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        self.servicer.prompts.close()


def shardline_version() -> str:
    return version("shardline")
