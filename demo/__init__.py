"""The shardline demo model: a tiny Llama trained on CPython's own pydoc topics.

``shardline launch`` with no model argument serves the files in :func:`model_dir`.
They were produced by ``python demo/train.py --out demo/model`` (see
``demo/README.md``); the training text comes from :mod:`shardline.demo.corpus`.
"""

from __future__ import annotations

from pathlib import Path


def model_dir() -> Path:
    """Return the directory holding the packaged demo model (config, weights, tokenizer)."""
    return Path(__file__).parent / "model"
