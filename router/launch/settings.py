"""The router's config from its parsed flags, its limits fitted to the model's positions.

Read by `serve.py` once the checkpoint's config.json is known; the parsers (`cli.py`) record which
flags the user gave (`namespace.explicit`), so a limit only they set is lowered with a warning.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from shardline.router.api import security_config
from shardline.router.config import RouterConfig

# Limits the router may lower to fit the model: a warning only when the user gave the flag.
FITTED = ("max_input_tokens", "max_total_tokens")


def router_config(args: argparse.Namespace, model: Path, max_positions: int | None = None) -> RouterConfig:
    """The router's config from its flags, limits fitted to the model's positions. A limit the user
    did not set is lowered silently; one they set is lowered with a warning. Exits with one line
    when the limits contradict each other."""
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
    for name in FITTED:
        if name in explicit and getattr(cfg, name) != getattr(given, name):
            flag = "--" + name.replace("_", "-")
            print(f"shardline: warning: {flag}={getattr(given, name)} exceeds what the model's "
                  f"max_position_embeddings={max_positions} allows; serving with {flag}={getattr(cfg, name)}",
                  file=sys.stderr, flush=True)
    try:
        cfg.validate()
    except ValueError as exc:
        raise SystemExit(f"shardline: error: {exc}") from None
    return cfg
