"""Shared pytest fixtures: tiny random checkpoints, built once per session (see checkpoints.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from checkpoints import make_checkpoint


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`checkpoint_factory(arch="qwen3", tie_word_embeddings=True)` -> checkpoint dir, cached by kwargs."""
    built: dict[tuple[tuple[str, Any], ...], Path] = {}

    def factory(**kwargs: Any) -> Path:
        key = tuple(sorted(kwargs.items()))
        if key not in built:
            built[key] = make_checkpoint(tmp_path_factory.mktemp("checkpoint"), **kwargs)
        return built[key]

    return factory
