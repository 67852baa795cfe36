"""argparse value types that refuse an out-of-range number with one line naming the limit.

Used by every command's options (`shardline launch`, `router`, `shard`), so a size of 0 or a port
of 99999 is refused while parsing, before anything starts: argparse adds the flag's name, as in
`argument --tp: must be an integer >= 1, got 0`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

MAX_PORT = 65535
# Exit status of every command: 0 done (SIGTERM included), 1 failed while running (a taken port, a
# shard that cannot load, an unreachable router), 2 refused as given (a flag's value, settings that
# can never work together, a request the router refuses as invalid), 130 stopped by Ctrl-C (SIGINT).
# `shardline shard` exits CONFIG_EXIT (78, shard/startup.py) for settings it refuses, for its launcher.
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help that states each option's default once: "(default: X)" is added only where there is
    a value to show (not None, "" or False) and the help text does not already say "default:"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, "", False, argparse.SUPPRESS) or "default:" in text:
            return text
        return super()._get_help_string(action)


def _number(kind: type, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None


def at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """A type accepting numbers >= minimum."""
    def parse(text: str):
        value = _number(kind, text)
        if not value >= minimum:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'} "
                                             f">= {minimum:g}, got {text}")
        return value
    parse.__name__ = f"{kind.__name__} >= {minimum:g}"
    return parse


def above(minimum: float) -> Callable[[str], float]:
    """A type accepting floats > minimum (durations, ratios)."""
    def parse(text: str) -> float:
        value = _number(float, text)
        if not value > minimum:
            raise argparse.ArgumentTypeError(f"must be a number > {minimum:g}, got {text}")
        return value
    parse.__name__ = f"float > {minimum:g}"
    return parse


def fraction(text: str) -> float:
    """A float in (0, 1]."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def port(zero: str | None = None) -> Callable[[str], int]:
    """A TCP port 1-65535; `zero` names what 0 means where 0 is allowed (e.g. 'any free port')."""
    low = 0 if zero else 1
    def parse(text: str) -> int:
        value = _number(int, text)
        if not low <= value <= MAX_PORT:
            meaning = f" (0: {zero})" if zero else ""
            raise argparse.ArgumentTypeError(f"port {text} is outside {low}-{MAX_PORT}{meaning}")
        return value
    parse.__name__ = "port"
    return parse


def partition(text: str) -> tuple[int, ...]:
    """Layers per pipeline stage, '10,9,9,4': positive integers separated by commas."""
    try:
        parts = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be layer counts separated by commas, e.g. 3,2; got {text!r}") from None
    if any(p < 1 for p in parts):
        raise argparse.ArgumentTypeError(f"every stage needs at least one layer, got {text}")
    return parts


def listen_address(text: str) -> str:
    """unix:///path.sock or host:port with a port in 1-65535."""
    if text.startswith("unix://"):
        if not text.removeprefix("unix://"):
            raise argparse.ArgumentTypeError(f"needs a socket path after unix://, got {text!r}")
        return text
    host, sep, number = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"must be unix:///path.sock or host:port, got {text!r}")
    port()(number)
    return text
