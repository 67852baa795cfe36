"""Logging setup for every shardline process: structlog, console on a terminal, JSON otherwise.

Router and shards call `configure` once at start; shard processes bind their rank so every line
they write carries it.
"""

from __future__ import annotations

import logging
import sys

import structlog

FORMATS = ("auto", "console", "json")


def configure(fmt: str = "auto", level: str = "info", **bound: object) -> None:
    """Routes structlog (and stdlib logging) to stderr as console lines or JSON objects."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if fmt == "console" \
        else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # One write per line (message and newline together): router and shards share stderr, and
        # separate writes let their JSON lines interleave.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**bound)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def add_arguments(p) -> None:
    p.add_argument("--log-format", choices=FORMATS, default="auto",
                   help="console lines, JSON objects, or auto: console on a terminal, JSON otherwise")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="lowest level logged")
