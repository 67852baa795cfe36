"""Unit tests for the demo model's training corpus (demo/corpus.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

_DEMO = Path(__file__).resolve().parent.parent / "demo"


def _load(name: str) -> ModuleType:
    """Import demo/<name>.py by path, so the test works with or without an install."""
    spec = importlib.util.spec_from_file_location(f"_demo_{name}", _DEMO / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus() -> ModuleType:
    return _load("corpus")


def test_corpus_text_is_deterministic_and_large(corpus: ModuleType) -> None:
    text = corpus.corpus_text()
    assert isinstance(text, str)
    assert len(text) > 100_000
    assert corpus.corpus_text() == text


def test_documents_follow_sorted_topic_order(corpus: ModuleType) -> None:
    from pydoc_data.topics import topics

    docs = corpus.corpus_documents()
    assert docs == [topics[k].strip() for k in sorted(topics)]
    assert all(docs)


def test_corpus_words(corpus: ModuleType) -> None:
    words = corpus.corpus_words()
    assert isinstance(words, set)
    assert len(words) > 1000
    assert {"function", "class", "exception", "the", "is"} <= words
    assert all(w.isalpha() and w == w.lower() for w in words)
    words.add("zzqxv")  # callers get a copy
    assert "zzqxv" not in corpus.corpus_words()


def test_real_word_fraction(corpus: ModuleType) -> None:
    assert corpus.real_word_fraction("The function returns a value.") == 1.0
    assert corpus.real_word_fraction("The zzqxv function") == pytest.approx(2 / 3)
    assert corpus.real_word_fraction("123 !!") == 1.0


def test_model_dir(corpus: ModuleType) -> None:
    demo = _load("__init__")
    assert demo.model_dir() == _DEMO / "model"
