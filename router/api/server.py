"""The public gRPC API (shardline.v1.Generation) plus grpc.health.v1 and server reflection.

Handlers go through the front door shared with the HTTP API (router/api/admission.py: validate,
admit, events) and turn its refusals into gRPC statuses; the batcher does the rest. A client that
goes away (or whose deadline passes) cancels its handler, and the request leaves the batch at the
next step. Tokenize has the bounds of a text prompt and runs off the event loop too.

`RouterServer` owns the public ports: gRPC (its own port, no SO_REUSEPORT, message size limits
from the request bounds or --max-message-bytes) and, with --http-port, the OpenAI-compatible HTTP
API on the same loop, and the metrics endpoint (a second uvicorn server on the same loop). With
--tls-cert-file all of them speak only TLS (`reload_tls` on SIGHUP replaces the certificates and
client CAs of all three for new connections); with --api-key-file each has one gate that checks
the key (gRPC: router/api/grpc_gate.py, HTTP and metrics: router/api/openai/gate.py), sharing one
count of failed attempts per client address. Connections are bounded on every port: gRPC caps
streams per connection, enforces keepalive (clients pinging too often are sent away), closes
connections idle for 5 minutes and handshakes that take over 10 s; health Watch streams are at
most 64; HTTP and metrics take --max-http-connections each with --http-idle-timeout.
`describe_ports` is the one startup line that names every public port, its TLS and its keys.
"""

from __future__ import annotations

import contextlib
from importlib.metadata import version

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shardline.proto import serving_pb2, serving_pb2_grpc
from shardline.router.api.admission import FrontDoor, Refused
from shardline.router.api.auth import CALLER, load_keys
from shardline.router.config import RouterConfig
from shardline.router.api.grpc_gate import Gate
from shardline.router.api.key_attempts import FailedAttempts
from shardline.router.api.metrics_server import metrics_server
from shardline.router.api.validation import (
    BYTES_PER_TOKEN,
    Limits,
    ValidationError,
    check_text_bytes,
    check_token_count,
)
from shardline.common.health import BoundedHealth
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


# Connection bounds of the public gRPC port (see the module docstring).
MAX_STREAMS_PER_CONNECTION = 256
CONNECTION_OPTIONS = [
    ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
    ("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000),  # dead peers found
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000), ("grpc.http2.max_ping_strikes", 2),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.max_connection_idle_ms", 300_000), ("grpc.server_handshake_timeout_ms", 10_000),
]


def server_options(limits: Limits, size: int = 0) -> list[tuple[str, int]]:
    """grpc.aio server options: a port of its own, explicit message size limits (`size`, or else
    `message_limit(limits)`), bounded streams and enforced keepalive."""
    size = size or message_limit(limits)
    return [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size), *CONNECTION_OPTIONS]


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
        self.attempts = FailedAttempts(sec.max_failed_key_attempts, sec.failed_key_window)
        gate = Gate(self.keys, sec.max_metadata_entries, self.count_refusal, self.attempts)
        self.server = grpc.aio.server(options=server_options(servicer.limits, self.message_bytes),
                                      interceptors=[gate])
        serving_pb2_grpc.add_GenerationServicer_to_server(servicer, self.server)
        self.health = BoundedHealth()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (serving_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self.port = self.http_port = self.metrics_port = 0
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
                               tls=self.tls.context if self.tls else None,
                               gate=lambda inner: HttpGate(inner, self.keys, sec.max_metadata_entries, self.count_refusal,
                                                           self.attempts),
                               max_connections=sec.max_http_connections, idle_timeout=sec.http_idle_timeout)
        port = await self.http.start()
        log.info("http listening", host=self.cfg.host, port=port, model=self.cfg.model_name, tls=self.tls is not None,
                 api_keys=self.keys is not None)
        return port

    async def serve_metrics(self, registry, port: int) -> int:
        """Serves /metrics on --metrics-port behind the same keys and TLS; returns the bound port
        (RuntimeError with one line naming --metrics-port when it is taken)."""
        sec = self.cfg.security
        server = metrics_server(registry, self.cfg.host, port, self.keys, self.tls.context if self.tls else None,
                                max_headers=sec.max_metadata_entries, attempts=self.attempts,
                                on_refused=self.count_refusal, max_connections=sec.max_http_connections,
                                idle_timeout=sec.http_idle_timeout)
        self.metrics_port = await server.start()
        self.metrics_server = server
        return self.metrics_port

    def describe_ports(self) -> str:
        """One line naming every public port, whether it speaks TLS (mutual or not) and needs keys."""
        tls = "no TLS" if self.tls is None else ("mutual TLS" if self.tls.mutual else "TLS")
        keys = "API keys" if self.keys is not None else "NO API keys"
        host = self.cfg.host or "0.0.0.0"
        ports = [("gRPC", self.port), ("HTTP", self.http_port), ("metrics", self.metrics_port)]
        named = ", ".join(f"{name} {host}:{port} ({tls}, {keys})" for name, port in ports if port)
        line = f"public ports: {named}; health (gRPC grpc.health.v1, GET /health) needs no key"
        if self.tls is None or self.keys is None:
            line += (f"; WARNING: {'plaintext' if self.tls is None else 'TLS'} "
                     f"{'without' if self.keys is None else 'with'} API keys: anyone who reaches {host} can "
                     f"{'read and ' if self.tls is None else ''}use them (--tls-cert-file, --api-key-file)")
        return line

    def reload_tls(self) -> None:
        """SIGHUP: new certificates and client CAs for connections made from now on, on every
        port; files that do not load are logged and the old ones kept."""
        if self.tls is None:
            return
        try:
            self.tls.reload()
        except TlsError as exc:
            log.error("TLS reload failed; keeping the old certificates", error=str(exc))
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
            await self.metrics_server.stop()
        self.servicer.prompts.close()


def shardline_version() -> str:
    return version("shardline")
