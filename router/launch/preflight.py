"""What `shardline launch` and `shardline router` check before anything starts, and how a start-up
error reaches the terminal: one line, `shardline: error: ...`, the traceback only at --log-level debug;
exit 2 for settings refused as given (SettingsError), 1 for a failure while starting or running.

Launch checks the checkpoint folder (config.json, weights, tokenizer), --tp/--pp/--pp-partition
against config.json, --device against what torch sees, and that its ports are free, so settings that
can never work are refused before a shard process exists. The router of a split deployment has no
shards of its own to check: it checks the folder it reads (config.json, tokenizer) and its ports.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from shardline.shard import preflight
from shardline.common import flags
from shardline.common.ports import check_free
from shardline.shard.startup import one_line


def check_ports(args: argparse.Namespace) -> None:
    """--port, --http-port and --metrics-port are free, and no two of them are the same port."""
    ports = {"--port": args.port, "--http-port": getattr(args, "http_port", 0), "--metrics-port": args.metrics_port}
    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if port and port in seen:
            raise preflight.SettingsError(f"{flag} {port} is the same port as {seen[port]}")
        seen.setdefault(port, flag)
    for flag, port in ports.items():
        check_free(args.host, port, flag)  # 0: any free port (--port), off (the others)


def check_launch(args: argparse.Namespace, model: Path) -> dict:
    """Everything `shardline launch` can refuse before it spawns a shard; returns config.json.
    The ports first: a taken port is refused in a fraction of a second, before torch is imported."""
    check_ports(args)
    return preflight.check_group(model, args.tp, args.pp, args.pp_partition, args.device,
                                 ranks_here=args.tp * args.pp, tokenizer=True)


def check_router(args: argparse.Namespace, model: Path) -> tuple[dict, list[str]]:
    """What `shardline router` can refuse before it listens: (config.json, shard addresses)."""
    addresses = [a.strip() for a in args.shards.split(",") if a.strip()]
    if not addresses:
        raise preflight.SettingsError(f"--shards {args.shards!r} names no shard address")
    check_ports(args)
    return preflight.read_checkpoint(model, weights=False, tokenizer=True), addresses


def one_line_errors(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Runs a command; an error that ends it prints one line (and its traceback at debug level) and
    exits EXIT_USAGE for settings that can never work, EXIT_ERROR for anything else."""
    try:
        return run(args)
    except Exception as exc:
        if getattr(args, "log_level", "info") == "debug":
            traceback.print_exc()
        print(f"shardline: error: {one_line(exc)}", file=sys.stderr, flush=True)
        return flags.EXIT_USAGE if isinstance(exc, preflight.SettingsError) else flags.EXIT_ERROR
