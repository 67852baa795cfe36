"""The `shardline` command: one parser whose subcommands live with the component they run.

Each component module exposes `add_parser(subparsers)` registering its subcommand with a `run`
handler; heavy imports (torch, transformers) happen inside the handlers, never here, so
`shardline --help` is fast and manifests can be checked against `build_parser()` in tests.

Every error is one line, `shardline: error: ...`; the exit status follows one rule for every
command (`shardline.common.flags`): 0 done, 1 failed while running, 2 refused as given, 130 Ctrl-C.
"""

from __future__ import annotations

import os

# gRPC's C core logs every failed TLS handshake (six lines before the one error that says it);
# the error itself already carries the reason. Set before grpc is imported; GRPC_VERBOSITY wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from importlib.metadata import version  # noqa: E402

from shardline.client import bench, generate_cli  # noqa: E402
from shardline.router.launch import cli as launch_cli  # noqa: E402
from shardline.shard import cli as shard_cli  # noqa: E402
from shardline.common import flags  # noqa: E402

COMMANDS = (launch_cli, generate_cli, bench, shard_cli)


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (`shardline: error: argument --tp: ... (see shardline
    launch --help)`), not after a usage text that runs over dozens of lines for `launch`."""

    def error(self, message: str):
        self.exit(flags.EXIT_USAGE, f"shardline: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full `shardline` parser with every subcommand registered."""
    parser = Parser(
        prog="shardline",
        description="Serve language models sharded over processes, behind a gRPC router.",
        formatter_class=flags.HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"shardline {version('shardline')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a command may start itself again (shard nodes)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C before a command installed its own handler (imports, preflight)
        print("shardline: interrupted", file=sys.stderr, flush=True)
        return flags.EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
