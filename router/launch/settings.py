"""The router's config from its parsed flags, its limits fitted to the model's positions.

Read by `serve.py` once the checkpoint's config.json is known; the parsers (`cli.py`) record which
flags the user gave (`namespace.explicit`), so a limit they set is lowered with a warning and a
default with one note saying why.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from shardline.router.api import security_config
from shardline.router.config import RouterConfig
from shardline.shard.preflight import SettingsError

# Limits the router may lower to fit the model: a warning when the user gave the flag, else one note.
FITTED = ("max_input_tokens", "max_total_tokens")


def router_config(args: argparse.Namespace, model: Path, max_positions: int | None = None) -> RouterConfig:
    """The router's config from its flags, limits fitted to the model's positions. A limit the user
    set is lowered with a warning, a default with one line saying why. Raises SettingsError (one
    line) when the limits contradict each other."""
    names = [f for f in RouterConfig.__dataclass_fields__ if f != "model"]
    values = {n: getattr(args, n) for n in names if hasattr(args, n)}
    if isinstance(values.get("prefix_cache"), str):
        values["prefix_cache"] = values["prefix_cache"] == "on"
    values["security"] = security_config.from_args(args)
    given = RouterConfig(model=model, **values)
    cfg = given.fit_to_model(max_positions)
    explicit = getattr(args, "explicit", frozenset())
    if "max_input_tokens" not in explicit:  # the default follows the limit the user did set
        cfg = replace(cfg, max_input_tokens=min(cfg.max_input_tokens, cfg.max_total_tokens - 1))
    try:
        cfg.validate()
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    for line in fitted_lines(given, cfg, explicit, max_positions):
        print(line, file=sys.stderr, flush=True)
    return cfg


def fitted_lines(given: RouterConfig, cfg: RouterConfig, explicit: frozenset, max_positions: int | None) -> list[str]:
    """What was lowered to fit the model: a warning per limit the user gave, one note for defaults."""
    lines, defaults = [], []
    for name in FITTED:
        flag, old, new = "--" + name.replace("_", "-"), getattr(given, name), getattr(cfg, name)
        if old == new:
            continue
        if name in explicit:
            lines.append(f"shardline: warning: {flag}={old} exceeds what the model's "
                         f"max_position_embeddings={max_positions} allows; serving with {flag}={new}")
        else:
            defaults.append(f"{flag} {new} (default {old})")
    # A default input limit lowered below a total the user set follows that setting: no note.
    if defaults and "max_total_tokens" not in explicit:
        lines.append(f"shardline: serving with {', '.join(defaults)}: lowered to fit the model's "
                     f"max_position_embeddings={max_positions} (prompts stay below the total)")
    return lines
