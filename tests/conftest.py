"""Shared pytest fixtures: tiny random checkpoints, built once per session (see checkpoints.py), and
the launched servers that several test files can share (a launch costs about half a minute on 2 cores)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from checkpoints import make_checkpoint
from router_harness import launch_args, launched

SHARED_MAX_TOTAL = 512  # max_position_embeddings of the shared server's checkpoint


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


@pytest.fixture(scope="session")
def shared_llama(checkpoint_factory: Callable[..., Path]) -> Path:
    """A 2-layer Llama with a Llama-style tokenizer (BOS, chat template), 512 positions."""
    return checkpoint_factory(arch="llama", num_layers=2, llama_tokenizer=True,
                              max_position_embeddings=SHARED_MAX_TOTAL)


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory, shared_llama: Path):
    """One TP=1 server of `shared_llama` with HTTP and metrics, for test_e2e_input.py and
    test_e2e_openai.py: --max-concurrent-requests 4 (the overload test fills it), model id "tiny",
    --default-max-new-tokens 5 (the defaults test), a 512-token step budget."""
    args = launch_args(extra=["--max-total-tokens", str(SHARED_MAX_TOTAL), "--max-batch-prefill-tokens", "512",
                              "--max-concurrent-requests", "4", "--served-model-name", "tiny",
                              "--default-max-new-tokens", "5"])
    with launched(tmp_path_factory.mktemp("shared"), *args, model=shared_llama, expect_shards=1, http=True,
                  metrics=True) as server:
        yield server
