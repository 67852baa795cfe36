"""The `shardline` command: one parser whose subcommands live with the component they run.

Each component module exposes `add_parser(subparsers)` registering its subcommand with a `run`
handler; heavy imports (torch, transformers) happen inside the handlers, never here, so
`shardline --help` is fast and manifests can be checked against `build_parser()` in tests.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shardline.client import bench, generate_cli
from shardline.router.launch import cli as launch_cli
from shardline.shard import cli as shard_cli

COMMANDS = (launch_cli, generate_cli, bench, shard_cli)


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (`shardline launch: error: argument --tp: ...`), not
    after a usage text that runs over dozens of lines for `launch`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full `shardline` parser with every subcommand registered."""
    parser = Parser(
        prog="shardline",
        description="Serve language models sharded over processes, behind a gRPC router.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a command may start itself again (shard nodes)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
