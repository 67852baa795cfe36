"""The shard's gRPC server: the internal Shard service plus grpc.health.v1.

The server starts listening at once with health NOT_SERVING, joins the group and loads the model
in a worker thread, then turns SERVING. Engine calls run one at a time on a single worker thread,
in arrival order, so the event loop stays free to answer health checks during a long step.

A TCP --listen needs `--tls-cert-file`, `--tls-key-file` and `--tls-client-ca-file` (checked by
shard/cli.py before anything starts, unless --insecure-shard-port): the port speaks only TLS, and
only to clients with a certificate from that CA (the router's --shard-tls-cert-file), so nobody
else can call Step or Reset. SIGHUP replaces the certificate and the client CA for new
connections. Health Watch streams are bounded (common/health.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardline.proto import shard_pb2, shard_pb2_grpc
from shardline.shard.config import ShardConfig
from shardline.shard.engine import Engine, StepRefused, timed
from shardline.common.health import BoundedHealth
from shardline.shard.group_watch import GroupWatch, exit_broken
from shardline.shard.parallel import ParallelState, init_parallel
from shardline.common.tls import ServerTls, TlsError, TlsFiles
from shardline.common.ports import check_free
from shardline.shard.startup import report_failure, unfixable_errors

log = structlog.get_logger("shardline.shard")
SERVICE = "shardline.shard.v1.Shard"
MESSAGE_LIMIT = 256 * 1024 * 1024
GRPC_OPTIONS = [("grpc.max_send_message_length", MESSAGE_LIMIT),
                ("grpc.max_receive_message_length", MESSAGE_LIMIT),
                ("grpc.so_reuseport", 0)]
# A refused step changed nothing on any rank (checked before the first collective): the group is
# intact. Any other failure leaves the ranks' state unknown.
ERRORS = ((StepRefused, grpc.StatusCode.INVALID_ARGUMENT),)


def unix_path(listen: str) -> Path | None:
    return Path(listen.removeprefix("unix://")) if listen.startswith("unix://") else None


def claim_unix_socket(path: Path) -> None:
    """Refuses a path another live server listens on; removes a stale socket file left by a dead one."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise RuntimeError(f"another server is already listening on {path}")


class ShardServicer(shard_pb2_grpc.ShardServicer):
    def __init__(self, cfg: ShardConfig, environment: dict[str, str], watch_group: bool = False):
        self.cfg, self.environment, self.watch_group = cfg, environment, watch_group
        self.engine: Engine | None = None
        self.ps: ParallelState | None = None
        self.watch: GroupWatch | None = None  # set when this rank must exit if its group breaks
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    def load(self) -> None:
        """Joins the group and loads the slice (runs on the worker thread)."""
        self.ps = init_parallel(self.cfg.group, self.cfg.device)
        if self.watch_group and self.ps.world_size > 1:
            self.watch = GroupWatch(self.ps.rank, self.cfg.group.collective_timeout_s)
        with unfixable_errors(self.cfg.model_dir):
            self.engine = Engine(self.cfg, self.ps)
        if self.watch is not None:
            self.watch.start()

    async def _run(self, context: grpc.aio.ServicerContext, fn, *args):
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "shard is still loading")
        try:
            return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)
        except Exception as exc:  # mapped to a status; the router decides what a failure means
            code = next((c for kind, c in ERRORS if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("engine call failed")
                if self.watch is not None:  # the ranks may be out of step now: end after answering
                    asyncio.get_running_loop().call_later(0.5, exit_broken, f"engine call failed: {exc}",
                                                              self.cfg.group.rank)
            await context.abort(code, f"rank {self.cfg.group.rank}: {exc}")

    async def Info(self, request, context):
        e = await self._run(context, lambda: self.engine)
        ps = self.ps
        return shard_pb2.InfoResponse(
            rank=ps.rank, world_size=ps.world_size, tp_rank=ps.tp_rank, tp_size=ps.tp_size,
            pp_rank=ps.pp_rank, pp_size=ps.pp_size, device=str(ps.device), dtype=self.cfg.dtype,
            parameter_bytes=e.parameter_bytes, kv_blocks=e.pool.num_blocks, kv_block_size=e.block_size,
            model_type=e.config.model_type, vocab_size=e.spec.vocab_size,
            max_position_embeddings=e.config.max_position_embeddings, eos_token_ids=sorted(e.eos_ids),
            first_layer=e.layers.start, last_layer=e.layers.stop, backend=ps.backend,
            environment=self.environment)

    async def Health(self, request, context):
        await self._run(context, lambda: None)
        return shard_pb2.HealthResponse()

    async def Warmup(self, request, context):
        blocks = await self._run(context, self.engine.warmup, request.max_step_tokens,
                                 request.max_batch_size, request.max_kv_tokens, request.max_context_tokens)
        return shard_pb2.WarmupResponse(kv_blocks=blocks, kv_block_size=self.engine.block_size,
                                        constraints=self.engine.grammars.tokenizer is not None)

    async def Step(self, request, context):
        gens, ns = await self._run(context, timed, self.engine.step, request)
        if request.start:
            ids = dict(context.invocation_metadata() or ()).get("x-shardline-request-ids", "")
            log.info("step", request_ids=ids.split(",") if ids else [], started=len(request.start),
                     tokens=sum(len(w.token_ids) or 1 for w in request.work), forward_ms=round(ns / 1e6, 2))
        return shard_pb2.StepResponse(generations=gens, forward_ns=ns)

    async def Reset(self, request, context):
        await self._run(context, self.engine.reset)
        return shard_pb2.ResetResponse()


def reload_tls(tls: ServerTls) -> None:
    """SIGHUP: the certificate files again, for new connections; a bad pair keeps the old one."""
    try:
        tls.reload()
        log.info("TLS certificates reloaded", cert_file=str(tls.files.cert_file))
    except TlsError as exc:
        log.error("TLS reload failed; keeping the old certificate", error=str(exc))


def listen(server: grpc.aio.Server, address: str, tls: ServerTls | None) -> None:
    """Adds the listening port, TLS-only when `tls` is given."""
    if tls is not None:
        bound = server.add_secure_port(address, tls.grpc_credentials())
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"cannot listen on {address}")


async def serve(cfg: ShardConfig, environment: dict[str, str], watch_group: bool = False,
                tls: TlsFiles = TlsFiles()) -> int:
    """Runs one shard until SIGTERM/SIGINT; returns the process exit code.

    `watch_group`: exit with code 1 when the group breaks (see group_watch.py); for ranks that an
    orchestrator restarts rather than a launching router. `tls`: --tls-* (off when not enabled)."""
    credentials = ServerTls(tls) if tls.enabled else None
    server = grpc.aio.server(options=GRPC_OPTIONS)
    servicer = ShardServicer(cfg, environment, watch_group)
    shard_pb2_grpc.add_ShardServicer_to_server(servicer, server)
    health_servicer = BoundedHealth()
    for name in ("", SERVICE):  # the aio servicer starts SERVING: say otherwise before listening
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    path = unix_path(cfg.listen)
    if path is not None:
        claim_unix_socket(path)
    else:
        host, _, port = cfg.listen.rpartition(":")
        check_free(host, int(port), "--listen")
    listen(server, cfg.listen, credentials)
    await server.start()
    log.info("shard listening", listen=cfg.listen, pid=os.getpid(), tls=credentials is not None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if credentials is not None:
        loop.add_signal_handler(signal.SIGHUP, reload_tls, credentials)
    load = loop.run_in_executor(servicer.worker, servicer.load)
    code = 0
    try:
        done, _ = await asyncio.wait([load, asyncio.ensure_future(stop.wait())],
                                     return_when=asyncio.FIRST_COMPLETED)
        if load in done:
            load.result()  # raises if loading failed
            for name in ("", SERVICE):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            e = servicer.engine
            log.info("shard ready", layers=f"{e.layers.start}-{e.layers.stop - 1}",
                     parameter_bytes=e.parameter_bytes, device=str(servicer.ps.device))
            await stop.wait()
    except Exception as exc:  # one line; CONFIG_EXIT when a restart cannot help
        code = report_failure(exc, cfg.reason_file)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=2.0)
    if servicer.watch is not None:  # peers exit when this rank is gone; destroying could wait on them
        servicer.watch.stop()
    elif load.done() and servicer.ps is not None:  # a rank stuck joining the group has nothing to destroy
        servicer.ps.destroy()
    if path is not None:
        path.unlink(missing_ok=True)
    log.info("shard stopped")
    return code
