"""`shardline shard` (and `python -m shardline.shard`, the entry point launchers use): run one rank
of a shard group as a gRPC server.

Ranks, sizes and the rendezvous come from flags, or else from the standard torch.distributed
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or else from the variables a
Kubernetes LeaderWorkerSet puts in every pod of a group (LWS_WORKER_INDEX, LWS_GROUP_SIZE,
LWS_LEADER_ADDRESS: one rank per pod, the leader is rank 0), read when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import structlog

from shardline.shard import devices, preflight
from shardline.common import flags, logs
from shardline.common import tls as shard_tls
from shardline.shard.group_network import InterfaceError, apply_interface
from shardline.shard.config import ATTENTION_BACKENDS, COMPILE_MODES, DTYPES, GroupConfig, ShardConfig
from shardline.common.ports import PortInUse, check_free
from shardline.shard.preflight import SettingsError
from shardline.shard.startup import CONFIG_EXIT, one_line, write_reason

NCCL_PREFIXES = ("NCCL_", "TORCH_NCCL_", "GLOO_", "MASTER_", "CUDA_VISIBLE_DEVICES", "SHARDLINE_P2P")
# Environment variables a group setting falls back to when no flag gives it, first match wins.
ENV_SOURCES = {"rank": ("RANK", "LWS_WORKER_INDEX"), "world_size": ("WORLD_SIZE", "LWS_GROUP_SIZE"),
               "master_addr": ("MASTER_ADDR", "LWS_LEADER_ADDRESS"), "master_port": ("MASTER_PORT",),
               "local_rank": ("LOCAL_RANK",), "local_world_size": ("LOCAL_WORLD_SIZE",)}


def add_group_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that forms or describes a shard group."""
    p.add_argument("--tp", type=flags.at_least(1), default=1, help="tensor-parallel size (ranks per pipeline stage)")
    p.add_argument("--pp", type=flags.at_least(1), default=1, help="pipeline-parallel size (number of stages)")
    p.add_argument("--pp-partition", type=flags.partition, default="",
                   help="layers per pipeline stage, e.g. '10,9,9,4'; default: even, remainder on the first stages")
    p.add_argument("--device", default="cpu", help="cpu, cuda (one GPU per rank) or cuda:N")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="parameter and KV dtype; auto = the checkpoint's own (config.json) on CUDA, float32 on CPU")
    p.add_argument("--kv-block-size", type=flags.at_least(1), default=16,
                   help="tokens per KV block; the router allocates KV in whole blocks as tokens are generated")
    p.add_argument("--kv-cache-tokens", type=flags.at_least(0), default=0,
                   help="KV cache capacity per shard in tokens; 0 = --kv-memory-fraction of free memory, which "
                        "on CPU the router caps at what can run at once (see --max-batch-total-tokens)")
    p.add_argument("--kv-memory-fraction", type=flags.fraction, default=0.8,
                   help="fraction of free memory (GPU memory, or the host's available RAM shared by the CPU "
                        "ranks) the KV cache may use when --kv-cache-tokens is 0")
    p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                   help="attention kernels: reference (gather + SDPA, the oracle), flex (FlexAttention reading "
                        "the paged pool in place); auto = reference on CPU, flex on CUDA")
    p.add_argument("--compile", choices=COMPILE_MODES, default="auto",
                   help="torch.compile the layer stack at Warmup (cached on disk); auto = on for CUDA, "
                        "off on CPU, where it measured no faster at serving batch sizes (BENCHMARKS.md)")
    p.add_argument("--threads", type=flags.at_least(0), default=0,
                   help="CPU threads per shard for torch; 0 = the host's cores divided among the ranks")
    p.add_argument("--collective-timeout", type=flags.above(0), default=600.0,
                   help="seconds a collective may block before the group gives up")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers `shardline shard` on the `shardline` command."""
    add_arguments(sub.add_parser("shard", help="run one shard rank (split deployments)",
                                 description=__doc__, formatter_class=flags.HelpFormatter))


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m shardline.shard` (the same flags as `shardline shard`)."""
    p = argparse.ArgumentParser(prog="python -m shardline.shard", description=__doc__,
                                formatter_class=flags.HelpFormatter)
    add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m shardline.shard ARGS`: one rank (or a node's ranks), without the SDK or the router."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return int(args.run(args) or 0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The shard's flags."""
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory (config.json, *.safetensors)")
    p.add_argument("--rank", type=flags.at_least(0), default=None,
                   help="global rank; default: $RANK, $LWS_WORKER_INDEX or 0")
    p.add_argument("--local-rank", type=flags.at_least(0), default=None,
                   help="this rank among the ranks of its node: its GPU with --device cuda; default: $LOCAL_RANK or 0")
    p.add_argument("--local-world-size", type=flags.at_least(1), default=None,
                   help="ranks on this node (they share its GPUs and P2P); default: $LOCAL_WORLD_SIZE or 1")
    p.add_argument("--world-size", type=flags.at_least(1), default=None,
                   help="checked against tp x pp; default: $WORLD_SIZE or $LWS_GROUP_SIZE when set")
    p.add_argument("--master-addr", default=None,
                   help="rendezvous host (rank 0's address); default: $MASTER_ADDR, $LWS_LEADER_ADDRESS or 127.0.0.1")
    p.add_argument("--master-port", type=flags.port(), default=None,
                   help="rendezvous port; default: $MASTER_PORT or 29500")
    p.add_argument("--listen", type=flags.listen_address, default=None,
                   help="gRPC address: unix:///path.sock or host:port; default: unix:///tmp/shardline-shard-RANK.sock")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="exit when this process (the launching router) dies; set by `shardline launch`")
    p.add_argument("--group-watch", choices=("auto", "on", "off"), default="auto",
                   help="exit when the group breaks (a peer died or hung), so an orchestrator recreates it; "
                        "auto = on unless --parent-pid (a launcher that restarts the group) is given")
    p.add_argument("--ranks-per-node", type=flags.at_least(1), default=1,
                   help="run this node's ranks (one process each, supervised together) instead of one rank: "
                        "for one pod per node; local rank i listens on --listen's port + i")
    p.add_argument("--node-rank", type=flags.at_least(0), default=None,
                   help="with --ranks-per-node: this node's index; default: $NODE_RANK, $LWS_WORKER_INDEX or 0")
    p.add_argument("--reason-file", type=Path, default=None,
                   help="when loading fails for a reason a restart cannot fix, write it here (one line) and exit "
                        f"{CONFIG_EXIT} without logging it; set by `shardline launch`, which prints it once")
    add_group_arguments(p)
    logs.add_arguments(p)
    tls = p.add_argument_group("TLS", "a --listen host:port needs mutual TLS (or --insecure-shard-port)")
    shard_tls.add_server_arguments(tls, "the shard's gRPC port")
    tls.add_argument("--insecure-shard-port", action="store_true",
                     help="serve a TCP --listen without mutual TLS on purpose: anyone who reaches the port can "
                          "drive the shard (Step, Reset), so only a private network may reach it")
    p.add_argument("--group-interface", default=None, metavar="IFACE",
                   help="the network interface of the group's own sockets: rank 0's rendezvous store listens on "
                        "its IPv4 address, gloo (and NCCL unless $NCCL_SOCKET_IFNAME is set) use it; "
                        "default: the store on every interface (a warning says so)")
    p.set_defaults(run=run)


class Refused(SystemExit):
    """Settings this shard can never run with: exits with CONFIG_EXIT; str() is the one-line reason."""

    def __init__(self, message: str):
        super().__init__(CONFIG_EXIT)
        self.message = message

    def __str__(self) -> str:
        return self.message


def from_env(env: Mapping[str, str], setting: str) -> tuple[str, str] | None:
    """(variable, value) of the first variable in ENV_SOURCES[setting] that is set and not empty."""
    return next(((name, env[name]) for name in ENV_SOURCES[setting] if env.get(name)), None)


def setting(flag_value, flag: str, env: Mapping[str, str], name: str, default=None) -> tuple[str, object]:
    """(where it came from, value) of one group setting: the flag, else the environment, else `default`."""
    if flag_value is not None:
        return flag, flag_value
    found = from_env(env, name)
    return (f"${found[0]}", found[1]) if found else ("default", default)


def config_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> ShardConfig:
    _, rank = setting(args.rank, "--rank", env, "rank", 0)
    _, addr = setting(args.master_addr, "--master-addr", env, "master_addr", "127.0.0.1")
    _, port = setting(args.master_port, "--master-port", env, "master_port", 29500)
    _, local_rank = setting(args.local_rank, "--local-rank", env, "local_rank", 0)
    _, local_world = setting(args.local_world_size, "--local-world-size", env, "local_world_size", 1)
    rank, port = env_int(rank, "rank"), env_int(port, "master_port")
    group = GroupConfig(
        rank=rank, tp_size=args.tp, pp_size=args.pp, master_addr=str(addr), master_port=port,
        pp_partition=tuple(args.pp_partition), collective_timeout_s=args.collective_timeout,
        local_rank=env_int(local_rank, "local_rank"), local_world_size=env_int(local_world, "local_world_size"))
    source, world = setting(args.world_size, "--world-size", env, "world_size")
    if world is not None and env_int(world, "world_size") != group.world_size:
        raise Refused(f"world size {world} ({source}) does not match "
                      f"--tp {args.tp} x --pp {args.pp} = {group.world_size}")
    cfg = ShardConfig(model_dir=args.model, group=group, device=args.device, dtype=args.dtype,
                      listen=args.listen or f"unix:///tmp/shardline-shard-{rank}.sock",
                      kv_cache_tokens=args.kv_cache_tokens, kv_memory_fraction=args.kv_memory_fraction,
                      kv_block_size=args.kv_block_size, attention_backend=args.attention_backend,
                      compile=args.compile, reason_file=args.reason_file)
    try:
        cfg.validate()
    except ValueError as exc:
        raise Refused(str(exc)) from None
    return cfg


def env_int(value: object, setting_name: str) -> int:
    """An integer group setting; one from the environment may be any text."""
    try:
        return int(value)
    except (TypeError, ValueError):
        names = " or ".join(f"${n}" for n in ENV_SOURCES[setting_name])
        raise Refused(f"{names} must be an integer, got {value!r}") from None


def set_threads(threads: int, world_size: int) -> None:
    """Keeps the ranks of a group from oversubscribing the host's cores (which slows them 10x+)."""
    import torch

    torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // world_size))


def die_with_parent(parent_pid: int) -> None:
    """Linux: SIGTERM this shard when its launcher dies, so no shard outlives a killed router."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the launcher died before prctl took effect
        raise SystemExit(f"launcher process {parent_pid} is gone")


def refuse(message: str, reason_file: Path | None) -> int:
    """Settings that can never work: one line (to the launcher's reason file, or stderr), CONFIG_EXIT."""
    if reason_file is not None:
        write_reason(reason_file, message)
    else:
        print(f"shardline: error: {message}", file=sys.stderr, flush=True)
    return CONFIG_EXIT


def checked_config(args: argparse.Namespace) -> ShardConfig:
    """The shard's config, refused (Refused) unless the checkpoint and this host can serve it."""
    cfg = config_from_args(args, os.environ)
    g = cfg.group
    try:
        config = preflight.check_group(cfg.model_dir, g.tp_size, g.pp_size, g.pp_partition, cfg.device,
                                       ranks_here=g.local_world_size)
    except SettingsError as exc:
        raise Refused(str(exc)) from None
    return replace(cfg, dtype=devices.served_dtype(cfg.dtype, cfg.device, config))


def peer_to_peer(cfg: ShardConfig) -> None:
    """Decides NCCL's P2P for the GPUs of this node's ranks before the group forms (in os.environ,
    which NCCL reads); a pair that cannot use it turns it off, with a warning naming the pair."""
    found = devices.p2p_environment(cfg.device, cfg.group.local_world_size, os.environ)
    os.environ.update(found)
    if "SHARDLINE_P2P_OFF_BECAUSE" in found:
        structlog.get_logger("shardline.shard").warning(
            "P2P between GPUs unavailable; NCCL P2P off (NCCL_P2P_DISABLE=1)", pairs=found["SHARDLINE_P2P_OFF_BECAUSE"])


def run_node_ranks(args: argparse.Namespace) -> int:
    """--ranks-per-node M > 1: this node's M ranks, checked once, then supervised together."""
    from shardline.shard.node import node_layout, run_node

    try:
        if args.rank is not None:
            raise SettingsError("--rank names one rank; with --ranks-per-node the node's ranks follow from "
                                "--node-rank (or $NODE_RANK, $LWS_WORKER_INDEX)")
        layout = node_layout(args.ranks_per_node, args.node_rank, args.tp * args.pp, os.environ)
        preflight.check_group(args.model, args.tp, args.pp, args.pp_partition, args.device,
                              ranks_here=args.ranks_per_node)
    except SettingsError as exc:
        return refuse(str(exc), args.reason_file)
    logs.configure(args.log_format, args.log_level, node_rank=layout.node_rank)
    own = args.argv[1:] if args.argv[:1] == ["shard"] else args.argv  # `shardline shard ...` or `-m shardline.shard ...`
    return run_node(own, layout, args.listen or "unix:///tmp/shardline-shard.sock")


def warn_exposure(cfg: ShardConfig, exposed: str | None) -> None:
    """Warnings for what this shard exposes on purpose: an unprotected port, an open rendezvous."""
    log = structlog.get_logger("shardline.shard")
    if exposed is not None:
        log.warning(exposed)
    if cfg.group.world_size > 1 and cfg.group.rank == 0 and not cfg.group.bind_address:
        log.warning(f"the rendezvous store (port {cfg.group.master_port}) and gloo/NCCL listen on every interface "
                    f"without authentication; name the pod's or host's interface with --group-interface and keep "
                    f"other hosts away with a NetworkPolicy or a private network")


def run(args: argparse.Namespace) -> int:
    import asyncio

    from shardline.shard.server import serve

    try:
        exposed = shard_tls.check_shard_port(args.listen or "unix://", shard_tls.server_files(args),
                                             args.insecure_shard_port)
    except shard_tls.TlsError as exc:
        return refuse(str(exc), args.reason_file)
    if args.ranks_per_node > 1:
        return run_node_ranks(args)
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    try:
        cfg = checked_config(args)
        if args.group_interface:
            cfg = replace(cfg, group=replace(cfg.group, bind_address=apply_interface(args.group_interface, os.environ)))
    except Refused as exc:
        return refuse(str(exc), args.reason_file)
    except InterfaceError as exc:
        return refuse(str(exc), args.reason_file)
    logs.configure(args.log_format, args.log_level, rank=cfg.group.rank)
    if cfg.group.rank == 0 and cfg.group.world_size > 1:  # rank 0 hosts the rendezvous
        try:
            check_free(cfg.group.bind_address, cfg.group.master_port, "--master-port")
        except PortInUse as exc:
            print(f"shardline: error: {exc}", file=sys.stderr, flush=True)
            return 1
    warn_exposure(cfg, exposed)
    set_threads(args.threads, cfg.group.world_size)
    peer_to_peer(cfg)
    environment = {k: v for k, v in os.environ.items() if k.startswith(NCCL_PREFIXES)}
    try:
        # Without a launching router, the orchestrator restarts what exits: leave when the group breaks.
        watch = args.group_watch == "on" or (args.group_watch == "auto" and args.parent_pid is None)
        code = asyncio.run(serve(cfg, environment, watch_group=watch, tls=shard_tls.server_files(args)))
    except Exception as exc:  # could not listen: one line, the traceback at debug level
        structlog.get_logger("shardline.shard").debug("shard failed", exc_info=exc)
        print(f"shardline: error: rank {cfg.group.rank}: {one_line(exc)}", file=sys.stderr, flush=True)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # a rank stuck in a collective must not keep the process alive
