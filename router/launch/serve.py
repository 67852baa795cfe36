"""Entry points: `shardline launch` (router + local shards) and `shardline router` (remote shards).

Order of a start: listen at once (health NOT_SERVING, so probes and clients get a clear answer),
bring the shard group up, warm it up to learn the KV capacity, start the batcher, turn SERVING.
On SIGTERM/SIGINT: NOT_SERVING, stop admitting, let running requests finish within
--shutdown-grace, end the rest with UNAVAILABLE, stop the shards, and exit (0 after SIGTERM, 130
after Ctrl-C, as shells expect).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import structlog

from shardline.proto import serving_pb2
from shardline.router.group import nccl
from shardline.router.launch import preflight
from shardline.router.scheduling.batcher import Batcher, first_of
from shardline.router.scheduling.blocks import BlockAllocator
from shardline.router.config import RouterConfig
from shardline.router.launch.settings import router_config
from shardline.router.metrics import Metrics
from shardline.router.group.processes import GroupSpec
from shardline.router.api.server import NOT_SERVING, GenerationServicer, RouterServer, shardline_version
from shardline.router.group.socket_dir import private_socket_dir
from shardline.router.group.supervisor import GroupGaveUp, LocalGroup, RemoteGroup, RestartPolicy, Supervisor
from shardline.router.group.shards import ShardGroup, ShardGroupError
from shardline.common import flags, logs
from shardline.shard.startup import one_line

log = structlog.get_logger("shardline.router")


def default_model() -> Path:
    from shardline.demo import model_dir

    return model_dir()


def policy_from_args(args: argparse.Namespace, cfg: RouterConfig) -> RestartPolicy:
    return RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window,
                         health_interval_s=args.health_interval, startup_timeout_s=cfg.startup_timeout,
                         step_timeout_s=cfg.step_timeout)


def shard_environment(args: argparse.Namespace) -> dict[str, str]:
    """NCCL settings for the shards, after the /dev/shm check. P2P is decided by the shards, per pair
    of their GPUs (shard/devices.py): the router never opens a CUDA context."""
    env = nccl.NcclSettings.from_args(args).environment(os.environ)
    world = args.tp * args.pp
    nccl.check_shm(args.shm_check_path, nccl.required_shm_bytes(args.shm_required_bytes, args.device, world, env))
    return env


def launch(args: argparse.Namespace) -> int:
    logs.configure(args.log_format, args.log_level, component="router")
    return preflight.one_line_errors(_launch, args)


def _launch(args: argparse.Namespace) -> int:
    model = (args.model or default_model()).resolve()
    config = preflight.check_launch(args, model)
    cfg = router_config(args, model, config.get("max_position_embeddings"))
    env = shard_environment(args)
    spec = GroupSpec(model=cfg.model, tp=args.tp, pp=args.pp, device=args.device, dtype=args.dtype,
                     pp_partition=args.pp_partition, kv_cache_tokens=args.kv_cache_tokens, kv_block_size=args.kv_block_size,
                     kv_memory_fraction=args.kv_memory_fraction, collective_timeout=args.collective_timeout,
                     attention_backend=args.attention_backend, compile=args.compile,
                     socket_dir=private_socket_dir(args.socket_dir), threads=args.threads, env=env,
                     log_format=args.log_format, log_level=args.log_level)
    policy = policy_from_args(args, cfg)
    return asyncio.run(Router(cfg, LocalGroup(spec, policy), policy, args.metrics_port).serve())


def serve_split(args: argparse.Namespace) -> int:
    logs.configure(args.log_format, args.log_level, component="router")
    return preflight.one_line_errors(_serve_split, args)


def _serve_split(args: argparse.Namespace) -> int:
    model = args.model.resolve()
    config, addresses = preflight.check_router(args, model)
    cfg = router_config(args, model, config.get("max_position_embeddings"))
    policy = policy_from_args(args, cfg)
    remote = RemoteGroup(addresses, policy, cfg.security.shard_tls)
    return asyncio.run(Router(cfg, remote, policy, args.metrics_port).serve())


class Router:
    """One router process: public server, supervisor, batcher."""

    def __init__(self, cfg: RouterConfig, owner, policy: RestartPolicy, metrics_port: int = 0):
        from transformers import AutoTokenizer

        self.cfg, self.metrics, self.metrics_port = cfg, Metrics(), metrics_port
        self.tokenizer = AutoTokenizer.from_pretrained(str(cfg.model), local_files_only=True)
        self.supervisor = Supervisor(owner, policy)
        self.servicer: GenerationServicer | None = None
        self.server: RouterServer | None = None

    async def serve(self) -> int:
        from shardline.shard.engine import eos_token_ids
        from shardline.shard.models.registry import load_config

        config = load_config(self.cfg.model)
        self.servicer = GenerationServicer(self.cfg, self.tokenizer, config.vocab_size, metrics=self.metrics,
                                           eos_ids=eos_token_ids(self.cfg.model, config))
        self.server = RouterServer(self.cfg, self.servicer)
        await self._listen()
        http = f", OpenAI-compatible HTTP on {self.cfg.host}:{self.server.http_port}" if self.server.http_port else ""
        print(f"shardline: listening on {self.cfg.host}:{self.server.port}{http}, loading {self.cfg.model}",
              file=sys.stderr, flush=True)
        print(f"shardline: {self.server.describe_ports()}", file=sys.stderr, flush=True)
        stop, stopped_by = asyncio.Event(), []
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda sig=sig: (stopped_by.append(sig), stop.set()))
        loop.add_signal_handler(signal.SIGHUP, self.server.reload_tls)  # new certificates, same port
        work = asyncio.ensure_future(self._run())
        await first_of(stop.wait(), asyncio.shield(work))
        code = flags.EXIT_INTERRUPTED if stopped_by[:1] == [signal.SIGINT] else 0  # SIGTERM: a clean stop
        if work.done() and not work.cancelled() and work.exception() is not None:
            print(f"shardline: error: {one_line(work.exception())}", file=sys.stderr, flush=True)
            code = flags.EXIT_ERROR
        await self._shutdown(work)
        return code

    async def _listen(self) -> None:
        """Binds the public port, then the metrics port; a port that is taken ends the start (one line)."""
        await self.server.start()
        if self.metrics_port:
            try:
                await self.server.serve_metrics(self.metrics.registry, self.metrics_port)
            except RuntimeError:
                await self.server.stop(grace=0)
                raise

    async def _run(self) -> None:
        """Start the group, then batch until the supervisor gives up (router stays up, UNAVAILABLE)."""
        watcher = asyncio.ensure_future(self.supervisor.watch())
        try:
            group = await self._up(await self.supervisor.start())
            batcher = self.servicer.batcher
            batcher.on_group_failure = self._recover
            await batcher.run(group)
        except GroupGaveUp as exc:
            await self._give_up(str(exc))
            await asyncio.Event().wait()  # keep answering UNAVAILABLE until SIGTERM
        finally:
            watcher.cancel()

    async def _bring_up(self, group: ShardGroup) -> None:
        """Clears what the shards hold (a remote group that survived a failure still has the old
        requests), warms the group up, gives the batcher a fresh allocator over its KV pool, turns
        SERVING."""
        await group.clear()
        device = (await group.info())[0].device
        step_tokens = self.cfg.step_tokens(device)
        blocks, block_size = await group.warmup(step_tokens, self.cfg.max_batch_size, self.cfg.kv_tokens_cap(device),
                                                timeout=self.cfg.startup_timeout,
                                                max_context_tokens=self.cfg.max_total_tokens)
        allocator = BlockAllocator(blocks, block_size)
        self.servicer.structured = group.constraints
        shards = await group.info()
        eos_ids = frozenset(shards[0].eos_token_ids)
        batcher = self.servicer.batcher
        if batcher is None:
            batcher = Batcher(self.cfg, allocator, self.metrics, eos_ids, step_tokens)
        else:
            batcher.resize(allocator, step_tokens)
        self.servicer.batcher = batcher
        self.servicer.info = self._info(shards, allocator, step_tokens)
        await self.server.set_ready(True)
        capacity, c = allocator.capacity_tokens, self.cfg
        log.info("ready", port=self.server.port, kv_blocks=blocks, kv_block_size=block_size,
                 kv_capacity_tokens=capacity, restarts=self.supervisor.restarts,
                 max_input_tokens=c.max_input_tokens, max_total_tokens=c.max_total_tokens)
        print(f"shardline: ready on {c.host}:{self.server.port} (--max-input-tokens {c.max_input_tokens}, "
              f"--max-total-tokens {c.max_total_tokens}, step budget {step_tokens} tokens, KV capacity {capacity} "
              f"tokens: {blocks} blocks of {block_size})", file=sys.stderr, flush=True)

    async def _up(self, group: ShardGroup) -> ShardGroup:
        """Warms a fresh group up and serves it. A shard may die during warmup too (NCCL's first
        collective is where a small /dev/shm kills it): that is one more failure, not the end."""
        while True:
            try:
                await self._bring_up(group)
                return group
            except ShardGroupError as exc:
                group = await self.supervisor.restart(str(exc))

    async def _recover(self, exc, counted: bool = True) -> ShardGroup:
        await self.server.set_ready(False)
        return await self._up(await self.supervisor.restart(str(exc), counted=counted))

    async def _give_up(self, reason: str) -> None:
        log.error("giving up on the shard group", reason=reason)
        self.servicer.unavailable_reason = f"shards unavailable: {reason}"
        if self.servicer.batcher is not None:
            self.servicer.batcher.fail_all(grpc.StatusCode.UNAVAILABLE, self.servicer.unavailable_reason)
        self.servicer.batcher = None
        await self.server.set_ready(False)
        # Unusable until restarted: liveness says so too, so Kubernetes (or any supervisor) restarts it.
        await self.server.health.set("liveness", NOT_SERVING)
        await self.supervisor.owner.down()

    def _info(self, shards: list, allocator: BlockAllocator, step_tokens: int) -> serving_pb2.InfoResponse:
        first, c = shards[0], self.cfg
        return serving_pb2.InfoResponse(
            model=str(c.model), model_type=first.model_type, vocab_size=first.vocab_size,
            tp_size=first.tp_size, pp_size=first.pp_size, max_input_tokens=c.max_input_tokens,
            max_total_tokens=c.max_total_tokens, max_concurrent_requests=c.max_concurrent_requests,
            max_batch_prefill_tokens=step_tokens, max_batch_total_tokens=allocator.capacity_tokens,
            version=shardline_version(), restarts=self.supervisor.restarts,
            shards=[serving_pb2.ShardInfo(
                rank=s.rank, tp_rank=s.tp_rank, pp_rank=s.pp_rank, device=s.device, dtype=s.dtype,
                parameter_bytes=s.parameter_bytes, kv_capacity_tokens=s.kv_blocks * s.kv_block_size,
                kv_blocks=s.kv_blocks, kv_block_size=s.kv_block_size,
                first_layer=s.first_layer, last_layer=s.last_layer, environment=dict(s.environment))
                for s in shards])

    async def _shutdown(self, work: asyncio.Future) -> None:
        """Finishes running requests within --shutdown-grace; a second SIGINT/SIGTERM stops at once."""
        log.info("shutting down", grace_s=self.cfg.shutdown_grace)
        hurry = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, hurry.set)
        await self.server.set_ready(False)
        batcher = self.servicer.batcher
        self.servicer.unavailable_reason = "the server is shutting down"
        self.servicer.accepting = False
        if batcher is not None:
            await self._drain(batcher, work, hurry)
            batcher.fail_all(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        await self.server.stop(grace=0 if hurry.is_set() else 1.0)
        await self.supervisor.owner.down(grace=1.0 if hurry.is_set() else 5.0)
        log.info("stopped")

    async def _drain(self, batcher: Batcher, work: asyncio.Future, hurry: asyncio.Event) -> None:
        """Waits for the admitted requests to finish, at most --shutdown-grace or until `hurry`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.shutdown_grace
        if batcher.admitted and self.cfg.shutdown_grace > 0 and not work.done():
            print(f"shardline: stopping: waiting up to {self.cfg.shutdown_grace:g}s (--shutdown-grace) for "
                  f"{len(batcher.admitted)} running request(s) to finish; press Ctrl-C again to stop now",
                  file=sys.stderr, flush=True)
        while batcher.admitted and loop.time() < deadline and not work.done() and not hurry.is_set():
            await first_of(hurry.wait(), asyncio.sleep(0.05))
