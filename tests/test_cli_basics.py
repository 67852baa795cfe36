"""What a new user meets first in the `shardline` command (issue 26): `--version`, `--help` that
states each default once, the one exit-code rule (0 done, 1 failed while running, 2 refused as
given, 130 Ctrl-C), a taken port refused before torch is imported, and the line that explains the
demo model's lowered limits. Ctrl-C exiting 130 on a running server: test_lifecycle.py."""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import time
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import pytest

from shardline.client.cli import build_parser
from shardline.router.config import RouterConfig
from shardline.router.launch.settings import fitted_lines, router_config


def shardline(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardline.client.cli", *argv], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def quiet_ports(*argv: str) -> list[str]:
    return ["launch", "--port", "0", "--http-port", "0", "--metrics-port", "0", *argv]


def test_version() -> None:
    done = shardline("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"shardline {version('shardline')}", done


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ["launch", "router", "shard", "generate", "bench"])
def test_help_states_each_default_once(command: str) -> None:
    text = _subparsers(build_parser())[command].format_help()
    assert "(default: None)" not in text and "(default: )" not in text and "(default: False)" not in text, text
    flat = " ".join(text.split())
    for option in re.split(r"\s(?=--[a-z])", flat):
        assert option.count("default:") <= 1, option


def test_argument_errors_exit_2_with_one_line() -> None:
    done = shardline("launch", "--tp", "0")
    assert done.returncode == 2
    assert done.stderr == "shardline: error: argument --tp: must be an integer >= 1, got 0 (see shardline launch --help)\n"


def test_settings_that_can_never_work_exit_2(tmp_path: Path) -> None:
    for argv in (quiet_ports("--model", str(tmp_path / "nowhere")),
                 quiet_ports("--max-input-tokens", "600", "--max-total-tokens", "500")):
        done = shardline(*argv)
        lines = done.stderr.splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("shardline: error: "), done.stderr


def test_a_taken_port_exits_1_before_torch_is_imported() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        done = shardline("launch", "--port", str(port), "--http-port", "0", "--metrics-port", "0")
        elapsed = time.monotonic() - start
    assert done.returncode == 1 and done.stderr.startswith(f"shardline: error: port {port} (--port) is already in use")
    assert elapsed < 5, f"{elapsed:.1f}s: the port check must come before the heavy imports"


def test_lowered_default_limits_are_explained_in_one_line() -> None:
    given = RouterConfig(model=Path("m"))
    fitted = given.fit_to_model(1024)
    fitted = replace(fitted, max_input_tokens=min(fitted.max_input_tokens, fitted.max_total_tokens - 1))
    assert fitted_lines(given, fitted, frozenset(), 1024) == [
        "shardline: serving with --max-input-tokens 1023 (default 1024), --max-total-tokens 1024 (default 2048): "
        "lowered to fit the model's max_position_embeddings=1024 (prompts stay below the total)"]
    assert fitted_lines(given, given, frozenset(), 4096) == []


def test_a_limit_the_user_gave_is_lowered_with_a_warning(capsys) -> None:
    args = build_parser().parse_args(["launch", "--max-total-tokens", "4096"])
    cfg = router_config(args, Path("m"), 2048)
    assert (cfg.max_total_tokens, cfg.max_input_tokens) == (2048, 1024)
    assert capsys.readouterr().err == ("shardline: warning: --max-total-tokens=4096 exceeds what the model's "
                                       "max_position_embeddings=2048 allows; serving with --max-total-tokens=2048\n")


def test_the_cpu_kv_default_is_what_can_run_at_once() -> None:
    """Not 80% of the host's RAM for a 3M-parameter model: on CPU the pool holds what the router can
    have running (min(batch size, concurrent requests) x total tokens); an explicit
    --max-batch-total-tokens wins; GPU shards fill --kv-memory-fraction of free memory."""
    cfg = RouterConfig(model=Path("m"), max_total_tokens=1024)
    assert cfg.kv_tokens_cap("cpu") == 128 * 1024  # --max-concurrent-requests 128 < --max-batch-size 256
    assert replace(cfg, max_batch_size=8).kv_tokens_cap("cpu") == 8 * 1024
    assert replace(cfg, max_batch_total_tokens=5000).kv_tokens_cap("cpu") == 5000
    assert cfg.kv_tokens_cap("cuda:0") == 0
